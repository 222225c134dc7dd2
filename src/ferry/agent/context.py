"""What the agent's loop and its operations share, and the store writes they make."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ferry.agent.config import AgentConfig
from ferry.agent.runtime import Runtime
from ferry.agent.view import StoreView
from ferry.model import codec
from ferry.model.errors import Conflict, NotFound, StoreError
from ferry.model.migration import MigrationPhase, MigrationProgress, MigrationRecord
from ferry.model.vm import Owner, Power, VmStatus
from ferry.qemu.argv import Hardware
from ferry.store.base import ClusterStore, Compare, Delete, Op, Put, Target, TxnOp
from ferry.store.keys import Keys

log = logging.getLogger(__name__)


@dataclass
class AgentContext:
    config: AgentConfig
    store: ClusterStore
    keys: Keys
    view: StoreView
    runtime: Runtime
    hardware: Hardware
    lease: int = 0

    @property
    def node(self) -> str:
        return self.config.node

    def migration_address(self, network: str) -> str | None:
        for n in self.config.migration_networks:
            if n.network == network:
                return n.address
        return None

    # -- migration records: read-modify-write with compare-and-swap
    async def read_record(self, mid: str) -> tuple[MigrationRecord, int]:
        e = await self.store.get(self.keys.migration_record(mid))
        if e is None:
            raise NotFound(f"migration {mid} not found")
        return codec.decode(MigrationRecord, e.value), e.mod_revision

    async def update_record(
        self, mid: str, change: Callable[[MigrationRecord], MigrationRecord]
    ) -> MigrationRecord:
        """Apply ``change`` to the freshest record; retry when another writer got in first."""
        key = self.keys.migration_record(mid)
        for attempt in range(20):
            # First try on the watch's copy: usually current, and it saves a round trip. A
            # decision on a stale copy is never final: on any doubt, read the store.
            cached = self.view.migration(mid) if attempt == 0 else None
            entry = self.view.entries.get(key) if cached is not None else None
            if cached is not None and entry is not None:
                rec, rev = cached, entry.mod_revision
                try:
                    new = change(rec)
                except Conflict:
                    continue
                if new == rec:
                    continue
            else:
                rec, rev = await self.read_record(mid)
                new = change(rec)
                if new == rec:
                    return rec
            res = await self.store.txn([Compare.unchanged(key, rev)], [Put(key, codec.encode(new))])
            if res.succeeded:
                return new
            await asyncio.sleep(0.005)
        raise Conflict(f"migration {mid}: record changed too often to update")

    async def advance(self, mid: str, phase: MigrationPhase, note: str = "",
                      **fields: object) -> MigrationRecord:
        node = self.node

        def change(rec: MigrationRecord) -> MigrationRecord:
            rec = rec.advance(phase, at=time.time(), node=node, note=note)
            return dataclasses.replace(rec, **fields)  # type: ignore[arg-type]

        return await self.update_record(mid, change)

    async def publish_progress(self, mid: str, progress: MigrationProgress) -> None:
        await self.store.put(self.keys.migration_progress(mid), codec.encode(progress))

    async def end_migration(self, mid: str, phase: MigrationPhase, reason: str) -> bool:
        """Fail or cancel a migration that has not been committed, in one transaction with
        giving the owner record back to the source. False if the target committed first."""
        for _ in range(20):
            rec, rec_rev = await self.read_record(mid)
            if rec.phase.terminal:
                return rec.phase is not MigrationPhase.COMPLETED
            owner_entry = await self.store.get(self.keys.vm_owner(rec.vm))
            owner = codec.decode(Owner, owner_entry.value) if owner_entry else None
            if rec.committed or owner is None or owner.migration != mid:
                return False
            assert owner_entry is not None
            new_rec = rec.advance(phase, at=time.time(), node=self.node, note=reason)
            new_rec = dataclasses.replace(new_rec, error=reason)
            new_owner = owner.amend(owner_entry.mod_revision, migration=None, target=None)
            res = await self.store.txn(
                [Compare.unchanged(self.keys.vm_owner(rec.vm), owner_entry.mod_revision),
                 Compare.unchanged(self.keys.migration_record(mid), rec_rev)],
                [Put(self.keys.vm_owner(rec.vm), codec.encode(new_owner)),
                 Put(self.keys.migration_record(mid), codec.encode(new_rec))],
            )
            if res.succeeded:
                return True
            await asyncio.sleep(0.005)
        raise Conflict(f"migration {mid}: could not record its end")

    async def release(self, vm: str, rev: int) -> None:
        """Confirm the VM stopped here: the owner record goes back to nobody (and this
        node's status with it), unless it changed since ``rev``."""
        key = self.keys.vm_owner(vm)
        ops: list[TxnOp] = [Put(key, codec.encode(Owner(node=None, power=Power.OFF)))]
        status = self.view.status(vm)
        if status is not None and status.node == self.node:
            ops.append(Delete(self.keys.vm_status(vm)))
        res = await self.store.txn([Compare.unchanged(key, rev)], ops)
        if res.succeeded:
            log.info("VM %s: stopped; released", vm)

    # -- VM status, on this node's lease so it vanishes with the node
    async def withdraw_status(self, vm: str, status: VmStatus) -> None:
        """Remove ``status`` if it is still the one in the store (not a newer one)."""
        key = self.keys.vm_status(vm)
        with contextlib.suppress(StoreError):
            await self.store.txn([Compare.value_is(key, codec.encode(status))], [Delete(key)])

    async def report_status(self, vm: str, status: VmStatus | None) -> None:
        key = self.keys.vm_status(vm)
        if status is not None:
            await self.store.put(key, codec.encode(status), lease=self.lease)
            return
        current = self.view.status(vm)
        if current is None or current.node != self.node:
            return
        raw = self.view.entries.get(key)
        if raw is None:
            return
        try:
            await self.store.txn([Compare(key, Target.VALUE, Op.EQUAL, raw.value)], [Delete(key)])
        except StoreError as err:
            log.warning("VM %s: cannot clear status: %s", vm, err)

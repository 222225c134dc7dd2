"""Migration requests: start, cancel, list, show, follow."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from ferry.control.client import ClusterClient
from ferry.control.nodes import node_loads
from ferry.ha.placement import check_fits
from ferry.model import codec
from ferry.model.errors import Conflict, InvalidSpec, NotFound, Timeout, Unavailable
from ferry.model.migration import (
    MigrationOptions,
    MigrationPhase,
    MigrationProgress,
    MigrationRecord,
)
from ferry.model.vm import Power, VmState
from ferry.store.base import Compare, Put


@dataclass(frozen=True)
class MigrationView:
    record: MigrationRecord
    progress: MigrationProgress | None
    cancel_requested: bool


async def request_migration(cl: ClusterClient, vm: str, *, to: str,
                            options: MigrationOptions = MigrationOptions()) -> MigrationRecord:
    """Check (changing nothing), then queue the migration in one transaction."""
    owner, rev = await cl.owner(vm)
    await cl.node(to)  # NotFound for a node that does not exist
    if owner.power is not Power.ON or owner.node is None:
        raise Conflict(f"VM {vm} is not running; only a running VM can be live-migrated")
    if owner.migration is not None:
        raise Conflict(f"VM {vm} is already migrating ({owner.migration})")
    if owner.node == to:
        raise InvalidSpec(f"VM {vm} already runs on {to}")
    if not await cl.node_up(to):
        raise Unavailable(f"node {to} is down")
    spec = await cl.spec(vm)
    loads = {n.name: n for n in await node_loads(cl)}
    if to in loads:
        check_fits(loads[to], spec.memory_mib)
    status = await cl.status(vm)
    if status is None or status.node != owner.node or status.state is not VmState.RUNNING:
        raise Conflict(f"VM {vm} is not running yet on {owner.node}")
    if options.max_bandwidth < 0 or options.downtime_limit_ms <= 0:
        raise InvalidSpec("bandwidth must be >= 0 and the downtime limit > 0")
    mid = secrets.token_hex(4)
    rec = MigrationRecord(id=mid, vm=vm, source=owner.node, target=to,
                          phase=MigrationPhase.QUEUED, created_at=time.time(), options=options)
    new_owner = replace(owner, migration=mid, target=to)
    res = await cl.store.txn(
        [Compare.unchanged(cl.keys.vm_owner(vm), rev),
         Compare.absent(cl.keys.migration_record(mid))],
        [Put(cl.keys.vm_owner(vm), codec.encode(new_owner)),
         Put(cl.keys.migration_record(mid), codec.encode(rec))],
    )
    if not res.succeeded:
        raise Conflict(f"VM {vm} changed while requesting the migration; try again")
    return rec


async def cancel_migration(cl: ClusterClient, mid: str) -> MigrationRecord:
    """Ask to cancel; refused once the migration is past its point of no return."""
    rec, _ = await cl.migration(mid)
    if rec.phase.terminal:
        raise Conflict(f"migration {mid} has already ended ({rec.phase.value})")
    if rec.committed:
        raise Conflict(f"migration {mid} is past its point of no return"
                       f" ({rec.phase.value}); it will complete")
    try:
        owner, owner_rev = await cl.owner(rec.vm)
    except NotFound:
        raise Conflict(f"migration {mid}: its VM {rec.vm} is gone") from None
    if owner.migration != mid:
        raise Conflict(f"migration {mid} is no longer in progress")
    res = await cl.store.txn(
        [Compare.unchanged(cl.keys.vm_owner(rec.vm), owner_rev),
         Compare.absent(cl.keys.migration_cancel(mid))],
        [Put(cl.keys.migration_cancel(mid), str(time.time()))],
    )
    if not res.succeeded:
        if await cl.cancel_requested(mid):
            return rec
        rec, _ = await cl.migration(mid)
        raise Conflict(f"migration {mid} moved on ({rec.phase.value}); cannot cancel it now")
    return rec


async def show_migration(cl: ClusterClient, mid: str) -> MigrationView:
    rec, _ = await cl.migration(mid)
    return MigrationView(record=rec, progress=await cl.progress(mid),
                         cancel_requested=await cl.cancel_requested(mid))


async def list_migrations(cl: ClusterClient) -> list[MigrationRecord]:
    recs = await cl.all_of(MigrationRecord, cl.keys.migrations, "record")
    return sorted(recs.values(), key=lambda r: r.created_at)


async def follow(cl: ClusterClient, mid: str, *, interval: float = 0.1,
                 timeout: float = 3600, settle_s: float = 15) -> AsyncIterator[MigrationView]:
    """Views of the migration as it changes, until it has settled (or ``settle_s`` after it
    ended, if the target never confirms its clean-up)."""
    deadline = time.monotonic() + timeout
    ended_at: float | None = None
    last: tuple[object, ...] | None = None
    while time.monotonic() < deadline:
        view = await show_migration(cl, mid)
        key = (view.record, view.progress, view.cancel_requested)
        if key != last:
            last = key
            yield view
        rec = view.record
        if rec.phase.terminal and ended_at is None:
            ended_at = time.monotonic()
        if rec.settled or (ended_at is not None and time.monotonic() - ended_at > settle_s):
            return
        await asyncio.sleep(interval)
    raise Timeout(f"migration {mid} did not finish within {timeout:.0f}s")

"""A watch-fed copy of the cluster's keys, and typed reads of it.

The agent builds every snapshot from this copy instead of reading the store each cycle;
writes go to the store (as transactions) and come back through the watch. Drivers wait on
it for a condition ("the target published its address") without polling the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

from ferry.model import codec
from ferry.model.errors import Compacted, FerryError, InvalidSpec, Timeout
from ferry.model.migration import MigrationRecord
from ferry.model.node import NodeInfo
from ferry.model.vm import Owner, VmSpec, VmStatus
from ferry.store.base import ClusterStore, Entry, EventType
from ferry.store.keys import Keys

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreView:
    def __init__(self, store: ClusterStore, keys: Keys) -> None:
        self.store = store
        self.keys = keys
        self.entries: dict[str, Entry] = {}
        self.revision = 0
        self._changed = asyncio.Condition()
        self.on_change: Callable[[], None] = lambda: None
        # Decoding JSON is most of a cycle's cost: decode each (key, revision) once.
        self._decoded: dict[str, tuple[int, object]] = {}

    async def load(self) -> None:
        entries, rev = await self.store.get_prefix(self.keys.root)
        self.entries = {e.key: e for e in entries}
        self.revision = rev
        await self._notify()

    async def follow(self) -> None:
        """Apply the store's changes forever; re-list after a compaction or a broken stream."""
        while True:
            try:
                async for batch in self.store.watch(self.keys.root,
                                                    start_revision=self.revision + 1):
                    # A reload (``load``) may have moved past some of these already.
                    floor = self.revision
                    for ev in batch:
                        if ev.mod_revision <= floor:
                            continue
                        if ev.type is EventType.DELETE:
                            self.entries.pop(ev.key, None)
                        else:
                            old = self.entries.get(ev.key)
                            self.entries[ev.key] = Entry(
                                key=ev.key, value=ev.value,
                                create_revision=ev.create_revision or (
                                    old.create_revision if old else ev.mod_revision),
                                mod_revision=ev.mod_revision,
                                version=(old.version + 1) if old else 1,
                            )
                        self.revision = max(self.revision, ev.mod_revision)
                    await self._notify(wake=any(not ev.key.endswith("/progress") for ev in batch))
            except Compacted:
                log.warning("watch compacted at %d: re-listing", self.revision)
                await self._reload()
            except FerryError as err:
                log.warning("watch broken (%s): re-listing in 1s", err)
                await asyncio.sleep(1)
                await self._reload()

    async def _reload(self) -> None:
        with contextlib.suppress(FerryError):
            await self.load()

    async def _notify(self, *, wake: bool = True) -> None:
        async with self._changed:
            self._changed.notify_all()
        if wake:  # progress samples are for people; they never change a decision
            self.on_change()

    async def wait_for(self, predicate: Callable[[], T | None], *, timeout: float) -> T:
        """Wait until ``predicate()`` returns something other than None/False; return it."""
        async def waiter() -> T:
            async with self._changed:
                while True:
                    value = predicate()
                    if value:
                        return value
                    await self._changed.wait()
        try:
            return await asyncio.wait_for(waiter(), timeout)
        except TimeoutError as err:
            raise Timeout(f"condition not met within {timeout:.0f}s") from err

    # -- typed reads
    def _decode(self, cls: type[T], key: str) -> tuple[T, Entry] | None:
        e = self.entries.get(key)
        if e is None:
            return None
        cached = self._decoded.get(key)
        if cached is not None and cached[0] == e.mod_revision and isinstance(cached[1], cls):
            return cached[1], e
        try:
            value = codec.decode(cls, e.value)
        except InvalidSpec as err:
            log.error("ignoring malformed %s at %s: %s", cls.__name__, key, err)
            return None
        self._decoded[key] = (e.mod_revision, value)
        return value, e

    def spec(self, vm: str) -> VmSpec | None:
        got = self._decode(VmSpec, self.keys.vm_spec(vm))
        return got[0] if got else None

    def owner(self, vm: str) -> tuple[Owner | None, int]:
        got = self._decode(Owner, self.keys.vm_owner(vm))
        return (got[0], got[1].mod_revision) if got else (None, 0)

    def status(self, vm: str) -> VmStatus | None:
        got = self._decode(VmStatus, self.keys.vm_status(vm))
        return got[0] if got else None

    def migration(self, mid: str) -> MigrationRecord | None:
        got = self._decode(MigrationRecord, self.keys.migration_record(mid))
        return got[0] if got else None

    def cancel_requested(self, mid: str) -> bool:
        return self.keys.migration_cancel(mid) in self.entries

    def node_info(self, node: str) -> NodeInfo | None:
        got = self._decode(NodeInfo, self.keys.node_info(node))
        return got[0] if got else None

    def node_alive(self, node: str) -> bool:
        return self.keys.node_alive(node) in self.entries

    def names(self, prefix: str) -> list[str]:
        """Second path element of keys under ``prefix``: VM names, node names, ids."""
        out = set()
        for k in self.entries:
            if k.startswith(prefix):
                out.add(k[len(prefix):].split("/", 1)[0])
        return sorted(out)

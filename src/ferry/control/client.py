"""Typed reads of the cluster store for the control layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from ferry.model import codec
from ferry.model.cluster import ClusterConfig, Volume
from ferry.model.errors import InvalidSpec, NotFound
from ferry.model.migration import MigrationProgress, MigrationRecord
from ferry.model.node import NodeInfo
from ferry.model.vm import Owner, VmSpec, VmStatus
from ferry.store.base import ClusterStore, Entry
from ferry.store.keys import Keys

T = TypeVar("T")


@dataclass
class ClusterClient:
    store: ClusterStore
    keys: Keys

    async def _get(self, cls: type[T], key: str) -> tuple[T, Entry] | None:
        e = await self.store.get(key)
        if e is None:
            return None
        return codec.decode(cls, e.value), e

    async def config(self) -> ClusterConfig:
        got = await self._get(ClusterConfig, self.keys.cluster_config)
        return got[0] if got else ClusterConfig(name=self.keys.cluster)

    async def spec(self, vm: str) -> VmSpec:
        got = await self._get(VmSpec, self.keys.vm_spec(vm))
        if got is None:
            raise NotFound(f"VM {vm!r} does not exist")
        return got[0]

    async def owner(self, vm: str) -> tuple[Owner, int]:
        got = await self._get(Owner, self.keys.vm_owner(vm))
        if got is None:
            raise NotFound(f"VM {vm!r} does not exist")
        return got[0], got[1].mod_revision

    async def status(self, vm: str) -> VmStatus | None:
        got = await self._get(VmStatus, self.keys.vm_status(vm))
        return got[0] if got else None

    async def node(self, name: str) -> NodeInfo:
        got = await self._get(NodeInfo, self.keys.node_info(name))
        if got is None:
            raise NotFound(f"node {name!r} does not exist")
        return got[0]

    async def node_up(self, name: str) -> bool:
        return await self.store.get(self.keys.node_alive(name)) is not None

    async def volume(self, name: str) -> Volume:
        got = await self._get(Volume, self.keys.volume(name))
        if got is None:
            raise NotFound(f"volume {name!r} does not exist")
        return got[0]

    async def migration(self, mid: str) -> tuple[MigrationRecord, int]:
        got = await self._get(MigrationRecord, self.keys.migration_record(mid))
        if got is None:
            raise NotFound(f"migration {mid!r} does not exist")
        return got[0], got[1].mod_revision

    async def progress(self, mid: str) -> MigrationProgress | None:
        got = await self._get(MigrationProgress, self.keys.migration_progress(mid))
        return got[0] if got else None

    async def cancel_requested(self, mid: str) -> bool:
        return await self.store.get(self.keys.migration_cancel(mid)) is not None

    async def all_of(self, cls: type[T], prefix: str, leaf: str) -> dict[str, T]:
        """name -> decoded value for every ``<prefix><name>/<leaf>`` key (or ``<prefix><name>``
        when ``leaf`` is empty); malformed values are skipped."""
        entries, _ = await self.store.get_prefix(prefix)
        out: dict[str, T] = {}
        for e in entries:
            rest = e.key[len(prefix):]
            name, _, tail = rest.partition("/")
            if tail != leaf:
                continue
            try:
                out[name] = codec.decode(cls, e.value)
            except InvalidSpec:
                continue
        return out

"""The store contract against MemoryStore, and what only the fake has (clock, faults)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from ferry.model.errors import StoreError
from ferry.store.base import ClusterStore, EventType
from ferry.store.memory import ManualClock, MemoryStore
from tests.store_contract import StoreContract, collect


@dataclass
class MemoryHarness:
    store: MemoryStore
    clock: ManualClock
    prefix: str = "/test/"
    ttl: int = 2
    expiry_slack: float = 0.0

    async def elapse(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.store.expire_leases()

    async def open_watches(self) -> int:
        return self.store.watcher_count


@pytest.fixture
async def h() -> AsyncIterator[MemoryHarness]:
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    yield MemoryHarness(store, clock)
    await store.close()


class TestMemoryStore(StoreContract):
    pass


def test_memory_store_is_a_cluster_store() -> None:
    store: ClusterStore = MemoryStore()
    assert store is not None


async def test_leases_expire_by_themselves_on_the_real_clock() -> None:
    store = MemoryStore()
    try:
        lease = await store.grant_lease(1)
        revision = await store.put("/k", "v", lease=lease)
        # Nothing calls the store after this: the background sweeper must expire the lease.
        events = await collect(store.watch("/", start_revision=revision + 1), 1, timeout=3)
        assert [(e.type, e.key) for e in events] == [(EventType.DELETE, "/k")]
        assert store.lease_ids() == []
    finally:
        await store.close()


async def test_a_new_shorter_lease_wakes_the_sweeper() -> None:
    store = MemoryStore()
    try:
        await store.grant_lease(60)
        short = await store.grant_lease(1)
        await asyncio.sleep(1.3)
        assert store.lease_ids() != [] and short not in store.lease_ids()
    finally:
        await store.close()


async def test_expire_leases_reports_what_expired() -> None:
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    first, second = await store.grant_lease(5), await store.grant_lease(10)
    clock.advance(5)
    assert store.expire_leases() == [first]
    assert store.lease_ids() == [second]
    clock.advance(4.9)
    assert await store.keepalive(second) == 10


async def test_unreachable_store_fails_calls_and_watches() -> None:
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    lease = await store.grant_lease(5)
    await store.put("/k", "v", lease=lease)
    watch = store.watch("/", start_revision=0)
    task = asyncio.create_task(collect(watch, 1))
    await asyncio.sleep(0.01)
    store.set_reachable(False)
    with pytest.raises(StoreError):
        await task
    with pytest.raises(StoreError, match="unreachable"):
        await store.get("/k")
    with pytest.raises(StoreError):
        await collect(store.watch("/", start_revision=0), 1)
    clock.advance(6)  # the lease runs out while we cannot reach the store
    store.set_reachable(True)
    assert await store.get("/k") is None
    assert store.watcher_count == 0


async def test_compact_bounds() -> None:
    store = MemoryStore(clock=ManualClock())
    revision = await store.put("/k", "v")
    with pytest.raises(StoreError):
        await store.compact(revision + 1)
    await store.compact(revision)
    with pytest.raises(StoreError):
        await store.compact(revision)


async def test_calls_interleave_like_network_round_trips() -> None:
    store = MemoryStore(clock=ManualClock())
    order: list[str] = []

    async def writer(name: str) -> None:
        order.append(f"{name} start")
        await store.put(f"/{name}", name)
        order.append(f"{name} done")

    await asyncio.gather(writer("a"), writer("b"))
    assert order == ["a start", "b start", "a done", "b done"]


def test_manual_clock_only_goes_forward() -> None:
    clock = ManualClock(start=5)
    clock.advance(1.5)
    assert clock() == 6.5
    with pytest.raises(ValueError):
        clock.advance(-1)

"""The ClusterStore contract as tests, run against every implementation.

``StoreContract`` is not collected by itself (its name does not start with Test); a test
module subclasses it and provides the fixture ``h``, a Harness around a fresh store:
tests/unit/test_store_contract.py for MemoryStore, tests/lab/test_store_etcd.py for etcd.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, cast

import pytest

from ferry.model.errors import Compacted, Conflict, LeaseExpired, StoreError
from ferry.store import ops
from ferry.store.base import (
    ClusterStore,
    Compare,
    Delete,
    EventType,
    Op,
    Put,
    Target,
    TxnOp,
    TxnResult,
    WatchEvent,
)


class ContractStore(ClusterStore, Protocol):
    """What the tests need beyond the protocol: both stores can compact."""

    async def compact(self, revision: int) -> None: ...


class Harness(Protocol):
    store: ContractStore
    prefix: str  # unique to the test: every key it writes lies under it
    ttl: int  # the shortest lease TTL the store grants as asked
    expiry_slack: float  # how long after its deadline the store may take to expire a lease

    async def elapse(self, seconds: float) -> None:
        """Let ``seconds`` pass for the store's leases."""
        ...

    async def open_watches(self) -> int:
        """How many watches the store is serving."""
        ...


async def current_revision(h: Harness) -> int:
    return (await h.store.get_prefix(h.prefix))[1]


async def collect(
    watch: AsyncIterator[list[WatchEvent]], count: int, *, timeout: float = 5.0
) -> list[WatchEvent]:
    """The first ``count`` events of a watch, flattened over its batches."""
    events: list[WatchEvent] = []

    async def run() -> None:
        async for batch in watch:
            events.extend(batch)
            if len(events) >= count:
                return

    await asyncio.wait_for(run(), timeout)
    return events


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 5.0, every: float = 0.05
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        gc.collect()
        await asyncio.sleep(every)


def summary(events: list[WatchEvent], h: Harness) -> list[tuple[str, str, str]]:
    return [(e.type.value, e.key.removeprefix(h.prefix), e.value) for e in events]


@dataclass(frozen=True)
class Doc:
    name: str
    count: int


class StoreContract:
    # -- keys

    async def test_put_get(self, h: Harness) -> None:
        key = h.prefix + "a"
        assert await h.store.get(key) is None
        revision = await h.store.put(key, "one")
        entry = await h.store.get(key)
        assert entry is not None
        assert (entry.key, entry.value, entry.lease) == (key, "one", 0)
        assert entry.create_revision == entry.mod_revision == revision
        assert entry.version == 1

    async def test_overwrite_keeps_create_revision(self, h: Harness) -> None:
        key = h.prefix + "a"
        first = await h.store.put(key, "one")
        second = await h.store.put(key, "two")
        entry = await h.store.get(key)
        assert entry is not None
        assert entry is not None and entry.value == "two"
        assert (entry.create_revision, entry.mod_revision, entry.version) == (first, second, 2)

    async def test_text_round_trips(self, h: Harness) -> None:
        values = ["", "ü ß 東京 🚀", '{"a": [1, 2]}\n\ttab', "x" * 100_000]
        for i, value in enumerate(values):
            key = f"{h.prefix}ключ/{i}"
            await h.store.put(key, value)
            entry = await h.store.get(key)
            assert entry is not None and entry.value == value and entry.key == key

    async def test_get_prefix_sorted_and_bounded(self, h: Harness) -> None:
        for key in ["b/2", "b/1", "b/10", "b", "bb", "a/1", "c/1"]:
            await h.store.put(h.prefix + key, key)
        entries, revision = await h.store.get_prefix(h.prefix + "b/")
        assert [e.value for e in entries] == ["b/1", "b/10", "b/2"]
        assert revision == await current_revision(h)
        assert (await h.store.get_prefix(h.prefix + "nothing/"))[0] == []

    async def test_revision_increases_by_one_per_write(self, h: Harness) -> None:
        start = await h.store.put(h.prefix + "a", "1")
        assert await h.store.put(h.prefix + "b", "1") == start + 1
        assert await h.store.delete(h.prefix + "a") == 1
        assert await current_revision(h) == start + 2
        assert await h.store.delete(h.prefix + "a") == 0  # deletes nothing: no new revision
        assert await current_revision(h) == start + 2
        result = await h.store.txn([], [Put(h.prefix + "c", "1"), Put(h.prefix + "d", "1")])
        assert result.revision == start + 3
        nothing = await h.store.txn([], [Delete(h.prefix + "absent")])
        assert nothing.succeeded and nothing.revision == start + 3

    async def test_delete_prefix(self, h: Harness) -> None:
        for key in ["d/1", "d/2", "d/x/3", "d", "e/1"]:
            await h.store.put(h.prefix + key, "v")
        assert await h.store.delete(h.prefix + "d/", prefix=True) == 3
        entries, _ = await h.store.get_prefix(h.prefix)
        assert [e.key.removeprefix(h.prefix) for e in entries] == ["d", "e/1"]
        assert await h.store.delete(h.prefix + "d/", prefix=True) == 0

    # -- transactions

    async def test_txn_success_branch_applies_atomically(self, h: Harness) -> None:
        a, b, c = (h.prefix + k for k in "abc")
        await h.store.put(c, "old")
        result = await h.store.txn(
            [Compare.absent(a), Compare.value_is(c, "old")],
            [Put(a, "A"), Put(b, "B"), Delete(c)],
            [Put(a, "failed")],
        )
        assert result.succeeded
        got_a, got_b = await h.store.get(a), await h.store.get(b)
        assert got_a is not None and got_b is not None
        assert (got_a.value, got_b.value) == ("A", "B")
        assert got_a.mod_revision == got_b.mod_revision == result.revision
        assert await h.store.get(c) is None

    async def test_txn_failure_branch(self, h: Harness) -> None:
        a, b = h.prefix + "a", h.prefix + "b"
        await h.store.put(a, "exists")
        result = await h.store.txn([Compare.absent(a)], [Put(b, "success")], [Put(b, "failure")])
        assert not result.succeeded
        got = await h.store.get(b)
        assert got is not None and got.value == "failure" and got.mod_revision == result.revision
        empty = await h.store.txn([Compare.absent(a)], [Put(b, "success")])
        assert not empty.succeeded and empty.revision == result.revision
        assert (await h.store.get(b)) == got

    async def test_txn_compare_targets(self, h: Harness) -> None:
        key, missing = h.prefix + "k", h.prefix + "missing"
        await h.store.put(key, "v1")
        await h.store.put(key, "v2")
        entry = await h.store.get(key)
        assert entry is not None

        async def holds(*compares: Compare) -> bool:
            return (await h.store.txn(list(compares), [])).succeeded

        assert await holds(Compare(key, Target.VERSION, Op.EQUAL, 2))
        assert await holds(Compare(key, Target.MOD, Op.EQUAL, entry.mod_revision))
        assert await holds(Compare(key, Target.CREATE, Op.LESS, entry.mod_revision))
        assert await holds(Compare(key, Target.VALUE, Op.GREATER, "v1"))
        assert await holds(Compare(key, Target.VALUE, Op.NOT_EQUAL, "v1"))
        assert await holds(Compare(key, Target.LEASE, Op.EQUAL, 0))
        assert not await holds(Compare(key, Target.VERSION, Op.GREATER, 2))
        assert not await holds(Compare.exists(key), Compare.value_is(key, "v1"))
        assert await holds(
            Compare.unchanged(missing, 0), Compare(missing, Target.LEASE, Op.EQUAL, 0)
        )
        # etcd: a VALUE compare on a missing key fails whatever the op.
        assert not await holds(Compare(missing, Target.VALUE, Op.NOT_EQUAL, "x"))
        assert not await holds(Compare.value_is(missing, ""))

    async def test_txn_rejects_a_key_written_twice(self, h: Harness) -> None:
        key = h.prefix + "k"
        before = await current_revision(h)
        branches: list[list[TxnOp]] = [
            [Put(key, "1"), Put(key, "2")],
            [Put(key, "1"), Delete(h.prefix, prefix=True)],
        ]
        for ops_ in branches:
            with pytest.raises(StoreError) as caught:
                await h.store.txn(
                    [Compare.absent(h.prefix + "other")], [Put(h.prefix + "x", "")], ops_
                )
            assert not isinstance(caught.value, LeaseExpired)
        assert await current_revision(h) == before

    async def test_create_if_absent(self, h: Harness) -> None:
        key = h.prefix + "k"
        revision = await ops.create(h.store, key, "first")
        assert revision is not None
        assert await ops.create(h.store, key, "second") is None
        entry = await h.store.get(key)
        assert entry is not None and (entry.value, entry.mod_revision) == ("first", revision)

    async def test_cas(self, h: Harness) -> None:
        key = h.prefix + "k"
        assert await ops.cas(h.store, key, "x", mod_revision=5) is None  # absent: mod is 0
        created = await ops.cas(h.store, key, "v1", mod_revision=0)
        assert created is not None
        assert await ops.cas(h.store, key, "v1b", mod_revision=0) is None
        updated = await ops.cas(h.store, key, "v2", mod_revision=created)
        assert updated is not None
        assert await ops.cas(h.store, key, "stale", mod_revision=created) is None
        assert not await ops.delete_if(h.store, key, mod_revision=created)
        assert await ops.delete_if(h.store, key, mod_revision=updated)
        assert await h.store.get(key) is None

    async def test_update_races(self, h: Harness) -> None:
        key = h.prefix + "counter"

        def bump(value: str | None) -> str:
            return str(int(value or "0") + 1)

        results = await asyncio.gather(
            *(ops.update(h.store, key, bump, attempts=50) for _ in range(8))
        )
        entry = await h.store.get(key)
        assert entry is not None and entry.value == "8" and entry.version == 8
        assert sorted(r.value for r in results if r) == [str(i) for i in range(1, 9)]
        assert entry in results

    async def test_update_delete_and_json(self, h: Harness) -> None:
        key = h.prefix + "doc"
        written = await ops.update_json(h.store, key, lambda d: d or Doc("a", 1), cls=Doc)
        assert written == Doc("a", 1)
        bumped = await ops.update_json(
            h.store, key, lambda d: d and replace(d, count=d.count + 1), cls=Doc
        )
        assert bumped == Doc("a", 2)
        assert await ops.update(h.store, key, lambda v: None) is None
        assert await h.store.get(key) is None
        assert await ops.update(h.store, key, lambda v: None) is None

    async def test_update_gives_up(self, h: Harness) -> None:
        key = h.prefix + "k"
        await h.store.put(key, "0")
        store = _Meddler(h.store, key)
        with pytest.raises(Conflict):
            await ops.update(cast(ClusterStore, store), key, lambda v: "mine", attempts=3)
        assert store.meddled == 3
        entry = await h.store.get(key)
        assert entry is not None and entry.value == "theirs"

    # -- leases

    async def test_lease_keys_deleted_on_revoke(self, h: Harness) -> None:
        lease = await h.store.grant_lease(30)
        key, other = h.prefix + "leased", h.prefix + "plain"
        await h.store.put(key, "v", lease=lease)
        await h.store.put(other, "v")
        entry = await h.store.get(key)
        assert entry is not None and entry.lease == lease
        await h.store.revoke_lease(lease)
        assert await h.store.get(key) is None
        assert await h.store.get(other) is not None
        await h.store.revoke_lease(lease)  # already gone: not an error
        with pytest.raises(LeaseExpired):
            await h.store.keepalive(lease)

    async def test_put_with_dead_lease_changes_nothing(self, h: Harness) -> None:
        lease = await h.store.grant_lease(30)
        key = h.prefix + "k"
        await h.store.put(key, "before")
        await h.store.revoke_lease(lease)
        before = await current_revision(h)
        with pytest.raises(LeaseExpired):
            await h.store.put(key, "after", lease=lease)
        with pytest.raises(LeaseExpired):
            await h.store.txn([], [Put(h.prefix + "other", "x"), Put(key, "after", lease)])
        with pytest.raises(LeaseExpired):
            await ops.create(h.store, h.prefix + "new", "x", lease=lease)
        entry = await h.store.get(key)
        assert entry is not None and entry.value == "before"
        assert await h.store.get(h.prefix + "other") is None
        assert await current_revision(h) == before
        # Only the branch taken needs a live lease.
        assert (await h.store.txn([], [Put(key, "ok")], [Put(key, "x", lease)])).succeeded

    async def test_put_without_lease_detaches_key(self, h: Harness) -> None:
        lease = await h.store.grant_lease(30)
        key = h.prefix + "k"
        await h.store.put(key, "leased", lease=lease)
        await h.store.put(key, "plain")
        await h.store.revoke_lease(lease)
        entry = await h.store.get(key)
        assert entry is not None and entry.value == "plain" and entry.lease == 0

    async def test_lease_expiry(self, h: Harness) -> None:
        lease = await h.store.grant_lease(h.ttl)
        key = h.prefix + "k"
        await h.store.put(key, "v", lease=lease)
        await h.elapse(h.ttl + h.expiry_slack)
        assert await h.store.get(key) is None
        with pytest.raises(LeaseExpired):
            await h.store.keepalive(lease)
        with pytest.raises(LeaseExpired):
            await h.store.put(key, "again", lease=lease)

    async def test_keepalive_renews(self, h: Harness) -> None:
        lease = await h.store.grant_lease(h.ttl)
        key = h.prefix + "k"
        await h.store.put(key, "v", lease=lease)
        for _ in range(3):
            await h.elapse(h.ttl * 0.5)
            assert await h.store.keepalive(lease) >= h.ttl
        await h.elapse(h.ttl * 0.75)  # 2.25 TTL after the grant, 0.75 after the last renewal
        assert await h.store.get(key) is not None
        await h.store.revoke_lease(lease)

    # -- watch

    async def test_watch_from_revision_in_order(self, h: Harness) -> None:
        p = h.prefix
        start = await h.store.put(p + "w/a", "1")
        await h.store.put(h.prefix + "outside", "x")
        await h.store.txn([], [Put(p + "w/b", "2"), Put(p + "w/c", "3")])
        await h.store.delete(p + "w/a")
        await h.store.put(p + "w/b", "22")
        await h.store.delete(p + "w/", prefix=True)
        events = await collect(h.store.watch(p + "w/", start_revision=start), 7)
        assert summary(events, h) == [
            ("PUT", "w/a", "1"),
            ("PUT", "w/b", "2"),
            ("PUT", "w/c", "3"),
            ("DELETE", "w/a", ""),
            ("PUT", "w/b", "22"),
            ("DELETE", "w/b", ""),
            ("DELETE", "w/c", ""),
        ]
        revisions = [e.mod_revision for e in events]
        assert revisions == [
            start,
            start + 2,
            start + 2,
            start + 3,
            start + 4,
            start + 5,
            start + 5,
        ]
        assert events[4].create_revision == start + 2

    async def test_watch_live_and_from_now(self, h: Harness) -> None:
        key = h.prefix + "k"
        await h.store.put(key, "before")
        base = await h.open_watches()
        task = asyncio.create_task(collect(h.store.watch(h.prefix, start_revision=0), 2))
        await eventually(lambda: _opened(h, base + 1))
        revision = await h.store.put(key, "live")
        await h.store.delete(key)
        events = await task
        assert summary(events, h) == [("PUT", "k", "live"), ("DELETE", "k", "")]
        assert [e.mod_revision for e in events] == [revision, revision + 1]

    async def test_watch_sees_lease_expiry(self, h: Harness) -> None:
        start = await current_revision(h) + 1
        lease = await h.store.grant_lease(h.ttl)
        await h.store.put(h.prefix + "b", "v", lease=lease)
        await h.store.put(h.prefix + "a", "v", lease=lease)
        await h.elapse(h.ttl + h.expiry_slack)
        events = await collect(h.store.watch(h.prefix, start_revision=start), 4)
        assert summary(events, h) == [
            ("PUT", "b", "v"),
            ("PUT", "a", "v"),
            ("DELETE", "a", ""),  # a lease's keys go in key order, at one revision
            ("DELETE", "b", ""),
        ]
        assert events[2].mod_revision == events[3].mod_revision == start + 2

    async def test_watch_future_revision(self, h: Harness) -> None:
        now = await current_revision(h)
        task = asyncio.create_task(collect(h.store.watch(h.prefix, start_revision=now + 2), 1))
        await h.store.put(h.prefix + "skipped", "1")
        await h.store.put(h.prefix + "seen", "2")
        events = await task
        assert summary(events, h) == [("PUT", "seen", "2")]

    async def test_watch_compacted(self, h: Harness) -> None:
        first = await h.store.put(h.prefix + "k", "1")
        await h.store.put(h.prefix + "k", "2")
        third = await h.store.put(h.prefix + "k", "3")
        await h.store.compact(third)
        for start in (first, third - 1):
            with pytest.raises(Compacted):
                await collect(h.store.watch(h.prefix, start_revision=start), 1)
        events = await collect(h.store.watch(h.prefix, start_revision=third), 1)
        assert summary(events, h) == [("PUT", "k", "3")]

    async def test_concurrent_watchers(self, h: Harness) -> None:
        start = await current_revision(h) + 1
        tasks = [
            asyncio.create_task(collect(h.store.watch(h.prefix, start_revision=start), 5))
            for _ in range(4)
        ]
        for i in range(5):
            await h.store.put(f"{h.prefix}k{i}", str(i))
        results = await asyncio.gather(*tasks)
        for events in results:
            assert [e.value for e in events] == ["0", "1", "2", "3", "4"]

    async def test_watch_closes_when_cancelled(self, h: Harness) -> None:
        base = await h.open_watches()
        task = asyncio.create_task(
            collect(h.store.watch(h.prefix, start_revision=0), 99, timeout=60)
        )
        await eventually(lambda: _opened(h, base + 1))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: _opened(h, base))

    async def test_watch_closes_when_consumer_stops(self, h: Harness) -> None:
        base = await h.open_watches()
        start = await h.store.put(h.prefix + "k", "1")
        async for batch in h.store.watch(h.prefix, start_revision=start):
            assert batch[0].type is EventType.PUT
            break
        await eventually(lambda: _opened(h, base))

    async def test_close_ends_watches_and_calls(self, h: Harness) -> None:
        base = await h.open_watches()
        task = asyncio.create_task(collect(h.store.watch(h.prefix, start_revision=0), 1))
        await eventually(lambda: _opened(h, base + 1))
        await h.store.close()
        with pytest.raises(StoreError, match="closed"):
            await task
        with pytest.raises(StoreError, match="closed"):
            await h.store.put(h.prefix + "k", "v")
        await h.store.close()  # twice is fine

    async def test_status(self, h: Harness) -> None:
        revision = await h.store.put(h.prefix + "k", "v")
        status = await h.store.status()
        assert status.revision == revision
        assert status.version


class _Meddler:
    """A store where another writer always wins: it writes the key before every txn."""

    def __init__(self, store: ClusterStore, key: str) -> None:
        self._store = store
        self._key = key
        self.meddled = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[TxnOp], failure: Sequence[TxnOp] = ()
    ) -> TxnResult:
        self.meddled += 1
        await self._store.put(self._key, "theirs")
        return await self._store.txn(compares, success, failure)


async def _opened(h: Harness, count: int) -> bool:
    return await h.open_watches() == count

"""An in-memory ClusterStore with etcd's semantics, the fake behind every unit test.

It copies what etcd 3.4 does where callers could notice (checked against 3.4.23):
- The store starts at revision 1. A write that changes nothing (deleting an absent key, a
  txn whose ops change nothing, revoking a lease without keys) takes no new revision.
- A txn checks its ops before running them, in both branches: the same key put twice, or
  put and deleted, is an error (StoreError). A dead lease is checked only in the branch taken.
- A VALUE compare on a missing key is false whatever its op (NOT_EQUAL too); the other
  targets see a missing key as 0.
- A put without a lease detaches the key from its old lease.
- A lease revoke or expiry deletes its keys at one revision, in key order. Delete events
  carry no value and create_revision 0.
- A watch from 0 or from a future revision starts after the current one; a watch from before
  the compacted revision raises Compacted; events come in batches of whole revisions.
- Every call yields to the event loop once before it runs, as a network round trip would,
  so that tests see the interleavings real callers will meet.

For tests: lease time comes from an injectable clock (``ManualClock``), ``expire_leases``
applies it; ``set_reachable(False)`` makes every call fail like an unreachable etcd.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ferry.model.errors import Compacted, LeaseExpired, StoreError
from ferry.store.base import (
    Compare,
    Delete,
    Entry,
    EventType,
    Op,
    Put,
    StoreStatus,
    Target,
    TxnOp,
    TxnResult,
    WatchEvent,
)

_OPS: dict[Op, Callable[[int], bool]] = {
    Op.EQUAL: lambda sign: sign == 0,
    Op.NOT_EQUAL: lambda sign: sign != 0,
    Op.GREATER: lambda sign: sign > 0,
    Op.LESS: lambda sign: sign < 0,
}


class ManualClock:
    """A monotonic clock for tests: time moves only by ``advance``."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self._now += seconds


@dataclass
class _Lease:
    ttl: int
    deadline: float
    keys: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Watcher:
    prefix: str
    first_revision: int
    wakeup: asyncio.Event
    pending: list[WatchEvent] = field(default_factory=list)
    error: StoreError | None = None

    def offer(self, events: Iterable[WatchEvent]) -> None:
        mine = [
            e
            for e in events
            if e.mod_revision >= self.first_revision and e.key.startswith(self.prefix)
        ]
        if mine:
            self.pending.extend(mine)
            self.wakeup.set()

    def fail(self, error: StoreError) -> None:
        self.error = error
        self.wakeup.set()


class MemoryStore:
    """See the module docstring.

    ``auto_expire``: expire leases in a background task at their deadlines, as etcd does
    without being asked. None means: only when ``clock`` is the real monotonic clock; with a
    ManualClock the test moves time and calls ``expire_leases`` itself (any other call of
    the store also expires what is due first).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        auto_expire: bool | None = None,
    ) -> None:
        self._clock = clock
        self._auto_expire = clock is time.monotonic if auto_expire is None else auto_expire
        self._kv: dict[str, Entry] = {}
        self._keys: list[str] = []  # sorted, for prefix reads
        self._revision = 1
        self._history: list[WatchEvent] = []
        self._compacted = 0
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(0x7E57_0000_0001)
        self._watchers: set[_Watcher] = set()
        self._reachable = True
        self._closed = False
        self._sweeper: asyncio.Task[None] | None = None
        self._sweeper_wakeup: asyncio.Event | None = None

    # -- for tests

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def watcher_count(self) -> int:
        """Open watches: lets tests check that a stopped consumer closed its watch."""
        return len(self._watchers)

    def lease_ids(self) -> list[int]:
        return sorted(self._leases)

    def set_reachable(self, reachable: bool) -> None:
        """Simulate losing (False) and regaining the connection to the store.

        While unreachable every call raises StoreError and open watches end with it. Leases
        keep running on the store's clock meanwhile, as they would on a real etcd.
        """
        self._reachable = reachable
        if not reachable:
            for watcher in self._watchers:
                watcher.fail(StoreError("memory store unreachable (simulated)"))

    def expire_leases(self) -> list[int]:
        """Revoke every lease whose deadline has passed on the clock; returns their ids."""
        now = self._clock()
        due = sorted((lease.deadline, id_) for id_, lease in self._leases.items())
        expired = [id_ for deadline, id_ in due if deadline <= now]
        for id_ in expired:
            self._revoke(id_)
        return expired

    async def compact(self, revision: int) -> None:
        """Forget history before ``revision``; watches from earlier raise Compacted."""
        await self._enter()
        if revision > self._revision:
            raise StoreError(f"memory store: revision {revision} is in the future")
        if revision <= self._compacted:
            raise StoreError(f"memory store: revision {revision} is already compacted")
        self._compacted = revision
        start = bisect.bisect_left(self._history, revision, key=lambda e: e.mod_revision)
        del self._history[:start]

    # -- keys

    async def get(self, key: str) -> Entry | None:
        await self._enter()
        return self._kv.get(key)

    async def get_prefix(self, prefix: str) -> tuple[list[Entry], int]:
        await self._enter()
        return [self._kv[k] for k in self._under(prefix)], self._revision

    async def put(self, key: str, value: str, *, lease: int = 0) -> int:
        await self._enter()
        ops = [Put(key, value, lease)]
        _check_ops(ops)
        self._check_leases(ops)
        return self._apply(ops)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        await self._enter()
        ops = [Delete(key, prefix)]
        _check_ops(ops)
        count = len(self._matching(ops[0]))
        self._apply(ops)
        return count

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult:
        await self._enter()
        _check_ops(success)
        _check_ops(failure)
        succeeded = all(self._holds(c) for c in compares)
        ops = success if succeeded else failure
        self._check_leases(ops)
        return TxnResult(succeeded=succeeded, revision=self._apply(ops))

    # -- leases

    async def grant_lease(self, ttl: int) -> int:
        await self._enter()
        ttl = max(ttl, 1)
        lease = next(self._lease_ids)
        self._leases[lease] = _Lease(ttl=ttl, deadline=self._clock() + ttl)
        self._start_sweeper()
        return lease

    async def keepalive(self, lease: int) -> int:
        await self._enter()
        found = self._leases.get(lease)
        if found is None:
            raise LeaseExpired(f"lease {lease:x} has expired")
        found.deadline = self._clock() + found.ttl
        return found.ttl

    async def revoke_lease(self, lease: int) -> None:
        await self._enter()
        if lease in self._leases:
            self._revoke(lease)

    # -- cluster

    async def status(self) -> StoreStatus:
        await self._enter()
        size = sum(len(e.key) + len(e.value) for e in self._kv.values())
        return StoreStatus(
            endpoint="memory",
            version="memory",
            revision=self._revision,
            leader=1,
            member=1,
            db_size=size,
        )

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for watcher in self._watchers:
            watcher.fail(StoreError("memory store closed"))

    # -- watch

    async def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        await self._enter()
        watcher = self._register(prefix, start_revision)
        try:
            while True:
                if not watcher.pending and watcher.error is None:
                    watcher.wakeup.clear()
                    await watcher.wakeup.wait()
                if watcher.error is not None:
                    raise watcher.error
                batch, watcher.pending = watcher.pending, []
                yield batch
        finally:
            self._watchers.discard(watcher)

    def _register(self, prefix: str, start_revision: int) -> _Watcher:
        if 0 < start_revision < self._compacted:
            raise Compacted(
                f"memory store: watch from revision {start_revision} is compacted "
                f"(history starts at {self._compacted})"
            )
        first = start_revision if start_revision > 0 else self._revision + 1
        watcher = _Watcher(prefix, max(first, 1), asyncio.Event())
        start = bisect.bisect_left(self._history, first, key=lambda e: e.mod_revision)
        watcher.offer(self._history[start:])
        self._watchers.add(watcher)
        return watcher

    # -- the machine

    async def _enter(self) -> None:
        await asyncio.sleep(0)
        if self._closed:
            raise StoreError("memory store closed")
        if not self._reachable:
            raise StoreError("memory store unreachable (simulated)")
        self.expire_leases()

    def _under(self, prefix: str) -> list[str]:
        start = bisect.bisect_left(self._keys, prefix)
        end = start
        while end < len(self._keys) and self._keys[end].startswith(prefix):
            end += 1
        return self._keys[start:end]

    def _matching(self, op: Delete) -> list[str]:
        if op.prefix:
            return self._under(op.key)
        return [op.key] if op.key in self._kv else []

    def _holds(self, compare: Compare) -> bool:
        entry = self._kv.get(compare.key)
        if compare.target is Target.VALUE:
            if not isinstance(compare.value, str):
                raise TypeError(f"a VALUE compare needs a str, got {compare.value!r}")
            if entry is None:
                return False
            return _OPS[compare.op](_sign(entry.value, compare.value))
        if not isinstance(compare.value, int):
            raise TypeError(f"a {compare.target.value} compare needs an int, got {compare.value!r}")
        actual = _number(entry, compare.target)
        return _OPS[compare.op]((actual > compare.value) - (actual < compare.value))

    def _check_leases(self, ops: Sequence[TxnOp]) -> None:
        for op in ops:
            if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                raise LeaseExpired(f"memory store: lease {op.lease:x} not found")

    def _apply(self, ops: Sequence[TxnOp]) -> int:
        """Run checked ops at one new revision, if they change anything."""
        revision = self._revision + 1
        events: list[WatchEvent] = []
        for op in ops:
            if isinstance(op, Put):
                events.append(self._put_at(op, revision))
            else:
                events.extend(self._delete_at(self._matching(op), revision))
        if events:
            self._revision = revision
            self._history.extend(events)
            for watcher in self._watchers:
                watcher.offer(events)
        return self._revision

    def _put_at(self, op: Put, revision: int) -> WatchEvent:
        old = self._kv.get(op.key)
        if old is None:
            bisect.insort(self._keys, op.key)
        elif old.lease in self._leases:
            self._leases[old.lease].keys.discard(op.key)
        if op.lease:
            self._leases[op.lease].keys.add(op.key)
        created = old.create_revision if old else revision
        version = old.version + 1 if old else 1
        self._kv[op.key] = Entry(op.key, op.value, created, revision, version, op.lease)
        return WatchEvent(EventType.PUT, op.key, op.value, revision, created)

    def _delete_at(self, keys: Iterable[str], revision: int) -> list[WatchEvent]:
        events = []
        for key in sorted(keys):
            old = self._kv.pop(key)
            del self._keys[bisect.bisect_left(self._keys, key)]
            if old.lease in self._leases:
                self._leases[old.lease].keys.discard(key)
            events.append(WatchEvent(EventType.DELETE, key, "", revision, 0))
        return events

    def _revoke(self, lease: int) -> None:
        keys = self._leases.pop(lease).keys
        self._apply([Delete(key) for key in sorted(keys)])

    def _start_sweeper(self) -> None:
        if not self._auto_expire:
            return
        if self._sweeper is None or self._sweeper.done():
            self._sweeper_wakeup = asyncio.Event()
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        elif self._sweeper_wakeup is not None:
            self._sweeper_wakeup.set()  # a new lease may be due before the one it waits for

    async def _sweep(self) -> None:
        wakeup = self._sweeper_wakeup
        assert wakeup is not None
        while not self._closed:
            self.expire_leases()
            if not self._leases:
                return
            delay = min(lease.deadline for lease in self._leases.values()) - self._clock()
            wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout=max(delay, 0.0))


def _sign(actual: str, expected: str) -> int:
    # Python orders str by code point, which is the UTF-8 byte order etcd compares in.
    return (actual > expected) - (actual < expected)


def _number(entry: Entry | None, target: Target) -> int:
    if entry is None:
        return 0
    if target is Target.MOD:
        return entry.mod_revision
    if target is Target.CREATE:
        return entry.create_revision
    if target is Target.VERSION:
        return entry.version
    return entry.lease


def _check_ops(ops: Sequence[TxnOp]) -> None:
    """etcd's checks of a txn branch: keys given, no key put twice or put and deleted."""
    puts: set[str] = set()
    for op in ops:
        if not op.key and not (isinstance(op, Delete) and op.prefix):
            raise StoreError("memory store: key is not provided")
        if isinstance(op, Put):
            if op.key in puts:
                raise StoreError("memory store: duplicate key given in txn request")
            puts.add(op.key)
    for op in ops:
        if isinstance(op, Delete) and any(
            key.startswith(op.key) if op.prefix else key == op.key for key in puts
        ):
            raise StoreError("memory store: duplicate key given in txn request")

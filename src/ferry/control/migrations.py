"""Migration requests: start, cancel, list, show, follow."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

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
from ferry.store.base import Compare, EventType, Put, WatchEvent


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
    new_owner = owner.amend(rev, migration=mid, target=to)
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


async def follow(cl: ClusterClient, mid: str, *, timeout: float = 3600,
                 settle_s: float = 15) -> AsyncIterator[MigrationView]:
    """Views of the migration as it changes (from a watch on its keys), until it has settled,
    or ``settle_s`` after it ended if the target never confirms its clean-up."""
    deadline = time.monotonic() + timeout
    entries, revision = await cl.store.get_prefix(cl.keys.migration_prefix(mid))
    if not any(e.key == cl.keys.migration_record(mid) for e in entries):
        raise NotFound(f"migration {mid!r} does not exist")
    view = _view_of({e.key: e.value for e in entries}, cl, mid)
    yield view
    if view.record.settled:
        return
    values = {e.key: e.value for e in entries}
    stream = cl.store.watch(cl.keys.migration_prefix(mid), start_revision=revision + 1)
    try:
        async for v in _follow_stream(cl, mid, stream, values, view, deadline=deadline,
                                      settle_s=settle_s):
            yield v
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


async def _follow_stream(cl: ClusterClient, mid: str, stream: AsyncIterator[list[WatchEvent]],
                         values: dict[str, str], view: MigrationView, *, deadline: float,
                         settle_s: float) -> AsyncIterator[MigrationView]:
    ended_at = time.monotonic() if view.record.phase.terminal else None
    while time.monotonic() < deadline:
        wait = deadline - time.monotonic()
        if ended_at is not None:
            wait = min(wait, settle_s - (time.monotonic() - ended_at))
        if wait <= 0:
            return
        try:
            batch = await asyncio.wait_for(anext(stream), wait)
        except TimeoutError:
            continue
        except StopAsyncIteration:
            return
        for ev in batch:
            if ev.type is EventType.DELETE:
                values.pop(ev.key, None)
            else:
                values[ev.key] = ev.value
        view = _view_of(values, cl, mid)
        yield view
        if view.record.phase.terminal and ended_at is None:
            ended_at = time.monotonic()
        if view.record.settled:
            return
    raise Timeout(f"migration {mid} did not finish in time")


def _view_of(values: dict[str, str], cl: ClusterClient, mid: str) -> MigrationView:
    raw = values.get(cl.keys.migration_record(mid))
    if raw is None:
        raise NotFound(f"migration {mid!r} was deleted")
    progress = values.get(cl.keys.migration_progress(mid))
    return MigrationView(
        record=codec.decode(MigrationRecord, raw),
        progress=codec.decode(MigrationProgress, progress) if progress else None,
        cancel_requested=cl.keys.migration_cancel(mid) in values,
    )

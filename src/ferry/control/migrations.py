"""Migration requests (one, many, a node drain), cancel, the queue and its limits, list,
show, follow. Requests are queued; the elected cluster manager starts them
(``migration/scheduler.py``)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, replace

from ferry.control.client import ClusterClient
from ferry.control.nodes import node_loads
from ferry.ha.placement import NodeLoad, check_fits, choose_node
from ferry.migration import scheduler
from ferry.model import codec
from ferry.model.cluster import ClusterConfig
from ferry.model.errors import Conflict, InvalidSpec, NotFound, Timeout, Unavailable
from ferry.model.migration import (
    MigrationOptions,
    MigrationPhase,
    MigrationProgress,
    MigrationRecord,
)
from ferry.model.policy import MigrationLimits
from ferry.model.vm import Owner, Power, VmSpec, VmState
from ferry.store.base import Compare, EventType, Put, TxnOp, WatchEvent

CANCEL_BY = "user"  # the timeline's "node" of a cancel made before any node took part


@dataclass(frozen=True)
class QueuePlace:
    """Where a migration that has not started stands in the scheduler's queue."""

    position: int  # 1: next in line; 0: no longer waiting for a slot (admitted, or about to be)
    why: str


@dataclass(frozen=True)
class MigrationView:
    record: MigrationRecord
    progress: MigrationProgress | None
    cancel_requested: bool
    queue: QueuePlace | None = None


@dataclass(frozen=True)
class MigrationListing:
    record: MigrationRecord
    queue: QueuePlace | None  # while it has not started


@dataclass(frozen=True)
class Drain:
    node: str
    migrations: tuple[MigrationRecord, ...]
    already: tuple[str, ...]  # VMs that were migrating away already: left to their migration
    paused: bool  # paused by this drain (False: it was paused before)
    incoming: tuple[tuple[str, str], ...] = ()  # (VM, migration) on their way *to* the node


@dataclass(frozen=True)
class _Move:
    """One checked request: the VM, where it runs (owner record and revision), where to."""

    vm: str
    owner: Owner
    owner_rev: int
    target: str


# etcd refuses a transaction of more than 128 operations (--max-txn-ops); each request takes
# two compares and two puts.
REQUESTS_PER_TXN = 32


async def request_migration(cl: ClusterClient, vm: str, *, to: str,
                            options: MigrationOptions = MigrationOptions()) -> MigrationRecord:
    """Check (changing nothing), then queue the migration in one transaction."""
    (rec,) = await request_migrations(cl, [vm], to=to, options=options)
    return rec


async def request_migrations(cl: ClusterClient, vms: Sequence[str], *, to: str,
                             options: MigrationOptions = MigrationOptions()
                             ) -> list[MigrationRecord]:
    """Queue one migration per VM, all to ``to``; the cluster manager starts them within
    the migration limits. Every VM is checked first: if any is refused, nothing changes."""
    _check_options(options)
    if not vms:
        raise InvalidSpec("name at least one VM to migrate")
    twice = sorted(v for v, n in Counter(vms).items() if n > 1)
    if twice:
        raise InvalidSpec(f"VM {twice[0]} is named twice")
    loads = await _loads(cl)
    moves = [await _check_move(cl, vm, to=to, loads=loads) for vm in vms]
    if options.network is not None:
        await _check_network(cl, options.network, to=to)
    return await _queue(cl, moves, options=options)


async def _check_network(cl: ClusterClient, network: str, *, to: str) -> None:
    """A forced network must be one the target has (the source checks its own side, with
    the links' state, when the migration starts)."""
    target = await cl.node(to)
    names = [n.network for n in target.migration_addresses]
    if network not in names:
        raise InvalidSpec(f"{to} has no migration network {network!r}"
                          f" (it has: {', '.join(names) or 'none'})")


def _check_options(options: MigrationOptions) -> None:
    if options.max_bandwidth < 0 or options.downtime_limit_ms <= 0:
        raise InvalidSpec("bandwidth must be >= 0 and the downtime limit > 0")


async def _loads(cl: ClusterClient) -> dict[str, NodeLoad]:
    """Node loads counting the VMs already on their way to a node (inbound migrations)."""
    loads = {n.name: n for n in await node_loads(cl)}
    specs = await cl.all_of(VmSpec, cl.keys.vms, "spec")
    for name, owner in (await cl.all_of(Owner, cl.keys.vms, "owner")).items():
        if owner.migration and owner.target in loads and name in specs:
            _add(loads, owner.target, specs[name].memory_mib)
    return loads


def _add(loads: dict[str, NodeLoad], node: str, memory_mib: int) -> None:
    loads[node] = replace(loads[node], used_mib=loads[node].used_mib + memory_mib)


async def _check_move(cl: ClusterClient, vm: str, *, to: str,
                      loads: dict[str, NodeLoad]) -> _Move:
    """Raise if ``vm`` cannot go to ``to``; counts it in ``loads`` (several VMs moving to
    one node must fit together)."""
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
    if to in loads:
        check_fits(loads[to], spec.memory_mib)
        _add(loads, to, spec.memory_mib)
    status = await cl.status(vm)
    if status is None or status.node != owner.node or status.state is not VmState.RUNNING:
        raise Conflict(f"VM {vm} is not running yet on {owner.node}")
    return _Move(vm=vm, owner=owner, owner_rev=rev, target=to)


async def _queue(cl: ClusterClient, moves: Sequence[_Move], *, options: MigrationOptions,
                 first: Sequence[tuple[Compare, Put]] = ()) -> list[MigrationRecord]:
    """Write the requests, REQUESTS_PER_TXN at a time, each guarded by its owner record's
    revision; ``first`` goes with the first transaction."""
    if not moves and not first:
        return []
    now = time.time()
    made: list[MigrationRecord] = []
    for start in range(0, max(1, len(moves)), REQUESTS_PER_TXN):
        compares = [c for c, _ in first] if start == 0 else []
        ops: list[TxnOp] = [p for _, p in first] if start == 0 else []
        batch: list[MigrationRecord] = []
        for i, m in enumerate(moves[start:start + REQUESTS_PER_TXN], start=start):
            assert m.owner.node is not None
            mid = secrets.token_hex(4)
            # A microsecond apart: the queue keeps the order in which they were named.
            rec = MigrationRecord(id=mid, vm=m.vm, source=m.owner.node, target=m.target,
                                  phase=MigrationPhase.QUEUED, created_at=now + i * 1e-6,
                                  options=options)
            compares += [Compare.unchanged(cl.keys.vm_owner(m.vm), m.owner_rev),
                         Compare.absent(cl.keys.migration_record(mid))]
            ops += [Put(cl.keys.vm_owner(m.vm),
                        codec.encode(m.owner.amend(m.owner_rev, migration=mid, target=m.target))),
                    Put(cl.keys.migration_record(mid), codec.encode(rec))]
            batch.append(rec)
        if not (await cl.store.txn(compares, ops)).succeeded:
            raise _changed(moves, made=made, start=start)
        made += batch
    return made


def _changed(moves: Sequence[_Move], *, made: list[MigrationRecord], start: int) -> Conflict:
    names = ", ".join(m.vm for m in moves[start:start + REQUESTS_PER_TXN])
    if not made:
        return Conflict(f"VM {names} changed while requesting the migration; try again"
                        if len(moves) == 1 else
                        f"a VM changed while requesting the migrations ({names}); try again")
    return Conflict(f"a VM changed meanwhile: {len(made)} of {len(moves)} migrations were"
                    f" requested ({', '.join(r.vm for r in made)}), not those of {names}")


async def drain_node(cl: ClusterClient, node: str, *,
                     options: MigrationOptions = MigrationOptions()) -> Drain:
    """Pause ``node`` and queue a live migration of each of its running VMs to the best other
    node (placement counts the VMs this drain already sent there), in one transaction.
    If any VM cannot go anywhere, nothing changes."""
    _check_options(options)
    await cl.node(node)
    if not await cl.node_up(node):
        raise Unavailable(f"node {node} is down: live migration needs its VMs running")
    owners = await cl.all_of(Owner, cl.keys.vms, "owner")
    specs = await cl.all_of(VmSpec, cl.keys.vms, "spec")
    here = {n: o for n, o in owners.items() if o.node == node and o.power is Power.ON}
    already = tuple(sorted(n for n, o in here.items() if o.migration is not None))
    # A pause keeps the cluster from placing VMs, not an operator's migration to the node.
    incoming = tuple(sorted((n, o.migration) for n, o in owners.items()
                            if o.target == node and o.migration is not None))
    todo = [n for n in here if n not in already and n in specs]
    loads = await _loads(cl)
    loads[node] = replace(loads[node], paused=True)  # it will be, in the same transaction
    moves = []
    # The biggest first: they are the hardest to place.
    for name in sorted(todo, key=lambda n: (-specs[n].memory_mib, n)):
        spec = specs[name]
        try:
            to = choose_node(list(loads.values()), spec.memory_mib,
                             spec.ha.preferred_nodes if spec.ha else ())
        except Conflict as err:
            raise Conflict(f"cannot drain {node}: no node takes VM {name}: {err}") from None
        moves.append(await _check_move(cl, name, to=to, loads=loads))
    paused = await cl.store.get(cl.keys.node_paused(node)) is None
    pause = [(Compare.absent(cl.keys.node_paused(node)),
              Put(cl.keys.node_paused(node), str(time.time())))] if paused else []
    recs = await _queue(cl, moves, options=options, first=pause)
    return Drain(node=node, migrations=tuple(recs), already=already, paused=paused,
                 incoming=incoming)


async def cancel_migration(cl: ClusterClient, mid: str) -> MigrationRecord:
    """A migration still waiting in the queue ends at once (CANCELLED, the VM untouched);
    one that was admitted is asked to cancel (its source ends it). Refused once the
    migration is past its point of no return."""
    for _ in range(10):
        rec, rec_rev = await cl.migration(mid)
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
        if not scheduler.is_queued(rec):
            return await _request_cancel(cl, rec, owner_rev=owner_rev)
        ended = await _end_queued(cl, rec, rec_rev=rec_rev, owner=owner, owner_rev=owner_rev)
        if ended is not None:
            return ended
        # Admitted (or changed otherwise) meanwhile: look again.
    raise Conflict(f"migration {mid} changed too often to cancel it; try again")


async def _end_queued(cl: ClusterClient, rec: MigrationRecord, *, rec_rev: int, owner: Owner,
                      owner_rev: int) -> MigrationRecord | None:
    """One transaction, guarded by both records' revisions so that it cannot cross the
    manager admitting the migration: the record ends, the owner record forgets it."""
    why = "cancelled while queued, before it started"
    ended = replace(rec.advance(MigrationPhase.CANCELLED, at=time.time(), node=CANCEL_BY,
                                note=why), error=why)
    res = await cl.store.txn(
        [Compare.unchanged(cl.keys.vm_owner(rec.vm), owner_rev),
         Compare.unchanged(cl.keys.migration_record(rec.id), rec_rev)],
        [Put(cl.keys.vm_owner(rec.vm),
             codec.encode(owner.amend(owner_rev, migration=None, target=None))),
         Put(cl.keys.migration_record(rec.id), codec.encode(ended))],
    )
    return ended if res.succeeded else None


async def _request_cancel(cl: ClusterClient, rec: MigrationRecord, *, owner_rev: int
                          ) -> MigrationRecord:
    mid = rec.id
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


# -- the queue, and the limits it is kept within


async def migration_queue(cl: ClusterClient) -> dict[str, QueuePlace]:
    """Every migration that has not started: its place in the queue and why it waits, as
    the cluster manager's scheduler sees it now."""
    recs = await cl.all_of(MigrationRecord, cl.keys.migrations, "record")
    return _places(recs.values(), (await cl.config()).migration_limits,
                   down=await _down_nodes(cl),
                   manager=await cl.store.get(cl.keys.manager) is not None)


def _places(recs: Iterable[MigrationRecord], limits: MigrationLimits, *, down: set[str],
            manager: bool) -> dict[str, QueuePlace]:
    recs = list(recs)
    plan = scheduler.schedule(recs, limits, down=down)
    out = {mid: QueuePlace(position=w.position, why=w.why) for mid, w in plan.waiting.items()}
    for rec in plan.admit:
        out[rec.id] = QueuePlace(position=0, why=(
            "its turn: the cluster manager starts it at its next step" if manager
            else "no cluster manager is elected to start it"))
    for rec in recs:
        if rec.phase is MigrationPhase.QUEUED and rec.admitted_at is not None:
            out[rec.id] = QueuePlace(position=0, why=f"admitted: {rec.source} starts it")
    return out


async def _down_nodes(cl: ClusterClient) -> set[str]:
    entries, _ = await cl.store.get_prefix(cl.keys.nodes)
    parsed = {cl.keys.parse(e.key) for e in entries}
    nodes = {p[1] for p in parsed if p is not None and p[2] == "info"}
    return {n for n in nodes if ("nodes", n, "alive") not in parsed}


async def list_with_queue(cl: ClusterClient) -> list[MigrationListing]:
    """All migrations in creation order; those not started with their place in the queue."""
    places = await migration_queue(cl)
    return [MigrationListing(record=r, queue=places.get(r.id))
            for r in await list_migrations(cl)]


async def migration_limits(cl: ClusterClient) -> MigrationLimits:
    return (await cl.config()).migration_limits


async def set_migration_limits(cl: ClusterClient, *, per_source: int | None = None,
                               per_target: int | None = None,
                               per_cluster: int | None = None) -> MigrationLimits:
    """Change the limits the scheduler keeps (compare-and-swap on the cluster config)."""
    changes = {k: v for k, v in (("per_source", per_source), ("per_target", per_target),
                                 ("per_cluster", per_cluster)) if v is not None}
    for name, value in changes.items():
        if value < 1:
            raise InvalidSpec(f"the {name.replace('_', '-')} limit must be at least 1")
    key = cl.keys.cluster_config
    entry = await cl.store.get(key)
    config = codec.decode(ClusterConfig, entry.value) if entry else ClusterConfig(
        name=cl.keys.cluster)
    limits = replace(config.migration_limits, **changes)
    res = await cl.store.txn([Compare.unchanged(key, entry.mod_revision if entry else 0)],
                             [Put(key, codec.encode(replace(config, migration_limits=limits)))])
    if not res.succeeded:
        raise Conflict("the cluster configuration changed meanwhile; try again")
    return limits


async def show_migration(cl: ClusterClient, mid: str) -> MigrationView:
    rec, _ = await cl.migration(mid)
    queue = None
    if rec.phase is MigrationPhase.QUEUED:
        queue = (await migration_queue(cl)).get(mid)
    return MigrationView(record=rec, progress=await cl.progress(mid),
                         cancel_requested=await cl.cancel_requested(mid), queue=queue)


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

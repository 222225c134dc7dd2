"""Migration requests and cancels of the control layer against MemoryStore."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from ferry.control.migrations import (
    cancel_migration,
    follow,
    list_migrations,
    request_migration,
    show_migration,
)
from ferry.control.vms import create_vm, show_vm
from ferry.model import codec
from ferry.model.errors import Conflict, InvalidSpec, NotFound, Unavailable
from ferry.model.migration import MigrationOptions, MigrationPhase, MigrationRecord
from ferry.model.vm import Owner, Power, VmState
from tests.unit.control_harness import Cluster, make_cluster, running_vm

MiB = 1024**2


@pytest.fixture
async def c(tmp_path: Path) -> Cluster:
    cluster = await make_cluster(tmp_path)
    for n in ("node1", "node2", "node3"):
        await cluster.add_node(n)
    await running_vm(cluster, "vm1", "node1")
    return cluster


async def record_of(c: Cluster, mid: str) -> MigrationRecord:
    e = await c.store.get(c.keys.migration_record(mid))
    assert e is not None
    return codec.decode(MigrationRecord, e.value)


# --- request -------------------------------------------------------------------------


async def test_request_queues_the_migration_and_marks_the_owner_in_one_txn(c: Cluster) -> None:
    rev = c.revision
    rec = await request_migration(c.cl, "vm1", to="node2")
    assert c.revision == rev + 1
    assert rec.phase is MigrationPhase.QUEUED
    assert (rec.vm, rec.source, rec.target) == ("vm1", "node1", "node2")
    assert rec.timeline == ()
    assert not rec.committed
    owner_entry = await c.store.get(c.keys.vm_owner("vm1"))
    record_entry = await c.store.get(c.keys.migration_record(rec.id))
    assert owner_entry is not None and record_entry is not None
    assert owner_entry.mod_revision == record_entry.mod_revision == c.revision
    before = await c.store.get(c.keys.vm_owner("vm1"))
    assert before is not None
    # The owner and its fencing token stay: the token is the revision that granted node1.
    owner = codec.decode(Owner, owner_entry.value)
    assert owner == Owner(node="node1", power=Power.ON, migration=rec.id, target="node2",
                          granted=owner.granted)
    assert 0 < owner.granted < owner_entry.mod_revision
    assert await record_of(c, rec.id) == rec


async def test_request_keeps_the_options(c: Cluster) -> None:
    opts = MigrationOptions(max_bandwidth=10 * MiB, downtime_limit_ms=300, priority=1)
    rec = await request_migration(c.cl, "vm1", to="node3", options=opts)
    assert (await record_of(c, rec.id)).options == opts


async def test_migrating_vm_is_shown_as_migrating(c: Cluster) -> None:
    rec = await request_migration(c.cl, "vm1", to="node2")
    view = await show_vm(c.cl, "vm1")
    assert view.state is VmState.MIGRATING
    assert (view.migration, view.target, view.node) == (rec.id, "node2", "node1")


async def test_request_for_unknown_vm_is_not_found(c: Cluster) -> None:
    rev = c.revision
    with pytest.raises(NotFound, match="'ghost'"):
        await request_migration(c.cl, "ghost", to="node2")
    assert c.revision == rev


async def test_request_to_unknown_node_is_not_found(c: Cluster) -> None:
    rev = c.revision
    with pytest.raises(NotFound, match="node 'node9'"):
        await request_migration(c.cl, "vm1", to="node9")
    assert c.revision == rev


async def test_request_to_the_same_node_is_invalid(c: Cluster) -> None:
    rev = c.revision
    with pytest.raises(InvalidSpec, match="already runs on node1"):
        await request_migration(c.cl, "vm1", to="node1")
    assert c.revision == rev


async def test_request_for_a_stopped_vm_is_a_conflict(c: Cluster) -> None:
    await create_vm(c.cl, "off", disk_size=MiB)
    rev = c.revision
    with pytest.raises(Conflict, match="not running"):
        await request_migration(c.cl, "off", to="node2")
    assert c.revision == rev


async def test_request_for_a_vm_being_stopped_is_a_conflict(c: Cluster) -> None:
    await c.set_owner("vm1", Owner(node="node1", power=Power.OFF))
    rev = c.revision
    with pytest.raises(Conflict, match="not running"):
        await request_migration(c.cl, "vm1", to="node2")
    assert c.revision == rev


async def test_request_for_a_vm_still_starting_is_a_conflict(c: Cluster) -> None:
    await c.store.delete(c.keys.vm_status("vm1"))
    rev = c.revision
    with pytest.raises(Conflict, match="not running yet on node1"):
        await request_migration(c.cl, "vm1", to="node2")
    assert c.revision == rev


async def test_request_for_a_paused_vm_is_a_conflict(c: Cluster) -> None:
    await c.report("vm1", "node1", VmState.PAUSED)
    rev = c.revision
    with pytest.raises(Conflict, match="not running yet"):
        await request_migration(c.cl, "vm1", to="node2")
    assert c.revision == rev


async def test_request_to_a_node_that_is_down_is_unavailable(c: Cluster) -> None:
    await c.node_down("node2")
    rev = c.revision
    with pytest.raises(Unavailable, match="node node2 is down"):
        await request_migration(c.cl, "vm1", to="node2")
    assert c.revision == rev


async def test_request_for_a_vm_already_migrating_is_a_conflict(c: Cluster) -> None:
    first = await request_migration(c.cl, "vm1", to="node2")
    rev = c.revision
    for to in ("node2", "node3"):
        with pytest.raises(Conflict, match=f"already migrating \\({first.id}\\)"):
            await request_migration(c.cl, "vm1", to=to)
    assert c.revision == rev
    assert [r.id for r in await list_migrations(c.cl)] == [first.id]


@pytest.mark.parametrize("opts", [
    MigrationOptions(max_bandwidth=-1),
    MigrationOptions(downtime_limit_ms=0),
    MigrationOptions(downtime_limit_ms=-5),
])
async def test_request_with_bad_options_is_invalid(c: Cluster, opts: MigrationOptions) -> None:
    rev = c.revision
    with pytest.raises(InvalidSpec, match="downtime limit"):
        await request_migration(c.cl, "vm1", to="node2", options=opts)
    assert c.revision == rev


# --- cancel --------------------------------------------------------------------------


async def admitted(c: Cluster, rec: MigrationRecord) -> MigrationRecord:
    """As the cluster manager leaves it when the scheduler lets it start."""
    rec = replace(rec, admitted_at=rec.created_at + 1)
    await c.put_record(rec)
    return rec


async def test_cancel_creates_the_cancel_key(c: Cluster) -> None:
    rec = await admitted(c, await request_migration(c.cl, "vm1", to="node2"))
    rev = c.revision
    got = await cancel_migration(c.cl, rec.id)
    assert got == rec
    assert c.revision == rev + 1
    assert await c.store.get(c.keys.migration_cancel(rec.id)) is not None
    assert await c.cl.cancel_requested(rec.id)
    assert (await show_migration(c.cl, rec.id)).cancel_requested


async def test_a_second_cancel_is_idempotent(c: Cluster) -> None:
    rec = await admitted(c, await request_migration(c.cl, "vm1", to="node2"))
    await cancel_migration(c.cl, rec.id)
    cancel = await c.store.get(c.keys.migration_cancel(rec.id))
    rev = c.revision
    assert await cancel_migration(c.cl, rec.id) == rec
    assert c.revision == rev
    assert await c.store.get(c.keys.migration_cancel(rec.id)) == cancel


async def test_cancel_during_the_memory_copy(c: Cluster) -> None:
    rec = await request_migration(c.cl, "vm1", to="node2")
    moving = rec.advance(MigrationPhase.CONNECTING, at=1.0, node="node1").advance(
        MigrationPhase.COPYING_MEMORY, at=2.0, node="node1")
    await c.put_record(moving)
    assert (await cancel_migration(c.cl, rec.id)).phase is MigrationPhase.COPYING_MEMORY
    assert await c.cl.cancel_requested(rec.id)


@pytest.mark.parametrize("end", [MigrationPhase.COMPLETED, MigrationPhase.FAILED,
                                 MigrationPhase.CANCELLED])
async def test_cancel_of_an_ended_migration_is_a_conflict(c: Cluster,
                                                          end: MigrationPhase) -> None:
    rec = await request_migration(c.cl, "vm1", to="node2")
    await c.put_record(rec.advance(end, at=2.0, node="node1"))
    rev = c.revision
    with pytest.raises(Conflict, match=f"already ended \\({end.value}\\)"):
        await cancel_migration(c.cl, rec.id)
    assert c.revision == rev
    assert not await c.cl.cancel_requested(rec.id)


async def test_cancel_of_a_committed_migration_is_a_conflict(c: Cluster) -> None:
    rec = await request_migration(c.cl, "vm1", to="node2")
    late = replace(rec.advance(MigrationPhase.BRINGING_ONLINE, at=2.0, node="node2"),
                   committed_at=2.5)
    await c.put_record(late)
    rev = c.revision
    with pytest.raises(Conflict, match="point of no return"):
        await cancel_migration(c.cl, rec.id)
    assert c.revision == rev
    assert not await c.cl.cancel_requested(rec.id)


async def test_cancel_of_an_unknown_migration_is_not_found(c: Cluster) -> None:
    rev = c.revision
    with pytest.raises(NotFound, match="'nope'"):
        await cancel_migration(c.cl, "nope")
    assert c.revision == rev


async def test_cancel_when_the_owner_no_longer_names_the_migration(c: Cluster) -> None:
    rec = await request_migration(c.cl, "vm1", to="node2")
    await c.set_owner("vm1", Owner(node="node1", power=Power.ON))
    rev = c.revision
    with pytest.raises(Conflict, match="no longer in progress"):
        await cancel_migration(c.cl, rec.id)
    assert c.revision == rev


async def test_cancel_when_the_vm_is_gone(c: Cluster) -> None:
    rec = await request_migration(c.cl, "vm1", to="node2")
    await c.store.delete(c.keys.vm_prefix("vm1"), prefix=True)
    rev = c.revision
    with pytest.raises(Conflict, match="its VM vm1 is gone"):
        await cancel_migration(c.cl, rec.id)
    assert c.revision == rev


# --- views ---------------------------------------------------------------------------


async def test_list_migrations_in_creation_order(c: Cluster) -> None:
    await running_vm(c, "vm2", "node2")
    a = await request_migration(c.cl, "vm1", to="node3")
    b = await request_migration(c.cl, "vm2", to="node1")
    await c.put_record(replace(a, created_at=b.created_at + 1))
    assert [r.id for r in await list_migrations(c.cl)] == [b.id, a.id]


async def test_show_unknown_migration_is_not_found(c: Cluster) -> None:
    with pytest.raises(NotFound):
        await show_migration(c.cl, "nope")


async def test_follow_ends_once_the_migration_has_settled(c: Cluster) -> None:
    rec = await request_migration(c.cl, "vm1", to="node2")
    await c.put_record(rec.advance(MigrationPhase.CONNECTING, at=1.0, node="node1")
                       .advance(MigrationPhase.FAILED, at=2.0, node="node1"))
    views = [v async for v in follow(c.cl, rec.id, timeout=5)]
    assert len(views) == 1
    assert views[0].record.phase is MigrationPhase.FAILED
    assert views[0].record.settled

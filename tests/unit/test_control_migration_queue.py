"""Many migrations at once, node drain, cancel while queued, the queue view and the limits,
in the control layer against a MemoryStore."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ferry.control.migrations import (
    cancel_migration,
    drain_node,
    list_with_queue,
    migration_limits,
    migration_queue,
    request_migration,
    request_migrations,
    set_migration_limits,
    show_migration,
)
from ferry.control.nodes import pause_node
from ferry.model import codec
from ferry.model.cluster import ClusterConfig
from ferry.model.errors import Conflict, InvalidSpec, NotFound, Unavailable
from ferry.model.ha import HaPolicy
from ferry.model.migration import MigrationOptions, MigrationPhase, MigrationRecord
from ferry.model.policy import MigrationLimits
from ferry.model.vm import Owner, Power
from tests.unit.control_harness import Cluster, cluster_with_vms, make_cluster, running_vm

MiB = 1024**2


@pytest.fixture
async def c(tmp_path: Path) -> Cluster:
    return await cluster_with_vms(tmp_path, ("a", "b", "c"))


async def record_of(c: Cluster, mid: str) -> MigrationRecord:
    e = await c.store.get(c.keys.migration_record(mid))
    assert e is not None
    return codec.decode(MigrationRecord, e.value)


async def admit(c: Cluster, mid: str) -> MigrationRecord:
    """What the cluster manager writes when the scheduler lets the migration start."""
    rec = replace(await record_of(c, mid), admitted_at=1e9)
    await c.put_record(rec)
    return rec


# --- many at once ----------------------------------------------------------------------


async def test_many_vms_are_requested_at_once_in_one_txn_in_the_order_named(
        c: Cluster) -> None:
    rev = c.revision
    opts = MigrationOptions(priority=3)
    recs = await request_migrations(c.cl, ["c", "a", "b"], to="node2", options=opts)
    assert c.revision == rev + 1
    assert [r.vm for r in recs] == ["c", "a", "b"]
    assert len({r.id for r in recs}) == 3
    assert [r.created_at for r in recs] == sorted(r.created_at for r in recs)
    for r in recs:
        assert (r.source, r.target, r.phase, r.options) == ("node1", "node2",
                                                             MigrationPhase.QUEUED, opts)
        assert r.admitted_at is None
        assert await record_of(c, r.id) == r
        owner = await c.owner(r.vm)
        assert (owner.migration, owner.target) == (r.id, "node2")


async def test_one_bad_vm_refuses_the_whole_request(c: Cluster) -> None:
    await c.set_owner("b", Owner(node="node1", power=Power.OFF))
    rev = c.revision
    with pytest.raises(Conflict, match="VM b is not running"):
        await request_migrations(c.cl, ["a", "b", "c"], to="node2")
    assert c.revision == rev


@pytest.mark.parametrize(("names", "to", "error", "match"), [
    (["a", "ghost"], "node2", NotFound, "'ghost'"),
    (["a", "b"], "node9", NotFound, "node 'node9'"),
    (["a", "b"], "node1", InvalidSpec, "already runs on node1"),
    (["a", "b", "a"], "node2", InvalidSpec, "VM a is named twice"),
    ([], "node2", InvalidSpec, "at least one VM"),
])
async def test_bad_requests_change_nothing(c: Cluster, names: list[str], to: str,
                                           error: type[Exception], match: str) -> None:
    rev = c.revision
    with pytest.raises(error, match=match):
        await request_migrations(c.cl, names, to=to)
    assert c.revision == rev


async def test_vms_moving_to_one_node_must_fit_there_together(tmp_path: Path) -> None:
    c = await make_cluster(tmp_path)
    await c.add_node("node1")
    await c.add_node("small", memory_mib=512 + 600)  # 600 MiB free after the host reserve
    for vm in ("a", "b"):
        await running_vm(c, vm, "node1", memory_mib=256)
    await running_vm(c, "big", "node1", memory_mib=200)
    rev = c.revision
    with pytest.raises(Conflict, match="small has 88 MiB free, the VM needs 200 MiB"):
        await request_migrations(c.cl, ["a", "b", "big"], to="small")
    assert c.revision == rev
    # Migrations already on their way count too.
    await request_migrations(c.cl, ["a", "b"], to="small")
    with pytest.raises(Conflict, match="88 MiB free"):
        await request_migration(c.cl, "big", to="small")


async def test_requests_beyond_one_txn_are_written_in_several(
        c: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from ferry.control import migrations as mod
    monkeypatch.setattr(mod, "REQUESTS_PER_TXN", 2)
    rev = c.revision
    recs = await request_migrations(c.cl, ["a", "b", "c"], to="node3")
    assert c.revision == rev + 2
    for r in recs:
        assert (await c.owner(r.vm)).migration == r.id


# --- drain ----------------------------------------------------------------------------


async def test_drain_pauses_the_node_and_spreads_its_vms_by_free_memory(
        c: Cluster) -> None:
    await running_vm(c, "elsewhere", "node2", memory_mib=512)
    rev = c.revision
    drain = await drain_node(c.cl, "node1", options=MigrationOptions(priority=2))
    assert c.revision == rev + 1  # pause and requests in one transaction
    assert drain.paused and drain.already == ()
    assert await c.store.get(c.keys.node_paused("node1")) is not None
    targets = {r.vm: r.target for r in drain.migrations}
    # node3 is emptier (counting what this drain sends there): a and b go there; then
    # node2 and node3 are as full, and the tie goes by name.
    assert targets == {"a": "node3", "b": "node3", "c": "node2"}
    assert all(r.source == "node1" and r.options.priority == 2 for r in drain.migrations)


async def test_drain_uses_an_ha_vms_preferred_node(c: Cluster) -> None:
    from ferry.control.vms import create_vm, start_vm
    await create_vm(c.cl, "ha", disk_size=MiB, ha=HaPolicy(preferred_nodes=("node2",)))
    token = await start_vm(c.cl, "ha", node="node1")
    await c.report("ha", "node1", token=token)
    drain = await drain_node(c.cl, "node1")
    assert {r.vm: r.target for r in drain.migrations}["ha"] == "node2"


async def test_drain_leaves_migrations_under_way_alone(c: Cluster) -> None:
    first = await request_migration(c.cl, "a", to="node2")
    drain = await drain_node(c.cl, "node1")
    assert drain.already == ("a",)
    assert sorted(r.vm for r in drain.migrations) == ["b", "c"]
    assert (await c.owner("a")).migration == first.id


async def test_drain_names_vms_on_their_way_to_the_node(c: Cluster) -> None:
    await running_vm(c, "inbound", "node2")
    rec = await request_migration(c.cl, "inbound", to="node1")
    drain = await drain_node(c.cl, "node1")
    assert drain.incoming == (("inbound", rec.id),)
    assert "inbound" not in {r.vm for r in drain.migrations}


async def test_drain_of_an_already_paused_node(c: Cluster) -> None:
    await pause_node(c.cl, "node1")
    drain = await drain_node(c.cl, "node1")
    assert not drain.paused and len(drain.migrations) == 3


async def test_drain_of_an_empty_node_just_pauses_it(c: Cluster) -> None:
    drain = await drain_node(c.cl, "node3")
    assert drain.migrations == () and drain.paused
    assert await c.store.get(c.keys.node_paused("node3")) is not None


async def test_drain_with_nowhere_to_go_changes_nothing(c: Cluster) -> None:
    await c.node_down("node2")
    await pause_node(c.cl, "node3")
    rev = c.revision
    with pytest.raises(Conflict, match="cannot drain node1: no node takes VM a: no node"):
        await drain_node(c.cl, "node1")
    assert c.revision == rev


async def test_drain_refuses_a_vm_that_is_not_running_yet(c: Cluster) -> None:
    await c.store.delete(c.keys.vm_status("b"))
    rev = c.revision
    with pytest.raises(Conflict, match="VM b is not running yet on node1"):
        await drain_node(c.cl, "node1")
    assert c.revision == rev


async def test_drain_of_unknown_or_down_node(c: Cluster) -> None:
    with pytest.raises(NotFound, match="node 'node9'"):
        await drain_node(c.cl, "node9")
    await c.node_down("node3")
    with pytest.raises(Unavailable, match="node3 is down"):
        await drain_node(c.cl, "node3")


# --- cancel while queued ------------------------------------------------------------------


async def test_a_queued_migration_is_cancelled_at_once(c: Cluster) -> None:
    rec = await request_migration(c.cl, "a", to="node2")
    rev = c.revision
    got = await cancel_migration(c.cl, rec.id)
    assert c.revision == rev + 1  # record and owner in one transaction
    assert got.phase is MigrationPhase.CANCELLED and got.settled
    assert got.error == "cancelled while queued, before it started"
    assert got.timeline[-1].note == got.error
    assert await record_of(c, rec.id) == got
    owner = await c.owner("a")
    assert (owner.node, owner.power, owner.migration, owner.target) == (
        "node1", Power.ON, None, None)
    assert not await c.cl.cancel_requested(rec.id)
    with pytest.raises(Conflict, match="already ended"):
        await cancel_migration(c.cl, rec.id)


async def test_cancel_that_crosses_the_admission_asks_the_source_instead(
        c: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = await request_migration(c.cl, "a", to="node2")
    txn = c.store.txn
    crossed: list[bool] = []

    async def admitted_first(*args: Any, **kwargs: Any) -> Any:
        if not crossed:  # the manager's admission lands between the read and the write
            crossed.append(True)
            await admit(c, rec.id)
        return await txn(*args, **kwargs)

    monkeypatch.setattr(c.store, "txn", admitted_first)
    got = await cancel_migration(c.cl, rec.id)
    assert got.phase is MigrationPhase.QUEUED and got.admitted_at is not None
    assert await c.cl.cancel_requested(rec.id)
    assert (await c.owner("a")).migration == rec.id  # the source ends it


async def test_an_admitted_but_not_started_migration_is_cancelled_by_its_source(
        c: Cluster) -> None:
    rec = await request_migration(c.cl, "a", to="node2")
    await admit(c, rec.id)
    got = await cancel_migration(c.cl, rec.id)
    assert got.phase is MigrationPhase.QUEUED
    assert await c.cl.cancel_requested(rec.id)


# --- the queue ------------------------------------------------------------------------------


async def test_the_queue_shows_position_and_why(c: Cluster) -> None:
    await c.store.put(c.keys.manager, "node1")
    a, b, cc = await request_migrations(c.cl, ["a", "b", "c"], to="node2")
    q = await migration_queue(c.cl)
    assert q[a.id].position == 0 and "its turn" in q[a.id].why
    await admit(c, a.id)
    q = await migration_queue(c.cl)
    assert q[a.id].why == "admitted: node1 starts it"
    assert (q[b.id].position, q[cc.id].position) == (1, 2)
    assert q[b.id].why == "node1 has 1 outbound migration running (limit 1): a"
    listing = await list_with_queue(c.cl)
    assert [(x.record.id, x.queue) for x in listing] == [(a.id, q[a.id]), (b.id, q[b.id]),
                                                        (cc.id, q[cc.id])]
    view = await show_migration(c.cl, b.id)
    assert view.queue == q[b.id]


async def test_started_and_ended_migrations_are_not_in_the_queue(c: Cluster) -> None:
    a, b = await request_migrations(c.cl, ["a", "b"], to="node2")
    await c.put_record(replace(a, admitted_at=5.0).advance(MigrationPhase.CONNECTING, at=6.0,
                                                           node="node1"))
    await cancel_migration(c.cl, b.id)
    assert await migration_queue(c.cl) == {}
    assert all(x.queue is None for x in await list_with_queue(c.cl))
    assert (await show_migration(c.cl, a.id)).queue is None


async def test_the_queue_without_a_manager_says_so(c: Cluster) -> None:
    rec = await request_migration(c.cl, "a", to="node2")
    assert (await migration_queue(c.cl))[rec.id].why == (
        "no cluster manager is elected to start it")


async def test_the_queue_names_a_down_target(c: Cluster) -> None:
    rec = await request_migration(c.cl, "a", to="node2")
    await c.node_down("node2")
    assert (await migration_queue(c.cl))[rec.id].why == "target node2 is down"


# --- limits ---------------------------------------------------------------------------------


async def test_limits_default_and_set(c: Cluster) -> None:
    assert await migration_limits(c.cl) == MigrationLimits()
    rev = c.revision
    got = await set_migration_limits(c.cl, per_target=3, per_cluster=6)
    assert got == MigrationLimits(per_source=1, per_target=3, per_cluster=6)
    assert c.revision == rev + 1
    assert await migration_limits(c.cl) == got
    e = await c.store.get(c.keys.cluster_config)
    assert e is not None
    config = codec.decode(ClusterConfig, e.value)
    assert config.default_volume == "shared0"  # the rest of the configuration stays
    assert (await set_migration_limits(c.cl, per_source=2)).per_target == 3


@pytest.mark.parametrize("kwargs", [{"per_source": 0}, {"per_target": -1},
                                    {"per_cluster": 0}])
async def test_limits_below_one_are_refused(c: Cluster, kwargs: dict[str, int]) -> None:
    rev = c.revision
    with pytest.raises(InvalidSpec, match="must be at least 1"):
        await set_migration_limits(c.cl, **kwargs)
    assert c.revision == rev


async def test_limits_without_a_cluster_config_are_created(c: Cluster) -> None:
    await c.store.delete(c.keys.cluster_config)
    got = await set_migration_limits(c.cl, per_source=2)
    assert got.per_source == 2
    assert await migration_limits(c.cl) == got


async def test_limits_set_concurrently_conflict(c: Cluster,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    get = c.store.get

    async def raced(key: str) -> Any:
        e = await get(key)
        if key == c.keys.cluster_config and e is not None:
            await c.store.put(key, e.value)  # somebody else wrote it meanwhile
        return e

    monkeypatch.setattr(c.store, "get", raced)
    with pytest.raises(Conflict, match="changed meanwhile"):
        await set_migration_limits(c.cl, per_source=3)

"""HA settings, start actions, events, paused nodes and fencing tokens in the control layer.

Every refused operation must leave the store as it was.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from ferry.control.ha import (
    follow_events,
    list_events,
    remove_ha,
    set_ha,
    set_start_action,
)
from ferry.control.migrations import request_migration
from ferry.control.nodes import list_nodes, node_loads, node_state, pause_node, resume_node
from ferry.control.vms import create_vm, list_vms, show_vm, start_vm, stop_vm, wait_started
from ferry.ha.events import event_put
from ferry.model import codec
from ferry.model.errors import Conflict, FerryError, InvalidSpec, NotFound
from ferry.model.ha import EventKind, HaPolicy, HaPriority, StartAction
from ferry.model.node import NodeState
from ferry.model.vm import Owner, Power, VmSpec, VmState
from ferry.storage.volume import vm_dir
from ferry.store.base import Compare, Entry, Put, TxnOp, TxnResult
from ferry.store.memory import MemoryStore
from tests.unit.control_harness import Cluster, make_cluster, running_vm

MiB = 1024**2


@pytest.fixture
async def c(tmp_path: Path) -> Cluster:
    c = await make_cluster(tmp_path)
    await c.add_node("node1")
    await c.add_node("node2")
    await c.add_node("node3")
    return c


async def vm(c: Cluster, name: str = "vm1", *, ha: HaPolicy | None = None,
             memory_mib: int = 256) -> VmSpec:
    return await create_vm(c.cl, name, memory_mib=memory_mib, disk_size=MiB, ha=ha)


async def spec_entry(c: Cluster, name: str = "vm1") -> Entry:
    e = await c.store.get(c.keys.vm_spec(name))
    assert e is not None
    return e


async def spec_of(c: Cluster, name: str = "vm1") -> VmSpec:
    return codec.decode(VmSpec, (await spec_entry(c, name)).value)


async def owner_entry(c: Cluster, name: str = "vm1") -> Entry:
    e = await c.store.get(c.keys.vm_owner(name))
    assert e is not None
    return e


# --- set_ha -------------------------------------------------------------------------


async def test_set_ha_sets_the_policy_and_the_start_action_none(c: Cluster) -> None:
    await vm(c)
    assert (await spec_of(c)).start_action is StartAction.START
    new = await set_ha(c.cl, "vm1", priority=HaPriority.HIGH, preferred_nodes=["node3", "node1"])
    assert new.ha == HaPolicy(priority=HaPriority.HIGH, preferred_nodes=("node3", "node1"))
    assert new.start_action is StartAction.NONE
    assert await spec_of(c) == new


async def test_set_ha_defaults_to_medium_without_preference(c: Cluster) -> None:
    await vm(c)
    new = await set_ha(c.cl, "vm1")
    assert new.ha == HaPolicy(priority=HaPriority.MEDIUM, preferred_nodes=())


async def test_set_ha_again_changes_the_policy(c: Cluster) -> None:
    await vm(c, ha=HaPolicy(priority=HaPriority.LOW, preferred_nodes=("node1",)))
    new = await set_ha(c.cl, "vm1", priority=HaPriority.HIGH)
    assert (await spec_of(c)).ha == HaPolicy(priority=HaPriority.HIGH)
    assert new.start_action is StartAction.NONE


async def test_set_ha_leaves_the_owner_record_alone(c: Cluster) -> None:
    await running_vm(c, "vm1", "node1")
    before = await owner_entry(c)
    await set_ha(c.cl, "vm1")
    assert await owner_entry(c) == before  # the owning agent arms it, not the control layer


async def test_set_ha_with_an_unknown_preferred_node_names_it(c: Cluster) -> None:
    await vm(c)
    rev = c.revision
    with pytest.raises(NotFound, match="nodeX"):
        await set_ha(c.cl, "vm1", preferred_nodes=["node1", "nodeX"])
    assert c.revision == rev
    assert (await spec_of(c)).ha is None


async def test_set_ha_with_a_duplicate_preferred_node(c: Cluster) -> None:
    await vm(c)
    rev = c.revision
    with pytest.raises(InvalidSpec, match="twice"):
        await set_ha(c.cl, "vm1", preferred_nodes=["node1", "node2", "node1"])
    assert c.revision == rev


async def test_set_ha_of_an_unknown_vm(c: Cluster) -> None:
    rev = c.revision
    with pytest.raises(NotFound, match="nope"):
        await set_ha(c.cl, "nope")
    assert c.revision == rev


class Interfering(MemoryStore):
    """Another client rewrites ``key`` just before our next transaction that writes it."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.armed = True

    async def txn(self, compares: Sequence[Compare], success: Sequence[TxnOp],
                  failure: Sequence[TxnOp] = ()) -> TxnResult:
        if self.armed and any(isinstance(op, Put) and op.key == self.key for op in success):
            self.armed = False
            e = await self.get(self.key)
            assert e is not None
            await self.put(self.key, e.value)  # same value, new revision
        return await super().txn(compares, success, failure)


async def test_set_ha_refuses_when_the_spec_changed_meanwhile(c: Cluster) -> None:
    await vm(c)
    store = Interfering(c.keys.vm_spec("vm1"))
    entries, _ = await c.store.get_prefix(c.keys.root)
    for e in entries:
        await store.put(e.key, e.value)
    c.cl.store = store
    with pytest.raises(Conflict, match="changed meanwhile"):
        await set_ha(c.cl, "vm1")
    got = await store.get(c.keys.vm_spec("vm1"))
    assert got is not None and codec.decode(VmSpec, got.value).ha is None


# --- remove_ha ---------------------------------------------------------------------


async def test_remove_ha_clears_the_policy_and_restores_start(c: Cluster) -> None:
    await vm(c, ha=HaPolicy(priority=HaPriority.HIGH))
    new = await remove_ha(c.cl, "vm1")
    assert new.ha is None
    assert new.start_action is StartAction.START
    assert await spec_of(c) == new


async def test_remove_ha_of_a_vm_that_is_not_ha(c: Cluster) -> None:
    await vm(c)
    rev = c.revision
    with pytest.raises(Conflict, match="not highly available"):
        await remove_ha(c.cl, "vm1")
    assert c.revision == rev


async def test_remove_ha_of_an_unknown_vm(c: Cluster) -> None:
    with pytest.raises(NotFound):
        await remove_ha(c.cl, "nope")


# --- start actions ------------------------------------------------------------------


@pytest.mark.parametrize("action", [StartAction.START, StartAction.RESTORE])
async def test_a_start_action_on_an_ha_vm_is_refused_and_nothing_changes(
        c: Cluster, action: StartAction) -> None:
    await vm(c, ha=HaPolicy())
    before = await spec_entry(c)
    rev = c.revision
    with pytest.raises(Conflict, match="highly available"):
        await set_start_action(c.cl, "vm1", action)
    assert (await spec_entry(c)).mod_revision == before.mod_revision
    assert c.revision == rev


async def test_start_action_none_on_an_ha_vm_is_accepted(c: Cluster) -> None:
    await vm(c, ha=HaPolicy())
    new = await set_start_action(c.cl, "vm1", StartAction.NONE)
    assert new.start_action is StartAction.NONE
    assert new.ha == HaPolicy()


@pytest.mark.parametrize("action", list(StartAction))
async def test_start_action_of_a_plain_vm(c: Cluster, action: StartAction) -> None:
    await vm(c)
    await set_start_action(c.cl, "vm1", action)
    assert (await spec_of(c)).start_action is action


async def test_start_action_of_an_unknown_vm(c: Cluster) -> None:
    with pytest.raises(NotFound):
        await set_start_action(c.cl, "nope", StartAction.NONE)


# --- create_vm(ha=...) --------------------------------------------------------------


async def test_create_an_ha_vm(c: Cluster) -> None:
    policy = HaPolicy(priority=HaPriority.LOW, preferred_nodes=("node2",))
    spec = await vm(c, ha=policy)
    assert spec.ha == policy
    assert spec.start_action is StartAction.NONE
    assert await spec_of(c) == spec
    owner = codec.decode(Owner, (await owner_entry(c)).value)
    assert owner == Owner(node=None, power=Power.OFF)


async def test_create_with_an_unknown_preferred_node_writes_nothing(c: Cluster) -> None:
    rev = c.revision
    with pytest.raises(NotFound, match="ghost"):
        await vm(c, ha=HaPolicy(preferred_nodes=("ghost",)))
    assert c.revision == rev
    assert not vm_dir(c.volume, "vm1").exists()


async def test_create_with_a_duplicate_preferred_node_writes_nothing(c: Cluster) -> None:
    rev = c.revision
    with pytest.raises(InvalidSpec):
        await vm(c, ha=HaPolicy(preferred_nodes=("node1", "node1")))
    assert c.revision == rev
    assert not vm_dir(c.volume, "vm1").exists()


async def test_views_show_ha_armed_and_start_action(c: Cluster) -> None:
    await vm(c, ha=HaPolicy(priority=HaPriority.HIGH))
    await vm(c, "plain")
    rev = await start_vm(c.cl, "vm1", node="node1")
    view = await show_vm(c.cl, "vm1")
    assert view.ha == HaPolicy(priority=HaPriority.HIGH)
    assert not view.ha_armed
    assert view.start_action is StartAction.NONE
    owner = codec.decode(Owner, (await owner_entry(c)).value)
    await c.set_owner("vm1", owner.amend(rev, ha=True))
    views = {v.name: v for v in await list_vms(c.cl)}
    assert views["vm1"].ha_armed
    assert views["plain"].ha is None
    assert views["plain"].start_action is StartAction.START


# --- events ----------------------------------------------------------------------------


async def put_event(c: Cluster, at: float, *, kind: EventKind = EventKind.NODE_DOWN,
                    node: str = "", vm: str = "", by: str = "node1", message: str = "") -> int:
    put = event_put(c.keys, kind=kind, message=message or f"event at {at}", by=by,
                    node=node, vm=vm, at=at)
    return await c.store.put(put.key, put.value)


async def test_list_events_oldest_first_with_a_limit(c: Cluster) -> None:
    for at in (3.0, 1.0, 2.0, 4.0):
        await put_event(c, at)
    events, rev = await list_events(c.cl)
    assert [e.at for e in events] == [1.0, 2.0, 3.0, 4.0]
    assert rev == c.revision
    latest, _ = await list_events(c.cl, limit=2)
    assert [e.at for e in latest] == [3.0, 4.0]
    every, _ = await list_events(c.cl, limit=0)
    assert len(every) == 4


async def test_list_events_by_vm_and_node(c: Cluster) -> None:
    await put_event(c, 1.0, vm="vm1", node="node2", by="node1")
    await put_event(c, 2.0, vm="vm2", node="node3", by="node2")
    await put_event(c, 3.0, node="node1", by="node3")
    by_vm, _ = await list_events(c.cl, vm="vm1")
    assert [e.at for e in by_vm] == [1.0]
    # a node's events: about it, or decided by it
    by_node, _ = await list_events(c.cl, node="node2")
    assert [e.at for e in by_node] == [1.0, 2.0]
    both, _ = await list_events(c.cl, vm="vm2", node="node3")
    assert [e.at for e in both] == [2.0]


async def test_list_events_skips_malformed_ones(c: Cluster) -> None:
    await put_event(c, 1.0)
    await c.store.put(c.keys.events + "garbage", "{not json")
    events, _ = await list_events(c.cl)
    assert [e.at for e in events] == [1.0]


async def test_list_events_of_an_empty_log(c: Cluster) -> None:
    assert await list_events(c.cl) == ([], c.revision)


async def test_follow_events_yields_new_events_only(c: Cluster) -> None:
    await put_event(c, 1.0, message="old")
    _, rev = await list_events(c.cl)
    gen = follow_events(c.cl, after=rev, vm="vm1")
    first = asyncio.ensure_future(anext(gen))
    await asyncio.sleep(0)
    await put_event(c, 2.0, vm="vm1", message="first")
    await put_event(c, 3.0, vm="vm2", message="other vm")
    await c.store.delete(c.keys.event(1.0, "node1"))  # pruned: no event
    await c.store.put(c.keys.events + "garbage", "{not json")
    await put_event(c, 4.0, vm="vm1", message="second")
    got = [await asyncio.wait_for(first, timeout=2),
           await asyncio.wait_for(anext(gen), timeout=2)]
    await gen.aclose()  # type: ignore[attr-defined]
    assert [e.message for e in got] == ["first", "second"]


async def test_follow_events_catches_up_from_a_past_revision(c: Cluster) -> None:
    _, rev = await list_events(c.cl)
    await put_event(c, 1.0, message="written before following")
    gen = follow_events(c.cl, after=rev)
    ev = await asyncio.wait_for(anext(gen), timeout=2)
    await gen.aclose()  # type: ignore[attr-defined]
    assert ev.message == "written before following"


# --- nodes: state, pause, resume -------------------------------------------------------


@pytest.mark.parametrize(("alive", "fenced", "paused", "state"), [
    (True, False, False, NodeState.UP),
    (True, False, True, NodeState.PAUSED),
    (True, True, False, NodeState.UP),
    (True, True, True, NodeState.PAUSED),
    (False, False, False, NodeState.DOWN),
    (False, False, True, NodeState.DOWN),
    (False, True, False, NodeState.FENCED),
    (False, True, True, NodeState.FENCED),
])
def test_node_state(alive: bool, fenced: bool, paused: bool, state: NodeState) -> None:
    assert node_state(alive=alive, fenced=fenced, paused=paused) is state


async def test_pause_and_resume_a_node(c: Cluster) -> None:
    await pause_node(c.cl, "node2")
    assert await c.store.get(c.keys.node_paused("node2")) is not None
    states = {v.info.name: v.state for v in await list_nodes(c.cl)}
    assert states == {"node1": NodeState.UP, "node2": NodeState.PAUSED, "node3": NodeState.UP}
    loads = {n.name: n for n in await node_loads(c.cl)}
    assert loads["node2"].up and loads["node2"].paused and not loads["node2"].eligible
    await resume_node(c.cl, "node2")
    assert await c.store.get(c.keys.node_paused("node2")) is None
    assert all(v.state is NodeState.UP for v in await list_nodes(c.cl))


async def test_pausing_twice_is_a_conflict(c: Cluster) -> None:
    await pause_node(c.cl, "node1")
    rev = c.revision
    with pytest.raises(Conflict, match="already paused"):
        await pause_node(c.cl, "node1")
    assert c.revision == rev


async def test_resuming_a_node_that_is_not_paused(c: Cluster) -> None:
    rev = c.revision
    with pytest.raises(Conflict, match="not paused"):
        await resume_node(c.cl, "node1")
    assert c.revision == rev


async def test_pause_and_resume_unknown_nodes(c: Cluster) -> None:
    rev = c.revision
    with pytest.raises(NotFound, match="ghost"):
        await pause_node(c.cl, "ghost")
    with pytest.raises(NotFound, match="ghost"):
        await resume_node(c.cl, "ghost")
    assert c.revision == rev


async def test_a_paused_node_that_goes_down_is_down_and_fenced_shows(c: Cluster) -> None:
    await pause_node(c.cl, "node1")
    await c.node_down("node1")
    (view,) = [v for v in await list_nodes(c.cl) if v.info.name == "node1"]
    assert view.state is NodeState.DOWN
    assert not {n.name: n for n in await node_loads(c.cl)}["node1"].up
    await c.store.put(c.keys.node_fenced("node1"), "{}")
    (view,) = [v for v in await list_nodes(c.cl) if v.info.name == "node1"]
    assert view.state is NodeState.FENCED


# --- placement of starts ------------------------------------------------------------


async def big_cluster(tmp_path: Path) -> Cluster:
    c = await make_cluster(tmp_path)
    await c.add_node("big", memory_mib=65536)
    await c.add_node("small", memory_mib=4096)
    await c.add_node("tiny", memory_mib=2048)
    return c


async def test_automatic_start_avoids_a_paused_node(tmp_path: Path) -> None:
    c = await big_cluster(tmp_path)
    await vm(c)
    await pause_node(c.cl, "big")
    await start_vm(c.cl, "vm1")
    assert (await c.owner("vm1")).node == "small"


async def test_an_operator_may_still_name_a_paused_node(tmp_path: Path) -> None:
    c = await big_cluster(tmp_path)
    await vm(c)
    await pause_node(c.cl, "big")
    await start_vm(c.cl, "vm1", node="big")
    assert (await c.owner("vm1")).node == "big"


async def test_no_automatic_start_when_every_up_node_is_paused(tmp_path: Path) -> None:
    c = await big_cluster(tmp_path)
    await vm(c)
    for n in ("big", "small"):
        await pause_node(c.cl, n)
    await c.node_down("tiny")
    rev = c.revision
    with pytest.raises(Conflict, match="no node is up and unpaused"):
        await start_vm(c.cl, "vm1")
    assert c.revision == rev


async def test_automatic_start_honours_preferred_nodes(tmp_path: Path) -> None:
    c = await big_cluster(tmp_path)
    await vm(c, ha=HaPolicy(preferred_nodes=("tiny", "small")))
    await start_vm(c.cl, "vm1")
    assert (await c.owner("vm1")).node == "tiny"


async def test_automatic_start_skips_paused_and_full_preferred_nodes(tmp_path: Path) -> None:
    c = await big_cluster(tmp_path)
    await vm(c, ha=HaPolicy(preferred_nodes=("tiny", "small")), memory_mib=3000)
    await pause_node(c.cl, "small")
    # tiny is too small for 3000 MiB, small is paused: the emptiest node.
    await start_vm(c.cl, "vm1")
    assert (await c.owner("vm1")).node == "big"


async def test_a_plain_vm_goes_to_the_emptiest_node(tmp_path: Path) -> None:
    c = await big_cluster(tmp_path)
    await vm(c)
    await start_vm(c.cl, "vm1")
    assert (await c.owner("vm1")).node == "big"


# --- fencing tokens across control writes ------------------------------------------------


async def test_start_grants_a_new_token_and_stop_keeps_it(c: Cluster) -> None:
    await vm(c)
    token = await start_vm(c.cl, "vm1", node="node1")
    started = await owner_entry(c)
    assert started.mod_revision == token
    assert codec.decode(Owner, started.value).granted == 0
    await stop_vm(c.cl, "vm1")
    stopped_e = await owner_entry(c)
    stopped = codec.decode(Owner, stopped_e.value)
    assert stopped.power is Power.OFF
    assert stopped_e.mod_revision > token
    assert stopped.granted == token
    assert stopped.token(stopped_e.mod_revision) == token


async def test_a_forced_stop_after_arming_keeps_the_first_token(c: Cluster) -> None:
    await vm(c, ha=HaPolicy())
    token = await start_vm(c.cl, "vm1", node="node1")
    owner = codec.decode(Owner, (await owner_entry(c)).value)
    await c.set_owner("vm1", owner.amend(token, ha=True))  # the agent arms it
    await stop_vm(c.cl, "vm1", force=True)
    e = await owner_entry(c)
    owner = codec.decode(Owner, e.value)
    assert owner.force and owner.ha
    assert owner.token(e.mod_revision) == token


async def test_a_new_start_after_a_stop_is_a_new_grant(c: Cluster) -> None:
    await vm(c)
    first = await start_vm(c.cl, "vm1", node="node1")
    await stop_vm(c.cl, "vm1")
    with pytest.raises(Conflict, match="still stopping"):  # node1 has not released it yet
        await start_vm(c.cl, "vm1", node="node1")
    await c.set_owner("vm1", Owner(node=None, power=Power.OFF))  # node1's agent releases it
    second = await start_vm(c.cl, "vm1", node="node1")
    e = await owner_entry(c)
    owner = codec.decode(Owner, e.value)
    assert owner.granted == 0
    assert owner.token(e.mod_revision) == second > first


async def test_requesting_a_migration_keeps_the_token(c: Cluster) -> None:
    token = await running_vm(c, "vm1", "node1")
    rec = await request_migration(c.cl, "vm1", to="node2")
    e = await owner_entry(c)
    owner = codec.decode(Owner, e.value)
    assert owner.migration == rec.id
    assert owner.node == "node1"
    assert owner.token(e.mod_revision) == token


async def test_powering_off_after_a_failed_start_keeps_the_token(c: Cluster) -> None:
    await vm(c)
    token = await start_vm(c.cl, "vm1", node="node1")
    await c.report("vm1", "node1", VmState.FAILED, token=token, detail="boom")
    with pytest.raises(FerryError, match="boom"):
        await wait_started(c.cl, "vm1", token=token, timeout=2)
    e = await owner_entry(c)
    owner = codec.decode(Owner, e.value)
    assert owner.power is Power.OFF
    assert owner.token(e.mod_revision) == token


def test_amend_refuses_a_new_node() -> None:
    owner = Owner(node="node1", power=Power.ON)
    with pytest.raises(ValueError, match="new grant"):
        owner.amend(5, node="node2")
    assert owner.amend(5, node="node1").granted == 5


def test_amend_keeps_an_existing_grant() -> None:
    owner = Owner(node="node1", power=Power.ON, granted=7)
    assert owner.amend(99, power=Power.OFF).granted == 7
    assert owner.amend(99, power=Power.OFF).token(120) == 7

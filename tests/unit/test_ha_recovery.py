"""The manager's pure decision: one snapshot of the cluster -> what to do about dead nodes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import pytest

from ferry.ha.placement import HOST_RESERVE_MIB
from ferry.ha.recovery import (
    KILL_S,
    ClusterFacts,
    Fence,
    ManagerPlan,
    NodeFacts,
    NoteDown,
    NoteUp,
    OwnedVm,
    Recover,
    Stranded,
    decide,
    fence_delay,
)
from ferry.model.ha import HaPolicy, HaPriority, StartAction
from ferry.model.node import NetAddress, NodeInfo
from ferry.model.vm import DiskSpec, NicSpec, Owner, Power, VmSpec

A = TypeVar("A")
BASE = 5.0
NOW = 1000.0


def info(name: str, *, memory_mib: int = 8192, watchdog_s: float = 3.0) -> NodeInfo:
    return NodeInfo(name=name, cluster_address="10.77.0.1",
                    migration_addresses=(NetAddress("migration", "10.78.0.1"),),
                    bridge="vmswitch", memory_mib=memory_mib, cpus=2, accel="tcg",
                    version="0.1.0", started_at=1.0, lease_ttl=4, watchdog_s=watchdog_s)


def node(name: str, *, alive: bool = True, fenced: bool = False, paused: bool = False,
         memory_mib: int = 8192, watchdog_s: float = 3.0) -> NodeFacts:
    return NodeFacts(info=info(name, memory_mib=memory_mib, watchdog_s=watchdog_s),
                     alive=alive, fenced=fenced, paused=paused)


def spec(name: str, *, memory_mib: int = 256, ha: HaPolicy | None = HaPolicy()) -> VmSpec:
    return VmSpec(
        name=name, uid="0123456789ab", memory_mib=memory_mib, vcpus=1, volume="shared0",
        config_path=f"/vol/vms/{name}/vm.json",
        disks=(DiskSpec(path=f"/vol/vms/{name}/disk0.qcow2", size_bytes=1 << 30),),
        nics=(NicSpec(mac="52:54:00:01:23:45"),), ha=ha,
        start_action=StartAction.NONE if ha is not None else StartAction.START,
    )


def vm(name: str, on: str | None, *, power: Power = Power.ON, armed: bool = True,
       ha: HaPolicy | None = HaPolicy(), memory_mib: int = 256, rev: int = 10,
       migration: str | None = None, target: str | None = None) -> OwnedVm:
    return OwnedVm(spec=spec(name, memory_mib=memory_mib, ha=ha),
                   owner=Owner(node=on, power=power, ha=armed and ha is not None,
                               migration=migration, target=target),
                   owner_rev=rev)


def facts(nodes: Sequence[NodeFacts | tuple[str, NodeFacts]] = (),
          vms: Mapping[str, OwnedVm] | None = None) -> ClusterFacts:
    by_name: dict[str, NodeFacts] = {}
    for n in nodes:
        if isinstance(n, tuple):
            by_name[n[0]] = n[1]
        else:
            assert n.info is not None
            by_name[n.info.name] = n
    return ClusterFacts(nodes=by_name, vms=vms or {})


def three_nodes(*, dead: str = "node1", **dead_kw: bool) -> list[NodeFacts]:
    return [node(n, alive=n != dead, **(dead_kw if n == dead else {}))
            for n in ("node1", "node2", "node3")]


def past_delay(node_name: str = "node1", base: float = BASE) -> dict[str, float]:
    return {node_name: NOW - fence_delay(info(node_name), base)}


def of(plan: ManagerPlan, kind: type[A]) -> list[A]:
    return [a for a in plan.actions if isinstance(a, kind)]


# --- the fence delay ---------------------------------------------------------------


def test_the_fence_delay_is_at_least_the_base() -> None:
    assert fence_delay(info("n", watchdog_s=1.0), 10.0) == 10.0


def test_the_fence_delay_waits_for_the_nodes_watchdog_and_a_kill() -> None:
    assert fence_delay(info("n", watchdog_s=10.0), 4.0) == 10.0 + KILL_S
    assert KILL_S >= 1.0


def test_a_node_without_info_waits_the_base_delay() -> None:
    assert fence_delay(None, 4.0) == 4.0


# --- noting nodes down and up ----------------------------------------------------------


def test_all_up_nothing_to_do() -> None:
    plan = decide(facts(three_nodes(dead="")), now=NOW, down_since={}, base_delay=BASE)
    assert plan.actions == ()
    assert "3 nodes" in plan.reason


def test_a_node_first_seen_down_is_noted_and_nothing_else() -> None:
    f = facts(three_nodes(), {"vm1": vm("vm1", "node1")})
    plan = decide(f, now=NOW, down_since={}, base_delay=BASE)
    assert plan.actions == (NoteDown("node1"),)
    assert "node1 is down" in plan.reason


def test_a_node_up_again_is_noted() -> None:
    plan = decide(facts(three_nodes(dead="")), now=NOW, down_since={"node2": NOW - 1},
                  base_delay=BASE)
    assert plan.actions == (NoteUp("node2"),)
    assert "node2 is up again" in plan.reason


def test_a_node_up_again_after_its_delay_is_noted_up_not_fenced() -> None:
    f = facts(three_nodes(dead=""), {"vm1": vm("vm1", "node1")})
    plan = decide(f, now=NOW, down_since={"node1": NOW - 100}, base_delay=BASE)
    assert plan.actions == (NoteUp("node1"),)


# --- before the fence delay -----------------------------------------------------------


@pytest.mark.parametrize("watchdog_s", [0.0, 3.0, 9.0])
def test_nothing_is_recovered_before_the_fence_delay(watchdog_s: float) -> None:
    nodes = [node("node1", alive=False, watchdog_s=watchdog_s), node("node2")]
    f = facts(nodes, {"vm1": vm("vm1", "node1")})
    delay = max(BASE, watchdog_s + KILL_S)
    plan = decide(f, now=NOW, down_since={"node1": NOW - delay + 0.01}, base_delay=BASE)
    assert plan.actions == ()
    assert "node1 down" in plan.reason
    assert "before fencing" in plan.reason


def test_the_watchdog_lengthens_the_delay_beyond_the_base() -> None:
    nodes = [node("node1", alive=False, watchdog_s=10.0), node("node2")]
    f = facts(nodes, {"vm1": vm("vm1", "node1")})
    early = decide(f, now=NOW, down_since={"node1": NOW - BASE - 1}, base_delay=BASE)
    assert early.actions == ()
    late = decide(f, now=NOW, down_since={"node1": NOW - 11.0}, base_delay=BASE)
    assert of(late, Recover) == [Recover(vm="vm1", source="node1", target="node2",
                                         owner_rev=10, migration=None)]


def test_a_down_node_without_ha_vms_waits_quietly() -> None:
    f = facts(three_nodes(), {"vm1": vm("vm1", "node2")})
    plan = decide(f, now=NOW, down_since={"node1": NOW - 1}, base_delay=BASE)
    assert plan.actions == ()
    assert "node1" not in plan.reason


# --- recovery ------------------------------------------------------------------------


def test_after_the_delay_an_armed_ha_vm_is_recovered_on_a_live_node() -> None:
    f = facts(three_nodes(), {"vm1": vm("vm1", "node1", rev=33)})
    plan = decide(f, now=NOW, down_since=past_delay(), base_delay=BASE)
    assert plan.actions == (Recover(vm="vm1", source="node1", target="node2", owner_rev=33,
                                    migration=None),)
    assert "vm1: node1 -> node2" in plan.reason


def test_recovered_vms_spread_by_free_memory() -> None:
    nodes = [node("node1", alive=False), node("node2", memory_mib=4096),
             node("node3", memory_mib=16384)]
    f = facts(nodes, {"vm1": vm("vm1", "node1")})
    (rec,) = of(decide(f, now=NOW, down_since=past_delay(), base_delay=BASE), Recover)
    assert rec.target == "node3"


def test_memory_used_by_running_vms_counts() -> None:
    f = facts(three_nodes(), {
        "vm1": vm("vm1", "node1"),
        "big": vm("big", "node2", memory_mib=4096, ha=None),
        "off": vm("off", "node3", memory_mib=6000, power=Power.OFF, ha=None),
    })
    (rec,) = of(decide(f, now=NOW, down_since=past_delay(), base_delay=BASE), Recover)
    assert rec.target == "node3"  # the powered-off VM uses nothing


def test_recovery_follows_priority_when_not_everything_fits() -> None:
    room = 1000
    nodes = [node("node1", alive=False), node("node2", memory_mib=room + HOST_RESERVE_MIB)]
    f = facts(nodes, {
        "a-low": vm("a-low", "node1", memory_mib=600, ha=HaPolicy(HaPriority.LOW)),
        "b-high": vm("b-high", "node1", memory_mib=600, ha=HaPolicy(HaPriority.HIGH)),
        "c-medium": vm("c-medium", "node1", memory_mib=600, ha=HaPolicy(HaPriority.MEDIUM)),
    })
    plan = decide(f, now=NOW, down_since=past_delay(), base_delay=BASE)
    assert [a.vm for a in of(plan, Recover)] == ["b-high"]
    stranded = {a.vm: a for a in of(plan, Stranded)}
    assert set(stranded) == {"a-low", "c-medium"}
    assert stranded["c-medium"].node == "node1"
    assert "no node can take it" in stranded["c-medium"].why
    assert "MiB free" in stranded["c-medium"].why
    assert "stays down" in plan.reason


def test_preferred_nodes_come_first_in_their_order() -> None:
    nodes = [node("node1", alive=False), node("node2", memory_mib=65536),
             node("node3"), node("node4")]
    f = facts(nodes, {
        "vm1": vm("vm1", "node1", ha=HaPolicy(preferred_nodes=("node4", "node3"))),
        "vm2": vm("vm2", "node1", ha=HaPolicy(preferred_nodes=("node1", "node3"))),
    })
    plan = decide(f, now=NOW, down_since=past_delay(), base_delay=BASE)
    assert {a.vm: a.target for a in of(plan, Recover)} == {"vm1": "node4", "vm2": "node3"}


def test_a_full_preferred_node_is_passed_over() -> None:
    nodes = [node("node1", alive=False), node("node2"),
             node("node3", memory_mib=256 + HOST_RESERVE_MIB)]
    f = facts(nodes, {
        "a": vm("a", "node1", ha=HaPolicy(preferred_nodes=("node3",))),
        "b": vm("b", "node1", ha=HaPolicy(preferred_nodes=("node3",))),
    })
    plan = decide(f, now=NOW, down_since=past_delay(), base_delay=BASE)
    # "a" fills node3 (name order at equal priority); "b" goes to the emptiest node.
    assert {a.vm: a.target for a in of(plan, Recover)} == {"a": "node3", "b": "node2"}


def test_an_unarmed_ha_vm_is_stranded_not_recovered() -> None:
    f = facts(three_nodes(), {"vm1": vm("vm1", "node1", armed=False)})
    plan = decide(f, now=NOW, down_since=past_delay(), base_delay=BASE)
    assert of(plan, Recover) == []
    (stranded,) = of(plan, Stranded)
    assert stranded.vm == "vm1"
    assert stranded.node == "node1"
    assert "not yet armed" in stranded.why


def test_non_ha_vms_are_untouched() -> None:
    f = facts(three_nodes(), {"plain": vm("plain", "node1", ha=None)})
    plan = decide(f, now=NOW, down_since=past_delay(), base_delay=BASE)
    assert plan.actions == (Fence("node1"),)


def test_an_armed_owner_whose_spec_is_no_longer_ha_is_untouched() -> None:
    v = vm("vm1", "node1")
    v = OwnedVm(spec=spec("vm1", ha=None), owner=v.owner, owner_rev=v.owner_rev)
    assert v.owner.ha
    plan = decide(facts(three_nodes(), {"vm1": v}), now=NOW, down_since=past_delay(),
                  base_delay=BASE)
    assert of(plan, Recover) == [] and of(plan, Stranded) == []


def test_powered_off_ha_vms_are_untouched() -> None:
    f = facts(three_nodes(), {"vm1": vm("vm1", "node1", power=Power.OFF)})
    plan = decide(f, now=NOW, down_since=past_delay(), base_delay=BASE)
    assert plan.actions == (Fence("node1"),)


def test_vms_of_live_nodes_are_untouched() -> None:
    f = facts(three_nodes(), {"vm2": vm("vm2", "node2"), "vm3": vm("vm3", "node3")})
    plan = decide(f, now=NOW, down_since=past_delay(), base_delay=BASE)
    assert plan.actions == (Fence("node1"),)


def test_no_capacity_strands_with_the_reason() -> None:
    nodes = [node("node1", alive=False), node("node2", memory_mib=1024)]
    f = facts(nodes, {"vm1": vm("vm1", "node1", memory_mib=2048)})
    plan = decide(f, now=NOW, down_since=past_delay(), base_delay=BASE)
    (stranded,) = of(plan, Stranded)
    assert stranded == Stranded(vm="vm1", node="node1",
                                why="no node can take it: no node has 2048 MiB free")
    assert "vm1: stays down" in plan.reason


def test_every_node_down_strands_with_the_reason() -> None:
    nodes = [node("node1", alive=False), node("node2", alive=False)]
    f = facts(nodes, {"vm1": vm("vm1", "node1")})
    plan = decide(f, now=NOW, down_since={"node1": NOW - 100, "node2": NOW - 1},
                  base_delay=BASE)
    (stranded,) = of(plan, Stranded)
    assert "no node is up and unpaused" in stranded.why


def test_paused_nodes_receive_nothing() -> None:
    nodes = [node("node1", alive=False), node("node2", paused=True, memory_mib=65536),
             node("node3")]
    f = facts(nodes, {"vm1": vm("vm1", "node1", ha=HaPolicy(preferred_nodes=("node2",)))})
    (rec,) = of(decide(f, now=NOW, down_since=past_delay(), base_delay=BASE), Recover)
    assert rec.target == "node3"


def test_only_paused_nodes_left_strands() -> None:
    nodes = [node("node1", alive=False), node("node2", paused=True)]
    f = facts(nodes, {"vm1": vm("vm1", "node1")})
    plan = decide(f, now=NOW, down_since=past_delay(), base_delay=BASE)
    assert of(plan, Recover) == []
    (stranded,) = of(plan, Stranded)
    assert "unpaused" in stranded.why


def test_a_migrating_vms_recovery_carries_the_migration() -> None:
    f = facts(three_nodes(), {"vm1": vm("vm1", "node1", migration="m1", target="node3")})
    (rec,) = of(decide(f, now=NOW, down_since=past_delay(), base_delay=BASE), Recover)
    assert rec.migration == "m1"
    assert rec.source == "node1"


def test_a_vm_migrating_to_the_dead_node_from_a_live_one_is_untouched() -> None:
    f = facts(three_nodes(), {"vm1": vm("vm1", "node2", migration="m1", target="node1")})
    plan = decide(f, now=NOW, down_since=past_delay(), base_delay=BASE)
    assert plan.actions == (Fence("node1"),)


def test_two_dead_nodes_recovered_together_counting_each_others_placements() -> None:
    nodes = [node("node1", alive=False), node("node2", alive=False),
             node("node3", memory_mib=2 * 300 + 100 + HOST_RESERVE_MIB),
             node("node4", memory_mib=300 + 200 + HOST_RESERVE_MIB)]
    f = facts(nodes, {"a": vm("a", "node1", memory_mib=300),
                      "b": vm("b", "node2", memory_mib=300),
                      "c": vm("c", "node2", memory_mib=300)})
    down = {"node1": NOW - 100, "node2": NOW - 100}
    plan = decide(f, now=NOW, down_since=down, base_delay=BASE)
    targets = {a.vm: a.target for a in of(plan, Recover)}
    assert targets == {"a": "node3", "b": "node4", "c": "node3"}
    assert {a.source for a in of(plan, Recover)} == {"node1", "node2"}
    assert of(plan, Fence) == []  # each recovery fences its source


# --- fencing nodes without VMs to recover -------------------------------------------


def test_a_dead_node_without_vms_is_fenced_once() -> None:
    plan = decide(facts(three_nodes()), now=NOW, down_since=past_delay(), base_delay=BASE)
    assert plan.actions == (Fence("node1"),)
    assert "node1 fenced" in plan.reason
    again = decide(facts(three_nodes(fenced=True)), now=NOW, down_since=past_delay(),
                   base_delay=BASE)
    assert again.actions == ()


def test_a_node_whose_vms_are_recovered_is_not_fenced_separately() -> None:
    f = facts(three_nodes(), {"vm1": vm("vm1", "node1")})
    plan = decide(f, now=NOW, down_since=past_delay(), base_delay=BASE)
    assert of(plan, Fence) == []
    assert len(of(plan, Recover)) == 1


def test_a_node_with_only_stranded_vms_is_fenced() -> None:
    f = facts(three_nodes(), {"vm1": vm("vm1", "node1", armed=False)})
    plan = decide(f, now=NOW, down_since=past_delay(), base_delay=BASE)
    assert of(plan, Fence) == [Fence("node1")]


def test_a_fenced_node_whose_vm_is_still_owned_there_is_recovered() -> None:
    # The manager fenced node1 earlier (or a recovery transaction failed): the VM still goes.
    f = facts(three_nodes(fenced=True), {"vm1": vm("vm1", "node1")})
    plan = decide(f, now=NOW, down_since=past_delay(), base_delay=BASE)
    assert [a.vm for a in of(plan, Recover)] == ["vm1"]
    assert of(plan, Fence) == []


def test_a_node_without_info_is_handled() -> None:
    f = facts([("ghost", NodeFacts(info=None, alive=False)), node("node2")],
              {"vm1": vm("vm1", "ghost")})
    plan = decide(f, now=NOW, down_since={"ghost": NOW - BASE}, base_delay=BASE)
    assert [a.target for a in of(plan, Recover)] == ["node2"]


def test_decide_is_pure() -> None:
    f = facts(three_nodes(), {"vm1": vm("vm1", "node1")})
    down = past_delay()
    first = decide(f, now=NOW, down_since=down, base_delay=BASE)
    assert decide(f, now=NOW, down_since=down, base_delay=BASE) == first
    assert down == past_delay()

"""Pure placement: which node runs a VM."""

from __future__ import annotations

import pytest

from ferry.ha.placement import (
    HOST_RESERVE_MIB,
    Homeless,
    NodeLoad,
    check_fits,
    choose_node,
    place_all,
)
from ferry.model.errors import Conflict
from ferry.model.ha import HaPolicy, HaPriority


def load(name: str, *, memory: int = 8192, used: int = 0, up: bool = True) -> NodeLoad:
    return NodeLoad(name=name, up=up, memory_mib=memory, used_mib=used)


def test_free_memory_keeps_the_host_reserve() -> None:
    assert load("n", memory=4096, used=1000).free_mib == 4096 - 1000 - HOST_RESERVE_MIB
    assert HOST_RESERVE_MIB > 0


def test_free_memory_can_be_negative_on_an_overfull_node() -> None:
    assert load("n", memory=1024, used=1024).free_mib < 0


def test_chooses_the_node_with_most_free_memory() -> None:
    nodes = [load("a", memory=4096), load("b", memory=16384, used=10000),
             load("c", memory=8192)]
    assert choose_node(nodes, 256) == "c"


def test_used_memory_counts() -> None:
    nodes = [load("a", memory=8192, used=6000), load("b", memory=4096)]
    assert choose_node(nodes, 256) == "b"


def test_ties_are_broken_by_name() -> None:
    nodes = [load("node3"), load("node1"), load("node2")]
    assert choose_node(nodes, 256) == "node1"


def test_down_nodes_are_never_chosen() -> None:
    nodes = [load("big", memory=65536, up=False), load("small", memory=2048)]
    assert choose_node(nodes, 256) == "small"


def test_only_nodes_that_fit_are_chosen() -> None:
    # "a" has the most memory in total but not enough left.
    nodes = [load("a", memory=1024 + HOST_RESERVE_MIB, used=800),
             load("b", memory=512 + HOST_RESERVE_MIB)]
    assert choose_node(nodes, 300) == "b"


def test_an_exact_fit_is_a_fit() -> None:
    node = load("a", memory=256 + HOST_RESERVE_MIB)
    assert choose_node([node], 256) == "a"
    check_fits(node, 256)


def test_no_node_up() -> None:
    with pytest.raises(Conflict, match="no node is up"):
        choose_node([load("a", up=False), load("b", up=False)], 256)
    with pytest.raises(Conflict, match="no node is up"):
        choose_node([], 256)


def test_no_node_with_room() -> None:
    with pytest.raises(Conflict, match="no node has 9000 MiB free"):
        choose_node([load("a"), load("b", up=False, memory=65536)], 9000)


def test_check_fits_a_down_node() -> None:
    with pytest.raises(Conflict, match="node a is down"):
        check_fits(load("a", up=False), 1)


def test_check_fits_reports_free_and_needed() -> None:
    node = load("a", memory=1000 + HOST_RESERVE_MIB, used=900)
    with pytest.raises(Conflict, match="node a has 100 MiB free, the VM needs 256 MiB"):
        check_fits(node, 256)


def test_check_fits_never_reports_negative_free_memory() -> None:
    with pytest.raises(Conflict, match="has 0 MiB free"):
        check_fits(load("a", memory=100, used=100), 1)


# --- preferred nodes, paused nodes, placing a dead node's VMs ---------------------------


def paused(name: str, *, memory: int = 8192, used: int = 0) -> NodeLoad:
    return NodeLoad(name=name, up=True, memory_mib=memory, used_mib=used, paused=True)


def homeless(vm: str, *, memory: int = 256, priority: HaPriority = HaPriority.MEDIUM,
             preferred: tuple[str, ...] = ()) -> Homeless:
    return Homeless(vm=vm, memory_mib=memory,
                    policy=HaPolicy(priority=priority, preferred_nodes=preferred))


def test_eligible_means_up_and_not_paused() -> None:
    assert load("a").eligible
    assert not load("a", up=False).eligible
    assert not paused("a").eligible


def test_a_paused_node_is_never_chosen() -> None:
    nodes = [paused("big", memory=65536), load("small", memory=2048)]
    assert choose_node(nodes, 256) == "small"


def test_a_paused_preferred_node_is_passed_over() -> None:
    nodes = [paused("a"), load("b"), load("c", memory=16384)]
    assert choose_node(nodes, 256, preferred=("a", "b")) == "b"


def test_only_paused_nodes_is_no_node_up_and_unpaused() -> None:
    with pytest.raises(Conflict, match="no node is up and unpaused"):
        choose_node([paused("a"), load("b", up=False)], 256)


def test_the_first_fitting_preferred_node_wins_over_free_memory() -> None:
    nodes = [load("a", memory=65536), load("b", memory=4096), load("c", memory=4096)]
    assert choose_node(nodes, 256, preferred=("c", "b")) == "c"


def test_preferred_nodes_that_are_down_full_or_unknown_fall_back_to_the_emptiest() -> None:
    nodes = [load("down", up=False), load("full", memory=600), load("x", memory=4096),
             load("y", memory=16384)]
    assert choose_node(nodes, 256, preferred=("nope", "down", "full")) == "y"
    assert choose_node(nodes, 256, preferred=("nope", "down", "full", "x")) == "x"


def test_check_fits_accepts_a_paused_node() -> None:
    # An operator may still name a paused node explicitly.
    check_fits(paused("a"), 256)


def test_place_all_by_priority_then_name() -> None:
    nodes = [load("n1", memory=600 + HOST_RESERVE_MIB)]
    vms = [homeless("a", memory=600, priority=HaPriority.LOW),
           homeless("d", memory=600, priority=HaPriority.MEDIUM),
           homeless("c", memory=600, priority=HaPriority.HIGH),
           homeless("b", memory=600, priority=HaPriority.MEDIUM)]
    placed, unplaced = place_all(vms, nodes)
    assert placed == {"c": "n1"}
    assert set(unplaced) == {"a", "b", "d"}
    assert all("no node has 600 MiB free" in why for why in unplaced.values())


def test_place_all_counts_earlier_placements() -> None:
    nodes = [load("n1", memory=1000 + HOST_RESERVE_MIB),
             load("n2", memory=900 + HOST_RESERVE_MIB)]
    vms = [homeless(v, memory=400, priority=HaPriority.HIGH) for v in ("a", "b", "c", "d")]
    placed, unplaced = place_all(vms, nodes)
    # a -> n1 (1000 free), b -> n2 (900 > 600), c -> n1 (600 > 500), d -> n2 (500 > 200)
    assert placed == {"a": "n1", "b": "n2", "c": "n1", "d": "n2"}
    assert unplaced == {}


def test_place_all_honours_preferred_nodes_until_they_are_full() -> None:
    nodes = [load("n1", memory=16384), load("n2", memory=500 + HOST_RESERVE_MIB)]
    vms = [homeless("a", memory=300, preferred=("n2",)),
           homeless("b", memory=300, preferred=("n2",))]
    placed, _ = place_all(vms, nodes)
    assert placed == {"a": "n2", "b": "n1"}


def test_place_all_skips_paused_and_down_nodes() -> None:
    nodes = [paused("p", memory=65536), load("d", up=False, memory=65536), load("ok")]
    placed, unplaced = place_all([homeless("a", preferred=("p", "d"))], nodes)
    assert placed == {"a": "ok"}
    assert unplaced == {}


def test_place_all_with_no_node_left() -> None:
    placed, unplaced = place_all([homeless("a")], [paused("p")])
    assert placed == {}
    assert unplaced == {"a": "no node is up and unpaused"}


def test_place_all_of_nothing() -> None:
    assert place_all([], [load("a")]) == ({}, {})


def test_a_big_vm_that_does_not_fit_leaves_room_for_smaller_ones() -> None:
    nodes = [load("n1", memory=1000 + HOST_RESERVE_MIB)]
    vms = [homeless("big", memory=2000, priority=HaPriority.HIGH),
           homeless("small", memory=500, priority=HaPriority.LOW)]
    placed, unplaced = place_all(vms, nodes)
    assert placed == {"small": "n1"}
    assert set(unplaced) == {"big"}

"""Pure placement: which node runs a VM."""

from __future__ import annotations

import pytest

from ferry.ha.placement import HOST_RESERVE_MIB, NodeLoad, check_fits, choose_node
from ferry.model.errors import Conflict


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

"""Node views for users and placement, from what agents publish."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.control.nodes import list_nodes, node_loads
from ferry.control.vms import stop_vm
from ferry.ha.placement import NodeLoad
from ferry.model.node import NodeState
from tests.unit.control_harness import Cluster, make_cluster, running_vm


@pytest.fixture
async def c(tmp_path: Path) -> Cluster:
    return await make_cluster(tmp_path)


async def test_no_nodes(c: Cluster) -> None:
    assert await list_nodes(c.cl) == []
    assert await node_loads(c.cl) == []


async def test_nodes_are_listed_by_name_with_their_state(c: Cluster) -> None:
    info2 = await c.add_node("node2")
    await c.add_node("node1")
    await c.add_node("node3", up=False)
    views = await list_nodes(c.cl)
    assert [v.info.name for v in views] == ["node1", "node2", "node3"]
    assert [v.state for v in views] == [NodeState.UP, NodeState.UP, NodeState.DOWN]
    assert views[1].info == info2


async def test_a_node_whose_lease_ended_is_down_but_still_listed(c: Cluster) -> None:
    await c.add_node("node1")
    await c.node_down("node1")
    (view,) = await list_nodes(c.cl)
    assert view.state is NodeState.DOWN
    assert view.info.name == "node1"


async def test_lease_expiry_takes_a_node_down(c: Cluster) -> None:
    await c.add_node("node1")
    c.clock.advance(11)
    c.store.expire_leases()
    assert [v.state for v in await list_nodes(c.cl)] == [NodeState.DOWN]


async def test_vms_and_memory_of_each_node(c: Cluster) -> None:
    await c.add_node("node1", memory_mib=4096)
    await c.add_node("node2", memory_mib=4096)
    await running_vm(c, "b", "node1", memory_mib=256)
    await running_vm(c, "a", "node1", memory_mib=128)
    await running_vm(c, "c", "node2", memory_mib=512)
    views = {v.info.name: v for v in await list_nodes(c.cl)}
    assert views["node1"].vms == ("a", "b")
    assert views["node1"].memory_used_mib == 384
    assert views["node2"].vms == ("c",)
    assert views["node2"].memory_used_mib == 512


async def test_a_vm_powered_off_no_longer_counts(c: Cluster) -> None:
    await c.add_node("node1")
    await running_vm(c, "a", "node1", memory_mib=128)
    await stop_vm(c.cl, "a")
    (view,) = await list_nodes(c.cl)
    assert view.vms == ()
    assert view.memory_used_mib == 0


async def test_node_loads_for_placement(c: Cluster) -> None:
    await c.add_node("node1", memory_mib=4096)
    await c.add_node("node2", memory_mib=2048, up=False)
    await running_vm(c, "a", "node1", memory_mib=256)
    assert await node_loads(c.cl) == [
        NodeLoad(name="node1", up=True, memory_mib=4096, used_mib=256),
        NodeLoad(name="node2", up=False, memory_mib=2048, used_mib=0),
    ]


async def test_malformed_node_info_is_skipped(c: Cluster) -> None:
    await c.add_node("node1")
    await c.store.put(c.keys.node_info("broken"), "{not json")
    await c.store.put(c.keys.node_info("partial"), '{"name": "partial"}')
    assert [v.info.name for v in await list_nodes(c.cl)] == ["node1"]

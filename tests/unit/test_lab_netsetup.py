"""`ferry lab net`: what it refuses, before it touches anything."""

from __future__ import annotations

import pytest

from ferry.lab.layout import LabLayout
from ferry.lab.netsetup import addressed_network, net_action
from ferry.model.errors import LabError

LAYOUT = LabLayout(name="nosuchlab", tag="nsl", octet=200)


def test_only_networks_with_node_addresses() -> None:
    assert addressed_network(LAYOUT, "migration2").node_if == "mig1"
    assert addressed_network(LAYOUT, "cluster").node_if == "cl0"
    with pytest.raises(LabError, match="no lab network 'lan'"):
        addressed_network(LAYOUT, "lan")


@pytest.mark.parametrize(("node", "network", "action", "error"), [
    ("node1", "nope", "down", "no lab network 'nope' with node addresses: use one of cluster,"
                              " migration, migration2"),
    ("node7", "migration", "down", "the lab has no node 'node7'"),
    ("node1", "migration", "explode", "no network action 'explode'"),
    ("node1", "migration", "down", "node1 has no namespace nosuchlab-node1"),
])
def test_refusals(node: str, network: str, action: str, error: str) -> None:
    with pytest.raises(LabError) as info:
        net_action(LAYOUT, node, network, action)
    assert str(info.value).startswith(error)

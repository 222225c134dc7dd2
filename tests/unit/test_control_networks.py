"""`ferry network list` and `ferry network priority` on a MemoryStore cluster."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ferry.control.networks import list_networks, set_priority
from ferry.model import codec
from ferry.model.cluster import ClusterConfig
from ferry.model.errors import Conflict, InvalidSpec
from ferry.model.network import LinkState, NetworkLink, NetworkMember, NetworkRole, NodeNetworks
from ferry.store.base import ClusterStore
from tests.unit.control_harness import Cluster, make_cluster

NETS = (("cluster", "10.77.0"), ("migration", "10.78.0"), ("migration2", "10.80.0"))


@pytest.fixture
async def c(tmp_path: Path) -> Cluster:
    return await make_cluster(tmp_path)


async def publish(c: Cluster, node: str, *, down: tuple[str, ...] = (), gateway: str = "",
                  order: tuple[str, ...] = ("cluster", "migration", "migration2")) -> None:
    """Register ``node`` and publish its links as its agent does (on its lease)."""
    info = await c.add_node(node)
    index = info.cluster_address.rsplit(".", 1)[1]
    prefixes = dict(NETS)
    links = tuple(NetworkLink(
        name=n, role=NetworkRole.CLUSTER if n == "cluster" else NetworkRole.MIGRATION,
        address=f"{prefixes[n]}.{index}", subnet=f"{prefixes[n]}.0/24",
        interface=f"if-{n}", operstate="down" if n in down else "up", carrier=n not in down,
        state=LinkState.DOWN if n in down else LinkState.UP,
        default_route=n == gateway, gateway=f"{prefixes[n]}.1" if n == gateway else "")
        for n in order)
    await c.store.put(c.keys.node_networks(node), codec.encode(NodeNetworks(node, links)),
                      lease=c.leases[node])


async def test_no_nodes_no_networks(c: Cluster) -> None:
    result = await list_networks(c.cl)
    assert result.networks == () and result.priority == () and not result.cluster_priority


async def test_every_network_with_every_nodes_address_and_link(c: Cluster) -> None:
    await publish(c, "node1")
    await publish(c, "node2", down=("migration",), gateway="migration2")
    result = await list_networks(c.cl)
    assert [(v.name, v.role, v.subnets, v.priority, v.gateway) for v in result.networks] == [
        ("cluster", NetworkRole.CLUSTER, ("10.77.0.0/24",), None, False),
        ("migration", NetworkRole.MIGRATION, ("10.78.0.0/24",), 1, False),
        ("migration2", NetworkRole.MIGRATION, ("10.80.0.0/24",), 2, True),
    ]
    mig = result.networks[1]
    assert mig.members == (
        NetworkMember(node="node1", address="10.78.0.11", state=LinkState.UP, node_up=True,
                      interface="if-migration", subnet="10.78.0.0/24"),
        NetworkMember(node="node2", address="10.78.0.12", state=LinkState.DOWN, node_up=True,
                      interface="if-migration", subnet="10.78.0.0/24"),
    )
    gw = result.networks[2].members[1]
    assert (gw.default_route, gw.gateway) == (True, "10.80.0.1")
    assert result.priority == ("migration", "migration2") and not result.cluster_priority


async def test_a_down_node_is_listed_from_its_registration_link_unknown(c: Cluster) -> None:
    await publish(c, "node1")
    await publish(c, "node2")
    await c.node_down("node2")  # its published links go with its lease
    result = await list_networks(c.cl)
    members = {m.node: m for m in result.networks[1].members}
    assert members["node1"].state is LinkState.UP and members["node1"].node_up
    assert (members["node2"].address, members["node2"].state, members["node2"].node_up) == (
        "10.78.0.12", LinkState.UNKNOWN, False)
    cluster = {m.node: m for m in result.networks[0].members}
    assert cluster["node2"].address == "10.77.0.12"


async def test_the_cluster_priority_orders_the_list(c: Cluster) -> None:
    await publish(c, "node1")
    await set_priority(c.cl, ["migration2"])
    result = await list_networks(c.cl)
    assert [(v.name, v.priority) for v in result.networks] == [
        ("cluster", None), ("migration2", 1), ("migration", None)]
    assert result.priority == ("migration2",) and result.cluster_priority


async def test_set_priority_keeps_the_rest_of_the_configuration(c: Cluster) -> None:
    await publish(c, "node1")
    before = await c.cl.config()
    config = await set_priority(c.cl, ["migration2", "migration"])
    assert config == dataclasses.replace(before, migration_networks=("migration2", "migration"))
    assert await c.cl.config() == config
    cleared = await set_priority(c.cl, None)
    assert cleared == before


async def test_set_priority_on_a_cluster_without_configuration(c: Cluster) -> None:
    await publish(c, "node1")
    await c.store.delete(c.keys.cluster_config)
    config = await set_priority(c.cl, ["migration"])
    assert config == ClusterConfig(name="test", migration_networks=("migration",))


@pytest.mark.parametrize(("names", "error"), [
    ([], "name at least one migration network"),
    (["migration", "nope"],
     "unknown network 'nope': no node is on it (migration networks: migration, migration2)"),
    (["cluster"], "'cluster' is the cluster network; migrations use migration networks"
                  " (migration, migration2)"),
    (["migration", "migration"], "network 'migration' is named twice"),
])
async def test_bad_priorities_are_refused_and_change_nothing(
        c: Cluster, names: list[str], error: str) -> None:
    await publish(c, "node1")
    rev = c.revision
    with pytest.raises(InvalidSpec) as info:
        await set_priority(c.cl, names)
    assert str(info.value) == error
    assert c.revision == rev


async def test_a_down_nodes_registered_networks_count_as_known(c: Cluster) -> None:
    await c.add_node("node1", up=False)
    config = await set_priority(c.cl, ["migration"])
    assert config.migration_networks == ("migration",)


class Racing:
    """A store where someone else changes the configuration right before each write."""

    def __init__(self, c: Cluster, times: int) -> None:
        self.c, self.times = c, times

    def __getattr__(self, name: str) -> object:
        return getattr(self.c.store, name)

    async def txn(self, *args: object, **kw: object) -> object:
        if self.times > 0:
            self.times -= 1
            config = await self.c.cl.config()
            await self.c.store.put(self.c.keys.cluster_config, codec.encode(
                dataclasses.replace(config, bridge=f"br{self.times}")))
        return await self.c.store.txn(*args, **kw)  # type: ignore[arg-type]


async def test_a_concurrent_change_is_kept_not_overwritten(c: Cluster) -> None:
    await publish(c, "node1")
    racing = Racing(c, times=2)
    cl = dataclasses.replace(c.cl, store=racing)  # type: ignore[arg-type]
    config = await set_priority(cl, ["migration2"])
    assert (config.bridge, config.migration_networks) == ("br0", ("migration2",))
    assert await c.cl.config() == config


async def test_a_configuration_that_keeps_changing_gives_up(c: Cluster) -> None:
    await publish(c, "node1")
    store: ClusterStore = Racing(c, times=100)  # type: ignore[assignment]
    with pytest.raises(Conflict):
        await set_priority(dataclasses.replace(c.cl, store=store), ["migration2"], attempts=3)

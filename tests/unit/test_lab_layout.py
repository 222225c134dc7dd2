"""The lab's names and addresses (pure): they must fit Linux's limits and never collide."""

from __future__ import annotations

import ipaddress
import tomllib

import pytest

from ferry.agent.config import parse_config
from ferry.lab.layout import BRIDGE, LabLayout
from ferry.model.errors import LabError
from ferry.model.node import NetAddress

IFNAMSIZ = 15  # usable characters of a Linux interface name
SIZES = range(1, 10)
TAGS = ["fy", "abcd", "x", "z9z9"]


def interface_names(layout: LabLayout) -> list[str]:
    """Every interface the lab creates: root bridges and veth ends, names in the nodes."""
    names = [net.bridge for net in layout.networks]
    for i in range(1, layout.nodes + 1):
        names += [layout.root_peer(i, net) for net in layout.networks]
    names.append(layout.client_peer)
    names += [net.node_if for net in layout.networks]
    names += [BRIDGE, "lan0"]  # the node's switch; the client's end on the LAN
    return names


@pytest.mark.parametrize("nodes", SIZES)
@pytest.mark.parametrize("tag", TAGS)
def test_every_interface_name_fits_ifnamsiz(nodes: int, tag: str) -> None:
    layout = LabLayout(nodes=nodes, tag=tag)
    for name in interface_names(layout):
        assert 1 <= len(name) <= IFNAMSIZ, name
        assert "/" not in name and " " not in name


@pytest.mark.parametrize("nodes", SIZES)
def test_root_namespace_interface_names_are_distinct(nodes: int) -> None:
    layout = LabLayout(nodes=nodes)
    root = [net.bridge for net in layout.networks]
    root += [layout.root_peer(i, net) for i in range(1, nodes + 1) for net in layout.networks]
    root.append(layout.client_peer)
    assert len(root) == len(set(root))


def test_node_namespace_interface_names_are_distinct() -> None:
    inner = [net.node_if for net in LabLayout().networks] + [BRIDGE]
    assert len(inner) == len(set(inner))


@pytest.mark.parametrize("nodes", SIZES)
def test_addresses_are_distinct_and_inside_their_subnets(nodes: int) -> None:
    layout = LabLayout(nodes=nodes)
    seen: list[str] = [layout.host_address, layout.client_address]
    assert ipaddress.ip_address(layout.host_address) in ipaddress.ip_network(
        layout.cluster.subnet)
    assert ipaddress.ip_address(layout.client_address) in ipaddress.ip_network(layout.lan.subnet)
    for net in layout.networks:
        subnet = ipaddress.ip_network(net.subnet)
        for i in range(1, nodes + 1):
            addr = ipaddress.ip_address(net.node_address(i))
            assert addr in subnet
            assert addr not in (subnet.network_address, subnet.broadcast_address)
            seen.append(str(addr))
    assert len(seen) == len(set(seen))


def test_subnets_do_not_overlap() -> None:
    nets = [ipaddress.ip_network(n.subnet) for n in LabLayout().networks]
    for i, a in enumerate(nets):
        for b in nets[i + 1:]:
            assert not a.overlaps(b), (a, b)


def test_vm_addresses_from_first_host_do_not_collide_with_the_client() -> None:
    # create_vm hands out the LAN from .10 on; the client sits at .2.
    assert LabLayout().client_address.endswith(".2")


def test_migration_networks_have_no_gateway() -> None:
    layout = LabLayout()
    assert len(layout.migration_networks) == 2
    for net in layout.migration_networks:
        assert net.role == "migration"
        assert net.gateway is False
    assert {n.name for n in layout.networks} == {"cluster", "migration", "migration2", "lan"}


def test_three_etcd_members_listen_on_the_host_cluster_address() -> None:
    layout = LabLayout(name="lab1", octet=90)
    assert layout.host_address == "10.90.0.1"
    assert layout.etcd_urls == ["http://10.90.0.1:2379", "http://10.90.0.1:2381",
                                "http://10.90.0.1:2383"]
    members = layout.etcd_members
    assert [m.index for m in members] == [0, 1, 2]
    assert [m.name for m in members] == ["etcd1", "etcd2", "etcd3"]
    assert [m.peer_url for m in members] == ["http://10.90.0.1:2380", "http://10.90.0.1:2382",
                                             "http://10.90.0.1:2384"]
    for m in members:
        assert m.data_dir.is_relative_to(layout.shm_dir)


def _flags(argv: list[str]) -> dict[str, str]:
    assert argv[0] == "etcd"
    pairs = argv[1:]
    assert all(a.startswith("--") for a in pairs[::2]), argv
    return dict(zip(pairs[::2], pairs[1::2], strict=True))


def test_etcd_argv_names_the_whole_cluster() -> None:
    layout = LabLayout(name="lab1", octet=90)
    initial = ",".join(f"{m.name}={m.peer_url}" for m in layout.etcd_members)
    for m in layout.etcd_members:
        flags = _flags(layout.etcd_argv(m))
        assert flags["--name"] == m.name
        assert flags["--data-dir"] == str(m.data_dir)
        assert flags["--listen-client-urls"] == flags["--advertise-client-urls"] == m.client_url
        assert flags["--listen-peer-urls"] == flags["--initial-advertise-peer-urls"] == m.peer_url
        assert flags["--initial-cluster"] == initial
        assert flags["--initial-cluster-state"] == "new"
        assert flags["--initial-cluster-token"] == "lab1"
        assert (flags["--heartbeat-interval"], flags["--election-timeout"]) == ("100", "1000")
        assert flags["--auto-compaction-mode"] == "revision"


def test_etcd_ports_do_not_collide() -> None:
    members = LabLayout().etcd_members
    urls = [m.client_url for m in members] + [m.peer_url for m in members]
    assert len(set(urls)) == len(urls)


def test_each_etcd_marker_matches_only_its_own_member() -> None:
    # procs finds a member by its marker in /proc/PID/cmdline (arguments joined by spaces).
    labs = [LabLayout(name="ferry"), LabLayout(name="ferrytest", tag="ft", octet=97)]
    for layout in labs:
        for m in layout.etcd_members:
            for other_lab in labs:
                for other in other_lab.etcd_members:
                    line = " ".join(other_lab.etcd_argv(other)) + " "
                    assert (m.marker in line) == (m == other), (m.name, other.name)


@pytest.mark.parametrize("nodes", SIZES)
def test_agent_config_parses_back(nodes: int) -> None:
    layout = LabLayout(name="lab1", nodes=nodes)
    for node in layout.node_names():
        i = layout.node_index(node)
        cfg = parse_config(tomllib.loads(layout.agent_config(node, cluster="c1")))
        assert cfg.node == node
        assert cfg.cluster == "c1"
        assert cfg.bridge == BRIDGE
        assert cfg.endpoints == tuple(layout.etcd_urls)
        assert len(cfg.endpoints) == 3
        assert cfg.cluster_address == layout.cluster.node_address(i)
        assert cfg.migration_networks == tuple(
            NetAddress(n.name, n.node_address(i)) for n in layout.migration_networks)
        assert cfg.run_dir == layout.run_dir(node)
        assert cfg.accel == "tcg"
        assert cfg.timings.lease_ttl == 4


def test_node_names_and_indexes() -> None:
    layout = LabLayout(nodes=3)
    assert layout.node_names() == ["node1", "node2", "node3"]
    assert [layout.node_index(n) for n in layout.node_names()] == [1, 2, 3]
    assert layout.node_ns("node2") == "ferry-node2"
    assert layout.client_ns == "ferry-client"
    with pytest.raises(LabError, match="no node 'node4'"):
        layout.node_index("node4")


def test_paths_are_per_lab_and_per_node() -> None:
    a, b = LabLayout(name="a"), LabLayout(name="b")
    assert a.dir != b.dir
    assert a.config_path("node1") != a.config_path("node2")
    assert a.run_dir("node1") != a.run_dir("node2")
    assert a.volume_dir.is_relative_to(a.dir)


@pytest.mark.parametrize("nodes", [0, 10, -1])
def test_node_count_is_checked(nodes: int) -> None:
    with pytest.raises(LabError, match="1 to 9 nodes"):
        LabLayout(nodes=nodes)


@pytest.mark.parametrize("tag", ["", "abcde", "a-b", "a b"])
def test_tag_is_checked(tag: str) -> None:
    with pytest.raises(LabError, match="tag"):
        LabLayout(tag=tag)

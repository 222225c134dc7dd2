"""Step 1 of a migration: the network, in priority order, with every skip explained."""

from __future__ import annotations

import dataclasses

from ferry.model.network import (
    LinkState,
    NetworkChoice,
    NetworkLink,
    NetworkRole,
    NodeNetworks,
)
from ferry.network.choice import choose_network, migration_order

UP, DOWN = LinkState.UP, LinkState.DOWN
NETS = {"cluster": "10.77.0", "migration": "10.78.0", "migration2": "10.80.0", "net3": "10.81.0"}


def node(name: str, index: int, *, down: tuple[str, ...] = (), gateway: str = "",
         only: tuple[str, ...] = ("cluster", "migration", "migration2", "net3"),
         **states: LinkState) -> NodeNetworks:
    links = []
    for net in only:
        prefix = NETS[net]
        links.append(NetworkLink(
            name=net, role=NetworkRole.CLUSTER if net == "cluster" else NetworkRole.MIGRATION,
            address=f"{prefix}.{index}", subnet=f"{prefix}.0/24", interface=f"if-{net}",
            state=states.get(net, DOWN if net in down else UP),
            default_route=net == gateway, gateway=f"{prefix}.1" if net == gateway else ""))
    return NodeNetworks(node=name, networks=tuple(links))


def choose(src: NodeNetworks, dst: NodeNetworks, *others: NodeNetworks,
           priority: tuple[str, ...] = (), forced: str | None = None,
           allow_gateway: bool = False) -> NetworkChoice:
    return choose_network(source=src, target=dst, everyone=[src, dst, *others],
                          priority=priority, forced=forced, allow_gateway=allow_gateway)


def test_the_first_network_in_the_sources_order() -> None:
    c = choose_network(source=node("node1", 11), target=node("node2", 12),
                       everyone=[])
    assert (c.network, c.address, c.source_address) == ("migration", "10.78.0.12", "10.78.0.11")
    assert c.skipped == ()
    assert c.note == ("first usable in node1's configured order"
                      " (migration, migration2, net3)")


def test_the_cluster_network_is_not_a_migration_candidate_by_default() -> None:
    order, origin = migration_order((), node("node1", 11))
    assert order == ("migration", "migration2", "net3")
    assert origin == "node1's configured order"


def test_the_cluster_priority_wins_over_the_nodes_order() -> None:
    c = choose(node("node1", 11), node("node2", 12), priority=("net3", "migration"))
    assert c.network == "net3"
    assert "the cluster's priority order (net3, migration)" in c.note


def test_a_link_down_on_the_target_falls_back_to_the_next() -> None:
    c = choose_network(source=node("node1", 11), target=node("node2", 12, down=("migration",)),
                       everyone=[])
    assert c.network == "migration2"
    assert c.skipped == ("migration: link down on node2",)
    assert c.note.endswith("; skipped migration: link down on node2")


def test_a_link_down_on_the_source_too() -> None:
    c = choose_network(source=node("node1", 11, down=("migration", "migration2")),
                       target=node("node2", 12), everyone=[])
    assert c.network == "net3"
    assert c.skipped == ("migration: link down on node1", "migration2: link down on node1")


def test_a_link_down_on_both_names_both() -> None:
    c = choose(node("node1", 11, down=("migration",)), node("node2", 12, down=("migration",)))
    assert c.skipped == ("migration: link down on node1 and node2",)


def test_networks_only_one_node_is_on_are_skipped() -> None:
    c = choose_network(source=node("node1", 11),
                       target=node("node2", 12, only=("cluster", "migration2")), everyone=[])
    assert c.network == "migration2"
    assert c.skipped == ("migration: node2 has no address on it",)


def test_an_address_no_interface_holds_is_skipped() -> None:
    c = choose_network(source=node("node1", 11, migration=LinkState.MISSING),
                       target=node("node2", 12), everyone=[])
    assert c.network == "migration2"
    assert c.skipped == ("migration: no interface on node1 holds its address 10.78.0.11",)


def test_different_subnets_do_not_reach_each_other() -> None:
    target = node("node2", 12)
    moved = tuple(dataclasses.replace(n, subnet="10.99.0.0/24") if n.name == "migration" else n
                  for n in target.networks)
    c = choose_network(source=node("node1", 11), target=NodeNetworks("node2", moved),
                       everyone=[])
    assert c.skipped == ("migration: node1 and node2 are on different subnets"
                         " (10.78.0.0/24, 10.99.0.0/24)",)


def test_a_network_with_a_default_gateway_anywhere_is_skipped() -> None:
    c = choose(node("node1", 11), node("node2", 12), node("node3", 13, gateway="migration"))
    assert c.network == "migration2"
    assert c.skipped == ("migration: has a default gateway (node3 via 10.78.0.1)",)


def test_a_gateway_network_is_used_when_allowed_and_the_note_says_so() -> None:
    c = choose(node("node1", 11), node("node2", 12, gateway="migration"), allow_gateway=True)
    assert c.network == "migration"
    assert "default gateway allowed (node2 via 10.78.0.1)" in c.note


def test_nothing_fits_names_every_reason() -> None:
    c = choose(node("node1", 11), node("node2", 12, down=("migration",), gateway="migration2"),
               priority=("migration", "migration2"))
    assert c.network is None
    assert c.reason == (
        "no usable migration network between node1 and node2 in the cluster's priority order"
        " (migration, migration2): migration: link down on node2; migration2: has a default"
        " gateway (node2 via 10.80.0.1)")
    assert c.note == c.reason


def test_no_migration_network_configured() -> None:
    c = choose(node("node1", 11, only=("cluster",)), node("node2", 12))
    assert c.network is None
    assert c.reason == "node1 has no migration network configured"


def test_a_forced_network_is_the_only_one_tried() -> None:
    c = choose(node("node1", 11), node("node2", 12), forced="net3")
    assert (c.network, c.address) == ("net3", "10.81.0.12")
    assert c.note == "as requested"


def test_a_forced_network_that_is_down_is_refused() -> None:
    c = choose(node("node1", 11), node("node2", 12, down=("net3",)), forced="net3")
    assert c.network is None
    assert c.reason == "the requested network cannot be used: net3: link down on node2"


def test_a_forced_gateway_network_is_refused_unless_allowed() -> None:
    src, dst = node("node1", 11), node("node2", 12, gateway="net3")
    refused = choose(src, dst, forced="net3")
    assert refused.network is None
    assert refused.reason == (
        "the requested network cannot be used: net3: has a default gateway (node2 via"
        " 10.81.0.1) (not allowed without allow_gateway)")
    assert choose(src, dst, forced="net3", allow_gateway=True).network == "net3"


def test_the_cluster_network_cannot_be_forced() -> None:
    c = choose(node("node1", 11), node("node2", 12), forced="cluster")
    assert c.reason == ("the requested network cannot be used: cluster: it is node1's"
                        " cluster network, not a migration network")


def test_an_unknown_forced_network() -> None:
    c = choose(node("node1", 11), node("node2", 12), forced="nope")
    assert c.reason == "the requested network cannot be used: nope: node1 has no address on it"


def test_unpublished_links_count_as_usable_and_the_note_says_so() -> None:
    c = choose(node("node1", 11), node("node2", 12, migration=LinkState.UNKNOWN))
    assert c.network == "migration"
    assert c.note.endswith("link state unknown on node2")

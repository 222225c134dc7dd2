"""Reading a node's links from iproute2's JSON (samples as `ip -j -4 addr` prints them)."""

from __future__ import annotations

from typing import Any

from ferry.model.network import LinkState, NetworkLink, NetworkRole
from ferry.network.links import Wanted, link_state, links_from

WANTED = (Wanted("cluster", NetworkRole.CLUSTER, "10.77.0.11"),
          Wanted("migration", NetworkRole.MIGRATION, "10.78.0.11"),
          Wanted("migration2", NetworkRole.MIGRATION, "10.80.0.11/24"))


def link(ifname: str, address: str, *, flags: tuple[str, ...] = ("UP", "LOWER_UP"),
         operstate: str = "UP", prefixlen: int = 24) -> dict[str, Any]:
    return {"ifindex": 3, "ifname": ifname, "flags": ["BROADCAST", "MULTICAST", *flags],
            "operstate": operstate, "addr_info": [
                {"family": "inet", "local": address, "prefixlen": prefixlen, "scope": "global",
                 "label": ifname}]}


LO = {"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK", "UP", "LOWER_UP"],
      "operstate": "UNKNOWN", "addr_info": [{"family": "inet", "local": "127.0.0.1",
                                              "prefixlen": 8}]}


def test_every_configured_network_with_its_interface_subnet_and_state() -> None:
    addrs = [LO, link("cl0", "10.77.0.11"), link("mig0", "10.78.0.11"),
             link("mig1", "10.80.0.11", prefixlen=16)]
    got = links_from(WANTED, addrs, [])
    assert got == (
        NetworkLink("cluster", NetworkRole.CLUSTER, "10.77.0.11", LinkState.UP,
                    interface="cl0", subnet="10.77.0.0/24", operstate="up", carrier=True),
        NetworkLink("migration", NetworkRole.MIGRATION, "10.78.0.11", LinkState.UP,
                    interface="mig0", subnet="10.78.0.0/24", operstate="up", carrier=True),
        NetworkLink("migration2", NetworkRole.MIGRATION, "10.80.0.11", LinkState.UP,
                    interface="mig1", subnet="10.80.0.0/16", operstate="up", carrier=True),
    )


def test_a_pulled_cable_and_an_interface_set_down_are_both_down() -> None:
    no_carrier = link("mig0", "10.78.0.11", flags=("NO-CARRIER", "UP", "M-DOWN"),
                      operstate="LOWERLAYERDOWN")
    admin_down = link("mig1", "10.80.0.11", flags=(), operstate="DOWN")
    got = {n.name: n for n in links_from(WANTED, [no_carrier, admin_down], [])}
    assert got["migration"].state is LinkState.DOWN
    assert got["migration"].operstate == "lowerlayerdown"
    assert not got["migration"].carrier
    assert got["migration2"].state is LinkState.DOWN


def test_an_address_no_interface_holds_is_missing() -> None:
    got = links_from(WANTED, [link("mig0", "10.78.0.99")], [])
    assert [n.state for n in got] == [LinkState.MISSING] * 3
    assert got[1] == NetworkLink("migration", NetworkRole.MIGRATION, "10.78.0.11",
                                 LinkState.MISSING)


def test_the_default_route_marks_its_network() -> None:
    addrs = [link("cl0", "10.77.0.11"), link("mig0", "10.78.0.11"), link("mig1", "10.80.0.11")]
    routes = [{"dst": "default", "gateway": "10.80.0.1", "dev": "mig1", "flags": []},
              {"dst": "10.80.0.0/24", "dev": "mig1", "protocol": "kernel"}]
    got = {n.name: n for n in links_from(WANTED, addrs, routes)}
    assert (got["migration2"].default_route, got["migration2"].gateway) == (True, "10.80.0.1")
    assert not got["migration"].default_route and not got["cluster"].default_route


def test_multipath_and_direct_default_routes() -> None:
    addrs = [link("cl0", "10.77.0.11"), link("mig0", "10.78.0.11"), link("mig1", "10.80.0.11")]
    routes = [{"dst": "default", "nexthops": [
        {"gateway": "10.77.0.1", "dev": "cl0"}, {"gateway": "10.78.0.1", "dev": "mig0"}]},
        {"dst": "default", "dev": "mig1", "scope": "link"}]
    got = {n.name: (n.default_route, n.gateway) for n in links_from(WANTED, addrs, routes)}
    assert got == {"cluster": (True, "10.77.0.1"), "migration": (True, "10.78.0.1"),
                   "migration2": (True, "")}


def test_virtual_links_without_carrier_tracking() -> None:
    up, down = frozenset({"UP", "LOWER_UP"}), frozenset({"UP"})
    assert link_state("unknown", up) is LinkState.UP
    assert link_state("unknown", down) is LinkState.DOWN
    assert link_state("up", frozenset()) is LinkState.DOWN  # not administratively up
    assert link_state("dormant", up) is LinkState.DOWN


def test_nonsense_is_ignored_not_fatal() -> None:
    addrs = [None, {"ifname": "x", "addr_info": [{"local": 7}, "junk"]},
             {"ifname": "mig0", "flags": ["UP", "LOWER_UP"], "operstate": "UP",
              "addr_info": [{"local": "10.78.0.11", "prefixlen": 99}]}]
    assert [n.state for n in links_from(WANTED, addrs, {"not": "a list"})] == [
        LinkState.MISSING] * 3

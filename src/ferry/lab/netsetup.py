"""Build and remove a lab's namespaces, bridges and veths (idempotent, with iproute2)."""

from __future__ import annotations

import re
from pathlib import Path

from ferry.lab.layout import BRIDGE, LabLayout, Network
from ferry.model.errors import LabError
from ferry.shell import CommandFailed, run_sync


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    return run_sync(*argv, check=check, timeout=30)


def link_exists(name: str, *, ns: str | None = None) -> bool:
    try:
        ip("-o", "link", "show", "dev", name, ns=ns)
    except CommandFailed:
        return False
    return True


def namespaces() -> set[str]:
    out = run_sync("ip", "netns", "list", check=False)
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def namespace_pids(ns: str) -> list[int]:
    """Every process in network namespace ``ns`` (none if it does not exist)."""
    out = run_sync("ip", "netns", "pids", ns, check=False)
    return [int(w) for w in out.split() if w.isdigit()]


def link_names(ns: str) -> list[str]:
    """The interfaces in ``ns``, by name (``ip -o link`` prints "N: name@peer: <...> ...")."""
    out = ip("-o", "link", "show", ns=ns, check=False)
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
            if line.count(":") >= 2]


def link_is_up(name: str) -> bool | None:
    """Whether root-namespace link ``name`` is administratively up; None if it is missing."""
    try:
        flags = int(Path(f"/sys/class/net/{name}/flags").read_text(), 16)
    except (OSError, ValueError):
        return None
    return bool(flags & 0x1)  # IFF_UP


def _sysctl(key: str, value: str, *, ns: str | None = None) -> None:
    argv = ["sysctl", "-q", "-w", f"{key}={value}"]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    run_sync(*argv, check=False)


def _bridge(name: str, *, ns: str | None = None) -> None:
    if not link_exists(name, ns=ns):
        ip("link", "add", name, "type", "bridge", ns=ns)
    # No STP delay and no netfilter on bridged frames: the lab measures the switch itself.
    ip("link", "set", "dev", name, "type", "bridge", "forward_delay", "0", "stp_state", "0",
       ns=ns, check=False)
    ip("link", "set", "dev", name, "type", "bridge", "nf_call_iptables", "0", ns=ns, check=False)
    if ns is None:
        _sysctl(f"net.ipv6.conf.{name}.disable_ipv6", "1")
    ip("link", "set", "dev", name, "up", ns=ns)


def _namespace(ns: str) -> None:
    if ns not in namespaces():
        run_sync("ip", "netns", "add", ns)
    # No IPv6 in the lab: router solicitations would re-teach the switch and hide whether
    # the migration's announce works.
    _sysctl("net.ipv6.conf.all.disable_ipv6", "1", ns=ns)
    _sysctl("net.ipv6.conf.default.disable_ipv6", "1", ns=ns)
    ip("link", "set", "dev", "lo", "up", ns=ns)


def _veth(*, ns: str, inner: str, outer: str, bridge: str) -> None:
    """A veth whose inner end is in ``ns`` and outer end a port of root bridge ``bridge``."""
    if not link_exists(inner, ns=ns):
        if link_exists(outer):
            ip("link", "delete", "dev", outer, check=False)
        ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
    _sysctl(f"net.ipv6.conf.{outer}.disable_ipv6", "1")
    ip("link", "set", "dev", outer, "master", bridge, "up")
    ip("link", "set", "dev", inner, "up", ns=ns)


def _address(ns: str, dev: str, cidr: str) -> None:
    ip("addr", "replace", cidr, "dev", dev, ns=ns)


def build(layout: LabLayout) -> None:
    for net in layout.networks:
        _bridge(net.bridge)
    ip("addr", "replace", f"{layout.host_address}/24", "dev", layout.cluster.bridge)
    for node in layout.node_names():
        _build_node(layout, node)
    ns = layout.client_ns
    _namespace(ns)
    _veth(ns=ns, inner="lan0", outer=layout.client_peer, bridge=layout.lan.bridge)
    _address(ns, "lan0", f"{layout.client_address}/24")


def _build_node(layout: LabLayout, node: str) -> None:
    i = layout.node_index(node)
    ns = layout.node_ns(node)
    _namespace(ns)
    net: Network
    for net in (layout.cluster, *layout.migration_networks):
        _veth(ns=ns, inner=net.node_if, outer=layout.root_peer(i, net), bridge=net.bridge)
        _address(ns, net.node_if, f"{net.node_address(i)}/24")
    _bridge(BRIDGE, ns=ns)
    _veth(ns=ns, inner=layout.lan.node_if, outer=layout.root_peer(i, layout.lan),
          bridge=layout.lan.bridge)
    ip("link", "set", "dev", layout.lan.node_if, "master", BRIDGE, "up", ns=ns)
    # Lab nodes have no default route; `lab net NODE NET gateway` adds one, `lab up` undoes it.
    ip("route", "del", "default", ns=ns, check=False)


def set_link(layout: LabLayout, node: str, network: str, *, up: bool) -> None:
    """Cut or restore one node's link to a network (from the root side, like a cable)."""
    nets = {n.name: n for n in layout.networks}
    if network not in nets:
        raise CommandFailed(["ip"], 1, f"no network {network}")
    peer = layout.root_peer(layout.node_index(node), nets[network])
    ip("link", "set", "dev", peer, "up" if up else "down")


NET_ACTIONS = ("down", "up", "cut", "plug", "gateway", "no-gateway")


def addressed_network(layout: LabLayout, network: str) -> Network:
    """A network the nodes have an address on (the cluster and migration networks)."""
    nets = {n.name: n for n in (layout.cluster, *layout.migration_networks)}
    if network not in nets:
        raise LabError(f"no lab network {network!r} with node addresses: use one of"
                       f" {', '.join(nets)}")
    return nets[network]


def net_action(layout: LabLayout, node: str, network: str, action: str) -> str:
    """Change one node's link to a network; returns what was done.

    down/up: the node sets its interface down or up (`ip link set mig0 down` on a host);
    cut/plug: its cable (the root-side veth end: the node sees no carrier);
    gateway/no-gateway: the node's default route goes through the network (next hop .1,
    which need not answer: the route alone makes the network a routed one), or is removed.
    """
    net = addressed_network(layout, network)
    layout.node_index(node)  # LabError for an unknown node
    ns = layout.node_ns(node)
    if action not in NET_ACTIONS:
        raise LabError(f"no network action {action!r}: use one of {', '.join(NET_ACTIONS)}")
    if ns not in namespaces():
        raise LabError(f"{node} has no namespace {ns}: run `ferry lab up`")
    if action in ("down", "up"):
        ip("link", "set", "dev", net.node_if, action, ns=ns)
        return f"{node}: {net.node_if} ({network}) set {action}"
    if action in ("cut", "plug"):
        set_link(layout, node, network, up=action == "plug")
        done = "plugged in" if action == "plug" else "cut"
        return f"{node}: cable of {net.node_if} ({network}) {done}"
    if action == "gateway":
        hop = f"{net.subnet_prefix}.1"
        ip("route", "replace", "default", "via", hop, "dev", net.node_if, ns=ns)
        return f"{node}: default route via {hop} on {net.node_if} ({network})"
    ip("route", "del", "default", ns=ns, check=False)  # none there is fine
    return f"{node}: no default route"


def lab_namespaces(layout: LabLayout) -> list[str]:
    """The lab's namespaces that exist (also nodes beyond ``layout.nodes`` of an older build)."""
    return sorted(ns for ns in namespaces()
                  if ns == layout.client_ns or re.fullmatch(rf"{layout.name}-node\d+", ns))


def teardown(layout: LabLayout) -> list[str]:
    """Remove every namespace and link of the lab; return what was removed."""
    removed = []
    for ns in lab_namespaces(layout):
        run_sync("ip", "netns", "delete", ns, check=False)
        removed.append(f"namespace {ns}")
    # Deleting a namespace deletes the veth ends in it, and with them their root peers; a
    # leftover from an interrupted build may remain.
    peers = [layout.root_peer(i, net) for i in range(1, 10) for net in layout.networks]
    for peer in peers + [layout.client_peer]:
        if link_exists(peer):
            ip("link", "delete", "dev", peer, check=False)
            removed.append(f"link {peer}")
    for net in layout.networks:
        if link_exists(net.bridge):
            ip("link", "delete", "dev", net.bridge, check=False)
            removed.append(f"bridge {net.bridge}")
    return removed

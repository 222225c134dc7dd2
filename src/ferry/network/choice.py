"""Step 1 of a migration: which network carries it. Pure: it decides on published state.

The networks are tried in priority order (the cluster's, else the source's configured
order); the first one both nodes have an address on, in the same subnet, with the link up
on both and without a default gateway, wins. A gateway network is refused unless the
migration allows it: a routed network may send the memory stream off through a router
(slow, and VM memory leaves the cluster's own wires). A forced network is the only one
tried. Every skipped network is named with its reason, for the migration's timeline.
"""

from __future__ import annotations

from collections.abc import Sequence

from ferry.model.network import LinkState, NetworkChoice, NetworkRole, NodeNetworks


def migration_order(priority: Sequence[str], source: NodeNetworks) -> tuple[tuple[str, ...], str]:
    """The networks to try and where that order comes from."""
    if priority:
        return tuple(priority), "the cluster's priority order"
    own = tuple(n.name for n in source.networks if n.role is NetworkRole.MIGRATION)
    return own, f"{source.node}'s configured order"


def gateways(name: str, everyone: Sequence[NodeNetworks]) -> tuple[str, ...]:
    """"node2 via 10.78.0.1" for each node that routes its default traffic through ``name``."""
    out = []
    for nodes in everyone:
        link = nodes.get(name)
        if link is not None and link.default_route:
            out.append(f"{nodes.node} via {link.gateway}" if link.gateway else nodes.node)
    return tuple(out)


def _link_problem(name: str, nodes: NodeNetworks) -> str | None:
    link = nodes.get(name)
    if link is None:
        return f"{name}: {nodes.node} has no address on it"
    if link.role is not NetworkRole.MIGRATION:
        return f"{name}: it is {nodes.node}'s {link.role.value} network, not a migration network"
    if link.state is LinkState.MISSING:
        return f"{name}: no interface on {nodes.node} holds its address {link.address}"
    return None


def unusable(name: str, source: NodeNetworks, target: NodeNetworks,
             everyone: Sequence[NodeNetworks], *, allow_gateway: bool) -> str | None:
    """Why ``name`` cannot carry this migration, or None if it can."""
    for nodes in (source, target):
        problem = _link_problem(name, nodes)
        if problem:
            return problem
    mine, theirs = source.get(name), target.get(name)
    assert mine is not None and theirs is not None
    down = [n.node for n, link in ((source, mine), (target, theirs)) if not link.state.usable]
    if down:
        return f"{name}: link down on {' and '.join(down)}"
    if mine.subnet and theirs.subnet and mine.subnet != theirs.subnet:
        return (f"{name}: {source.node} and {target.node} are on different subnets"
                f" ({mine.subnet}, {theirs.subnet})")
    routed = gateways(name, everyone)
    if routed and not allow_gateway:
        return f"{name}: has a default gateway ({', '.join(routed)})"
    return None


def choose_network(*, source: NodeNetworks, target: NodeNetworks,
                   everyone: Sequence[NodeNetworks], priority: Sequence[str] = (),
                   forced: str | None = None, allow_gateway: bool = False) -> NetworkChoice:
    """The network for a migration from ``source`` to ``target``. ``everyone`` is every
    node's published networks (a default gateway anywhere makes a network routed)."""
    if forced:
        why = unusable(forced, source, target, everyone, allow_gateway=allow_gateway)
        if why:
            hint = " (not allowed without allow_gateway)" if "default gateway" in why else ""
            return NetworkChoice(None, reason=f"the requested network cannot be used: {why}"
                                              f"{hint}")
        return _chosen(forced, source, target, everyone, "as requested")
    order, origin = migration_order(priority, source)
    if not order:
        return NetworkChoice(None, reason=f"{source.node} has no migration network configured")
    skipped: list[str] = []
    for name in order:
        why = unusable(name, source, target, everyone, allow_gateway=allow_gateway)
        if why is None:
            return _chosen(name, source, target, everyone,
                           f"first usable in {origin} ({', '.join(order)})", tuple(skipped))
        skipped.append(why)
    return NetworkChoice(None, skipped=tuple(skipped), reason=(
        f"no usable migration network between {source.node} and {target.node} in {origin}"
        f" ({', '.join(order)}): {'; '.join(skipped)}"))


def _chosen(name: str, source: NodeNetworks, target: NodeNetworks,
            everyone: Sequence[NodeNetworks], why: str,
            skipped: tuple[str, ...] = ()) -> NetworkChoice:
    mine, theirs = source.get(name), target.get(name)
    assert mine is not None and theirs is not None
    routed = gateways(name, everyone)
    if routed:  # only here when gateways are allowed
        why += f", default gateway allowed ({', '.join(routed)})"
    unknown = [n.node for n, link in ((source, mine), (target, theirs))
               if link.state is LinkState.UNKNOWN]
    if unknown:
        why += f", link state unknown on {', '.join(unknown)}"
    return NetworkChoice(name, address=theirs.address, source_address=mine.address,
                         skipped=skipped, reason=why)

"""Cluster networks: what the nodes publish about them, and the migration priority order.

Like ``Get-ClusterNetwork``: every network by name, its subnet and role, whether it is
routed (a default gateway on some node), and each node's address and link state on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ferry.control.client import ClusterClient
from ferry.model import codec
from ferry.model.cluster import ClusterConfig
from ferry.model.errors import Conflict, InvalidSpec
from ferry.model.network import (
    LinkState,
    NetworkLink,
    NetworkMember,
    NetworkRole,
    NetworkView,
    NodeNetworks,
)
from ferry.model.node import NodeInfo
from ferry.store.ops import cas

CLUSTER_NETWORK = "cluster"  # its name for a node that has not published its networks


@dataclass(frozen=True)
class NetworkList:
    networks: tuple[NetworkView, ...]
    priority: tuple[str, ...]  # the migration order in effect
    cluster_priority: bool  # set for the cluster; else each source's configured order


def registered(info: NodeInfo) -> NodeNetworks:
    """A node that published nothing (down, or an older agent): its registered addresses,
    link state unknown."""
    links = [NetworkLink(name=CLUSTER_NETWORK, role=NetworkRole.CLUSTER,
                         address=info.cluster_address, state=LinkState.UNKNOWN)]
    links += [NetworkLink(name=a.network, role=NetworkRole.MIGRATION, address=a.address,
                          state=LinkState.UNKNOWN) for a in info.migration_addresses]
    return NodeNetworks(node=info.name, networks=tuple(links))


async def _nodes(cl: ClusterClient) -> tuple[list[NodeNetworks], set[str]]:
    """Every registered node's networks (by node name), and the nodes that are up."""
    infos = await cl.all_of(NodeInfo, cl.keys.nodes, "info")
    published = await cl.all_of(NodeNetworks, cl.keys.nodes, "networks")
    alive = await cl.store.get_prefix(cl.keys.nodes)
    up = {e.key[len(cl.keys.nodes):].split("/", 1)[0] for e in alive[0]
          if e.key.endswith("/alive")}
    names = sorted(set(infos) | set(published))
    return [published[n] if n in published else registered(infos[n]) for n in names], up


def default_order(nodes: Sequence[NodeNetworks]) -> tuple[str, ...]:
    """The nodes' own configured order of their migration networks (merged, by node name)."""
    order: list[str] = []
    for n in nodes:
        order += [link.name for link in n.networks
                  if link.role is NetworkRole.MIGRATION and link.name not in order]
    return tuple(order)


def network_views(nodes: Sequence[NodeNetworks], up: set[str],
                  priority: Sequence[str]) -> tuple[NetworkView, ...]:
    """Pure: group the nodes' links by network; the cluster network first, then the
    migration order, then the rest by name."""
    members: dict[str, list[tuple[NetworkLink, NetworkMember]]] = {}
    for n in nodes:
        for link in n.networks:
            members.setdefault(link.name, []).append((link, NetworkMember(
                node=n.node, address=link.address, state=link.state, node_up=n.node in up,
                interface=link.interface, subnet=link.subnet, gateway=link.gateway,
                default_route=link.default_route)))
    views = []
    for name, pairs in members.items():
        roles = {link.role for link, _ in pairs}
        views.append(NetworkView(
            name=name,
            role=NetworkRole.CLUSTER if NetworkRole.CLUSTER in roles else NetworkRole.MIGRATION,
            subnets=tuple(sorted({m.subnet for _, m in pairs if m.subnet})),
            gateway=any(m.default_route for _, m in pairs),
            priority=priority.index(name) + 1 if name in priority else None,
            members=tuple(m for _, m in pairs)))

    def rank(v: NetworkView) -> tuple[int, int, str]:
        first = 0 if v.role is NetworkRole.CLUSTER else 1
        return first, v.priority or len(priority) + 1, v.name

    return tuple(sorted(views, key=rank))


async def list_networks(cl: ClusterClient) -> NetworkList:
    nodes, up = await _nodes(cl)
    config = await cl.config()
    priority = config.migration_networks or default_order(nodes)
    return NetworkList(networks=network_views(nodes, up, priority), priority=priority,
                       cluster_priority=bool(config.migration_networks))


def check_priority(names: Sequence[str], nodes: Sequence[NodeNetworks]) -> None:
    """InvalidSpec unless ``names`` are distinct migration networks some node is on."""
    roles = {link.name: link.role for n in nodes for link in n.networks}
    known = ", ".join(sorted(k for k, r in roles.items() if r is NetworkRole.MIGRATION))
    if not names:
        raise InvalidSpec("name at least one migration network")
    for name in names:
        if names.count(name) > 1:
            raise InvalidSpec(f"network {name!r} is named twice")
        if name not in roles:
            raise InvalidSpec(f"unknown network {name!r}: no node is on it (migration"
                              f" networks: {known or 'none'})")
        if roles[name] is not NetworkRole.MIGRATION:
            raise InvalidSpec(f"{name!r} is the cluster network; migrations use migration"
                              f" networks ({known or 'none'})")


async def set_priority(cl: ClusterClient, names: Sequence[str] | None,
                       *, attempts: int = 10) -> ClusterConfig:
    """Set (None: clear) the cluster's migration network order, with compare-and-swap on
    the configuration key so a concurrent change to other settings is never lost."""
    if names is not None:
        check_priority(names, (await _nodes(cl))[0])
    order = tuple(names or ())
    key = cl.keys.cluster_config
    for _ in range(attempts):
        entry = await cl.store.get(key)
        config = (codec.decode(ClusterConfig, entry.value) if entry is not None
                  else ClusterConfig(name=cl.keys.cluster))
        new = dataclasses.replace(config, migration_networks=order)
        if new == config:
            return config
        if await cas(cl.store, key, codec.encode(new),
                     mod_revision=entry.mod_revision if entry else 0) is not None:
            return new
    raise Conflict("the cluster configuration changed concurrently; try again")

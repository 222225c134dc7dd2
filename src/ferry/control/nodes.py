"""Node views for users and for placement."""

from __future__ import annotations

import time

from ferry.control.client import ClusterClient
from ferry.ha.placement import NodeLoad
from ferry.model.errors import Conflict
from ferry.model.node import NodeInfo, NodeState, NodeView
from ferry.model.vm import Owner, Power, VmSpec
from ferry.store.base import Compare, Put


def node_state(*, alive: bool, fenced: bool, paused: bool) -> NodeState:
    """Up (or paused, if an operator paused it) while its lease lives; fenced once the
    manager took its VMs away, until it rejoins; down otherwise."""
    if alive:
        return NodeState.PAUSED if paused else NodeState.UP
    return NodeState.FENCED if fenced else NodeState.DOWN


async def list_nodes(cl: ClusterClient) -> list[NodeView]:
    infos = await cl.all_of(NodeInfo, cl.keys.nodes, "info")
    entries, _ = await cl.store.get_prefix(cl.keys.nodes)
    flags = {tuple(e.key[len(cl.keys.nodes):].split("/", 1)) for e in entries}
    specs = await cl.all_of(VmSpec, cl.keys.vms, "spec")
    owners = await cl.all_of(Owner, cl.keys.vms, "owner")
    views = []
    for name, info in sorted(infos.items()):
        vms = tuple(sorted(v for v, o in owners.items()
                           if o.node == name and o.power is Power.ON))
        used = sum(specs[v].memory_mib for v in vms if v in specs)
        state = node_state(alive=(name, "alive") in flags, fenced=(name, "fenced") in flags,
                           paused=(name, "paused") in flags)
        views.append(NodeView(info=info, state=state, vms=vms, memory_used_mib=used))
    return views


async def node_loads(cl: ClusterClient) -> list[NodeLoad]:
    return [NodeLoad(name=v.info.name, up=v.state in (NodeState.UP, NodeState.PAUSED),
                     paused=v.state is NodeState.PAUSED,
                     memory_mib=v.info.memory_mib, used_mib=v.memory_used_mib)
            for v in await list_nodes(cl)]


async def pause_node(cl: ClusterClient, name: str) -> None:
    """No VM is placed on a paused node by the cluster (new starts, HA recovery); its
    running VMs stay. Like pausing a node in a Hyper-V cluster, before maintenance."""
    await cl.node(name)
    res = await cl.store.txn([Compare.absent(cl.keys.node_paused(name))],
                             [Put(cl.keys.node_paused(name), str(time.time()))])
    if not res.succeeded:
        raise Conflict(f"node {name} is already paused")


async def resume_node(cl: ClusterClient, name: str) -> None:
    await cl.node(name)
    if await cl.store.delete(cl.keys.node_paused(name)) == 0:
        raise Conflict(f"node {name} is not paused")

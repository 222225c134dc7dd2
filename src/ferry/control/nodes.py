"""Node views for users and for placement."""

from __future__ import annotations

from ferry.control.client import ClusterClient
from ferry.ha.placement import NodeLoad
from ferry.model.node import NodeInfo, NodeState, NodeView
from ferry.model.vm import Owner, Power, VmSpec


async def list_nodes(cl: ClusterClient) -> list[NodeView]:
    infos = await cl.all_of(NodeInfo, cl.keys.nodes, "info")
    alive_entries, _ = await cl.store.get_prefix(cl.keys.nodes)
    alive = {e.key[len(cl.keys.nodes):].split("/")[0] for e in alive_entries
             if e.key.endswith("/alive")}
    specs = await cl.all_of(VmSpec, cl.keys.vms, "spec")
    owners = await cl.all_of(Owner, cl.keys.vms, "owner")
    views = []
    for name, info in sorted(infos.items()):
        vms = tuple(sorted(v for v, o in owners.items()
                           if o.node == name and o.power is Power.ON))
        used = sum(specs[v].memory_mib for v in vms if v in specs)
        state = NodeState.UP if name in alive else NodeState.DOWN
        views.append(NodeView(info=info, state=state, vms=vms, memory_used_mib=used))
    return views


async def node_loads(cl: ClusterClient) -> list[NodeLoad]:
    return [NodeLoad(name=v.info.name, up=v.state is NodeState.UP,
                     memory_mib=v.info.memory_mib, used_mib=v.memory_used_mib)
            for v in await list_nodes(cl)]

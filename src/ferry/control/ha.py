"""HA settings of VMs, start actions, and the cluster's event log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from ferry.control.client import ClusterClient
from ferry.model import codec
from ferry.model.errors import Conflict, InvalidSpec
from ferry.model.ha import Event, HaPolicy, HaPriority, StartAction
from ferry.model.vm import VmSpec
from ferry.store.base import Compare, Put


async def _update_spec(cl: ClusterClient, name: str, spec: VmSpec, new: VmSpec) -> VmSpec:
    new.check()
    entry = await cl.store.get(cl.keys.vm_spec(name))
    if entry is None or codec.decode(VmSpec, entry.value) != spec:
        raise Conflict(f"VM {name} changed meanwhile; try again")
    res = await cl.store.txn([Compare.unchanged(cl.keys.vm_spec(name), entry.mod_revision)],
                             [Put(cl.keys.vm_spec(name), codec.encode(new))])
    if not res.succeeded:
        raise Conflict(f"VM {name} changed meanwhile; try again")
    return new


async def check_policy(cl: ClusterClient, spec: VmSpec, policy: HaPolicy) -> None:
    """Raise if ``policy`` cannot apply to the VM; changes nothing."""
    for node in policy.preferred_nodes:
        await cl.node(node)  # NotFound names the node
    if len(set(policy.preferred_nodes)) != len(policy.preferred_nodes):
        raise InvalidSpec("a preferred node is listed twice")
    await cl.volume(spec.volume)  # the VM's disk must be on a shared volume every node sees


async def set_ha(cl: ClusterClient, name: str, *, priority: HaPriority = HaPriority.MEDIUM,
                 preferred_nodes: Sequence[str] = ()) -> VmSpec:
    """Make the VM highly available (or change its priority / preferred nodes). Its start
    action becomes 'none': only the cluster decides where and when it starts."""
    spec = await cl.spec(name)
    policy = HaPolicy(priority=priority, preferred_nodes=tuple(preferred_nodes))
    await check_policy(cl, spec, policy)
    return await _update_spec(cl, name, spec,
                              replace(spec, ha=policy, start_action=StartAction.NONE))


async def remove_ha(cl: ClusterClient, name: str) -> VmSpec:
    spec = await cl.spec(name)
    if spec.ha is None:
        raise Conflict(f"VM {name} is not highly available")
    return await _update_spec(cl, name, spec,
                              replace(spec, ha=None, start_action=StartAction.START))


async def set_start_action(cl: ClusterClient, name: str, action: StartAction) -> VmSpec:
    spec = await cl.spec(name)
    if spec.ha is not None and action is not StartAction.NONE:
        raise Conflict(f"VM {name} is highly available: its start action is 'none' (the"
                       " cluster decides where it starts); `ferry vm ha remove` first")
    return await _update_spec(cl, name, spec, replace(spec, start_action=action))


def _matches(ev: Event, *, vm: str | None, node: str | None) -> bool:
    return (vm is None or ev.vm == vm) and (node is None or node in (ev.node, ev.by))


async def list_events(cl: ClusterClient, *, limit: int = 50, vm: str | None = None,
                      node: str | None = None) -> tuple[list[Event], int]:
    """The latest ``limit`` events (oldest first), and the store revision of the read."""
    entries, rev = await cl.store.get_prefix(cl.keys.events)
    events = []
    for e in entries:
        try:
            ev = codec.decode(Event, e.value)
        except InvalidSpec:
            continue
        if _matches(ev, vm=vm, node=node):
            events.append(ev)
    return events[-limit:] if limit > 0 else events, rev


async def follow_events(cl: ClusterClient, *, after: int, vm: str | None = None,
                        node: str | None = None) -> AsyncIterator[Event]:
    """Events written after revision ``after``, as they come."""
    async for batch in cl.store.watch(cl.keys.events, start_revision=after + 1):
        for w in batch:
            if not w.value:
                continue  # pruned
            try:
                ev = codec.decode(Event, w.value)
            except InvalidSpec:
                continue
            if _matches(ev, vm=vm, node=node):
                yield ev
        await asyncio.sleep(0)

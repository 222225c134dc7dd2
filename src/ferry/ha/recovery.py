"""Pure: what the manager does about dead nodes, from one snapshot of the cluster.

Rules (design/ha.md):
- a node whose ``alive`` key is gone is *down*; the manager notes when it first saw that;
- once down for the node's fence delay (>= its watchdog timeout + kill time, so its HA
  QEMUs must be dead by then, killed by its agent or its watchdog), the node is *fenceable*:
  each of its VMs that is HA, armed by that node and meant to run moves to a surviving node,
  one transaction per VM, and the node is marked fenced;
- a VM that is HA in its spec but was never armed by its node may still run there unguarded
  (the node may not have heard of the change): it is left alone, and an event says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ferry.ha.placement import Homeless, NodeLoad, place_all
from ferry.model.migration import MigrationRecord
from ferry.model.node import NodeInfo
from ferry.model.vm import Owner, Power, VmSpec

KILL_S = 1.0  # time allowed for a watchdog to notice and a SIGKILL to finish


@dataclass(frozen=True)
class NodeFacts:
    info: NodeInfo | None
    alive: bool
    fenced: bool = False
    paused: bool = False


@dataclass(frozen=True)
class OwnedVm:
    spec: VmSpec
    owner: Owner
    owner_rev: int


@dataclass(frozen=True)
class ClusterFacts:
    nodes: Mapping[str, NodeFacts]
    vms: Mapping[str, OwnedVm]
    migrations: Mapping[str, tuple[MigrationRecord, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class NoteDown:
    node: str


@dataclass(frozen=True)
class NoteUp:
    node: str


@dataclass(frozen=True)
class Recover:
    vm: str
    source: str
    target: str
    owner_rev: int
    migration: str | None  # a migration from the dead node that this ends


@dataclass(frozen=True)
class Fence:
    node: str


@dataclass(frozen=True)
class Stranded:
    vm: str
    node: str
    why: str


ManagerAction = NoteDown | NoteUp | Recover | Fence | Stranded


@dataclass(frozen=True)
class ManagerPlan:
    actions: tuple[ManagerAction, ...]
    reason: str


def fence_delay(info: NodeInfo | None, base: float) -> float:
    """At least ``base``, and long enough for that node's own watchdog to have fired."""
    watchdog = info.watchdog_s if info is not None else 0.0
    return max(base, watchdog + KILL_S)


def decide(facts: ClusterFacts, *, now: float, down_since: Mapping[str, float],
           base_delay: float) -> ManagerPlan:
    actions: list[ManagerAction] = []
    notes: list[str] = []
    fenceable: list[str] = []
    for name, node in sorted(facts.nodes.items()):
        if node.alive:
            if name in down_since:
                actions.append(NoteUp(name))
                notes.append(f"{name} is up again")
            continue
        if name not in down_since:
            actions.append(NoteDown(name))
            notes.append(f"{name} is down")
            continue
        waited = now - down_since[name]
        delay = fence_delay(node.info, base_delay)
        if waited >= delay:
            fenceable.append(name)
        elif _has_ha_vms(facts, name):
            notes.append(f"{name} down {waited:.1f}s of {delay:.1f}s before fencing")
    if fenceable:
        acts, why = _recover(facts, fenceable)
        actions.extend(acts)
        notes.extend(why)
    return ManagerPlan(actions=tuple(actions),
                       reason="; ".join(notes) or f"all {len(facts.nodes)} nodes accounted for")


def _has_ha_vms(facts: ClusterFacts, node: str) -> bool:
    return any(v.owner.node == node and v.owner.ha for v in facts.vms.values())


def _loads(facts: ClusterFacts) -> list[NodeLoad]:
    used: dict[str, int] = {}
    for v in facts.vms.values():
        if v.owner.node is not None and v.owner.power is Power.ON:
            used[v.owner.node] = used.get(v.owner.node, 0) + v.spec.memory_mib
    return [NodeLoad(name=n, up=f.alive, paused=f.paused,
                     memory_mib=f.info.memory_mib if f.info else 0, used_mib=used.get(n, 0))
            for n, f in sorted(facts.nodes.items())]


def _recover(facts: ClusterFacts, dead: list[str]) -> tuple[list[ManagerAction], list[str]]:
    actions: list[ManagerAction] = []
    notes: list[str] = []
    homeless: list[Homeless] = []
    for name, v in sorted(facts.vms.items()):
        owner = v.owner
        if owner.node not in dead or owner.power is not Power.ON or v.spec.ha is None:
            continue
        if not owner.ha:
            actions.append(Stranded(vm=name, node=owner.node, why=(
                f"HA was not yet armed on {owner.node}: it may still run there unguarded")))
            continue
        homeless.append(Homeless(vm=name, memory_mib=v.spec.memory_mib, policy=v.spec.ha))
    placed, unplaced = place_all(homeless, _loads(facts))
    for name, target in sorted(placed.items()):
        v = facts.vms[name]
        assert v.owner.node is not None
        actions.append(Recover(vm=name, source=v.owner.node, target=target,
                               owner_rev=v.owner_rev, migration=v.owner.migration))
        notes.append(f"{name}: {v.owner.node} -> {target}")
    for name, why in sorted(unplaced.items()):
        node = facts.vms[name].owner.node or ""
        actions.append(Stranded(vm=name, node=node, why=f"no node can take it: {why}"))
        notes.append(f"{name}: stays down ({why})")
    busy = {a.source for a in actions if isinstance(a, Recover)}
    for node in dead:
        if node not in busy and not facts.nodes[node].fenced:
            actions.append(Fence(node))
            notes.append(f"{node} fenced")
    return actions, notes

"""Pure placement: which node should run a VM, and where a dead node's HA VMs go."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ferry.model.errors import Conflict
from ferry.model.ha import HaPolicy

# Left for QEMU itself and the host: a node is not filled to the last MiB.
HOST_RESERVE_MIB = 512


@dataclass(frozen=True)
class NodeLoad:
    name: str
    up: bool
    memory_mib: int
    used_mib: int
    paused: bool = False

    @property
    def free_mib(self) -> int:
        return self.memory_mib - self.used_mib - HOST_RESERVE_MIB

    @property
    def eligible(self) -> bool:
        """May receive VMs chosen by the cluster (an operator may still name a paused node)."""
        return self.up and not self.paused


def check_fits(node: NodeLoad, memory_mib: int) -> None:
    if not node.up:
        raise Conflict(f"node {node.name} is down")
    if node.free_mib < memory_mib:
        raise Conflict(f"node {node.name} has {max(0, node.free_mib)} MiB free,"
                       f" the VM needs {memory_mib} MiB")


def choose_node(nodes: Sequence[NodeLoad], memory_mib: int,
                preferred: Sequence[str] = ()) -> str:
    """The first preferred node that fits, else the eligible node with the most free memory
    (ties: by name)."""
    fitting = [n for n in nodes if n.eligible and n.free_mib >= memory_mib]
    if not fitting:
        if not any(n.eligible for n in nodes):
            raise Conflict("no node is up and unpaused")
        raise Conflict(f"no node has {memory_mib} MiB free")
    by_name = {n.name: n for n in fitting}
    for name in preferred:
        if name in by_name:
            return name
    return sorted(fitting, key=lambda n: (-n.free_mib, n.name))[0].name


@dataclass(frozen=True)
class Homeless:
    """An HA VM whose node is gone."""

    vm: str
    memory_mib: int
    policy: HaPolicy


def place_all(vms: Sequence[Homeless], nodes: Sequence[NodeLoad]
              ) -> tuple[dict[str, str], dict[str, str]]:
    """Place by priority (high first, then by name), each on its first preferred node that
    fits or the emptiest one, counting what earlier placements used. Returns
    (vm -> node, vm -> why it found no place)."""
    loads = {n.name: n for n in nodes}
    placed: dict[str, str] = {}
    unplaced: dict[str, str] = {}
    for vm in sorted(vms, key=lambda v: (v.policy.priority.rank, v.vm)):
        try:
            node = choose_node(list(loads.values()), vm.memory_mib, vm.policy.preferred_nodes)
        except Conflict as err:
            unplaced[vm.vm] = str(err)
            continue
        placed[vm.vm] = node
        loads[node] = replace(loads[node], used_mib=loads[node].used_mib + vm.memory_mib)
    return placed, unplaced

"""Pure placement: which node should run a VM."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ferry.model.errors import Conflict

# Left for QEMU itself and the host: a node is not filled to the last MiB.
HOST_RESERVE_MIB = 512


@dataclass(frozen=True)
class NodeLoad:
    name: str
    up: bool
    memory_mib: int
    used_mib: int

    @property
    def free_mib(self) -> int:
        return self.memory_mib - self.used_mib - HOST_RESERVE_MIB


def check_fits(node: NodeLoad, memory_mib: int) -> None:
    if not node.up:
        raise Conflict(f"node {node.name} is down")
    if node.free_mib < memory_mib:
        raise Conflict(f"node {node.name} has {max(0, node.free_mib)} MiB free,"
                       f" the VM needs {memory_mib} MiB")


def choose_node(nodes: Sequence[NodeLoad], memory_mib: int) -> str:
    """The up node with the most free memory that fits the VM (ties: by name)."""
    fitting = [n for n in nodes if n.up and n.free_mib >= memory_mib]
    if not fitting:
        up = [n for n in nodes if n.up]
        if not up:
            raise Conflict("no node is up")
        raise Conflict(f"no node has {memory_mib} MiB free")
    return sorted(fitting, key=lambda n: (-n.free_mib, n.name))[0].name

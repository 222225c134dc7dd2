"""Cluster nodes."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class NodeState(enum.Enum):
    UP = "up"
    DOWN = "down"
    FENCED = "fenced"
    PAUSED = "paused"


@dataclass(frozen=True)
class NetAddress:
    """A node's address on one cluster network."""

    network: str
    address: str


@dataclass(frozen=True)
class NodeInfo:
    """What an agent publishes about its node when it starts (persistent)."""

    name: str
    cluster_address: str
    migration_addresses: tuple[NetAddress, ...]
    bridge: str
    memory_mib: int
    cpus: int
    accel: str
    version: str
    started_at: float
    lease_ttl: int = 0
    watchdog_s: float = 0.0  # the node's watchdog kills its HA VMs this long after a hang
    fence_delay_s: float = 0.0  # what this node waits, as manager, before recovering


@dataclass(frozen=True)
class NodeView:
    """A node as a user sees it."""

    info: NodeInfo
    state: NodeState
    vms: tuple[str, ...] = ()
    memory_used_mib: int = 0

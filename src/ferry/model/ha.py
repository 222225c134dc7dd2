"""High availability: which VMs the cluster restarts when their node dies, and the record of
every decision it takes (events)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class HaPriority(enum.Enum):
    """Order of recovery when not every VM fits: high first."""

    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"

    @property
    def rank(self) -> int:
        return {"high": 0, "medium": 1, "low": 2}[self.value]


class StartAction(enum.Enum):
    """What a node does with a VM it owns when its agent comes up (the seed's automatic
    start action). An HA VM always has NONE: only the cluster decides where it starts."""

    NONE = "none"
    START = "start"
    RESTORE = "restore"


@dataclass(frozen=True)
class HaPolicy:
    priority: HaPriority = HaPriority.MEDIUM
    preferred_nodes: tuple[str, ...] = ()


class EventKind(enum.Enum):
    NODE_UP = "node-up"
    NODE_DOWN = "node-down"
    NODE_FENCED = "node-fenced"
    NODE_REJOINED = "node-rejoined"
    SELF_FENCED = "self-fenced"
    MANAGER = "manager"
    RECOVERED = "recovered"
    NOT_RECOVERED = "not-recovered"
    HA_CHANGED = "ha-changed"


@dataclass(frozen=True)
class Event:
    """One decision, as a person reads it: when, what, about which node and VM, and why."""

    at: float  # wall-clock time
    kind: EventKind
    message: str
    node: str = ""  # the node the event is about
    vm: str = ""
    by: str = ""  # the node that decided


@dataclass(frozen=True)
class FenceRecord:
    """Written by the manager when it takes a dead node's VMs away; removed when the node
    rejoins cleanly. While it exists the node is shown as fenced."""

    at: float
    by: str
    vms: tuple[str, ...] = ()

"""Cluster networks as each node sees them, and the choice of a migration network.

Every agent publishes the links of its configured networks (``nodes/<n>/networks``, on its
lease): which interface holds its address, the subnet, whether the link is up, and whether
the node routes its default traffic through that network. Step 1 of a migration chooses
from these: the seed's rule is that migration uses the cluster networks in a configurable
priority order and that networks for migration should have no default gateway.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class NetworkRole(enum.Enum):
    CLUSTER = "cluster"  # the store and the agents talk here
    MIGRATION = "migration"  # memory streams go here


class LinkState(enum.Enum):
    UP = "up"
    DOWN = "down"  # administratively down, or no carrier
    MISSING = "missing"  # no interface holds the configured address
    UNKNOWN = "unknown"  # not published: the node is down, or its agent predates this

    @property
    def usable(self) -> bool:
        """UNKNOWN counts: a node whose agent does not publish links could always migrate,
        and a stale guess fails in step 3 with the VM still on its source."""
        return self in (LinkState.UP, LinkState.UNKNOWN)


@dataclass(frozen=True)
class NetworkLink:
    """One node's link to one of its configured networks."""

    name: str
    role: NetworkRole
    address: str
    state: LinkState
    interface: str = ""  # "" when no interface holds the address
    subnet: str = ""  # e.g. 10.78.0.0/24
    operstate: str = ""  # the kernel's: up, down, lowerlayerdown, unknown, ...
    carrier: bool = False
    gateway: str = ""  # the default route's next hop through this network; "" if none
    default_route: bool = False  # the node's default route goes through this network


@dataclass(frozen=True)
class NodeNetworks:
    """What an agent publishes under ``nodes/<n>/networks`` (rewritten only on change)."""

    node: str
    networks: tuple[NetworkLink, ...]

    def get(self, name: str) -> NetworkLink | None:
        return next((n for n in self.networks if n.name == name), None)


@dataclass(frozen=True)
class NetworkChoice:
    """Step 1's answer: the network, the target's address on it, and why (for the
    timeline: "as requested", "first usable in ..."). ``network`` is None when no network
    fits; ``reason`` then says why, naming every network it tried."""

    network: str | None
    address: str = ""
    source_address: str = ""
    skipped: tuple[str, ...] = ()  # "migration: link down on node2", in priority order
    reason: str = ""

    @property
    def note(self) -> str:
        """For the timeline: why this network, and why not the ones before it (a refusal's
        reason names the skipped networks itself)."""
        if self.network is None or not self.skipped:
            return self.reason
        return f"{self.reason}; skipped {'; '.join(self.skipped)}"


@dataclass(frozen=True)
class NetworkMember:
    """One node on a network, as ``ferry network list`` shows it."""

    node: str
    address: str
    state: LinkState
    node_up: bool
    interface: str = ""
    subnet: str = ""
    gateway: str = ""
    default_route: bool = False


@dataclass(frozen=True)
class NetworkView:
    """A cluster network, with every node's address and link on it."""

    name: str
    role: NetworkRole
    subnets: tuple[str, ...]  # one, unless nodes disagree (a misconfiguration)
    gateway: bool  # some node has a default route through it
    priority: int | None  # 1-based position in the migration order; None: not used
    members: tuple[NetworkMember, ...]

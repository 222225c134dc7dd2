"""Cluster-wide configuration kept in the store."""

from __future__ import annotations

from dataclasses import dataclass

from ferry.model.policy import MigrationLimits, MigrationPolicy


@dataclass(frozen=True)
class Volume:
    """A shared volume: a directory every node mounts at the same path."""

    name: str
    path: str


@dataclass(frozen=True)
class BootImage:
    """The default kernel boot for new VMs (the lab guest)."""

    kernel: str
    initrd: str
    cmdline: str = ""  # extra arguments


@dataclass(frozen=True)
class VmNetwork:
    """Where new VMs get a static address from (the lab's LAN)."""

    subnet: str  # e.g. 10.79.0.0/24
    first_host: int = 10


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    default_volume: str = ""
    boot_image: BootImage | None = None
    vm_network: VmNetwork | None = None
    bridge: str = "vmswitch"
    migration_policy: MigrationPolicy = MigrationPolicy()
    migration_limits: MigrationLimits = MigrationLimits()
    migration_networks: tuple[str, ...] = ()  # priority order; empty: the nodes' own order

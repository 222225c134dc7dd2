"""Migration policies and limits (kept apart so that VMs and the cluster can name them)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class PolicyKind(enum.Enum):
    """How a migration converges. ADAPTIVE is Ferry's; the others imitate the policies of
    other systems (for the benchmark, and for operators who want them)."""

    ADAPTIVE = "adaptive"  # measure, predict, pick the next step; state why
    QEMU_DEFAULTS = "qemu-defaults"  # plain pre-copy, QEMU's parameters, no escape
    LIBVIRT = "libvirt"  # pre-copy, fixed downtime, auto-converge after a timeout
    NOVA = "nova"  # downtime ladder in steps, abort when the budget is spent
    PROXMOX = "proxmox"  # auto-converge and XBZRLE from the start, doubling downtime


@dataclass(frozen=True)
class MigrationPolicy:
    """Per cluster, overridable per VM (VmSpec.migration_policy) and per migration
    (MigrationOptions.policy). Times in ms and s, bandwidth in bytes/s (0: no limit)."""

    kind: PolicyKind = PolicyKind.ADAPTIVE
    max_downtime_ms: int = 300  # the longest pause the policy may ever allow
    start_downtime_ms: int = 50  # where the downtime limit starts
    max_bandwidth: int = 0
    budget_s: float = 120.0  # completion budget: give up (or finish by pausing) after this
    allow_throttle: bool = True  # auto-converge: slow the guest's vCPUs
    allow_postcopy: bool = False  # switch to post-copy (point of no return, needs the target)
    allow_pause: bool = True  # pause the guest and finish (bounded by max_downtime_ms x 10)


@dataclass(frozen=True)
class MigrationLimits:
    """How many migrations may run at once (the scheduler queues the rest)."""

    per_source: int = 1  # outbound per node
    per_target: int = 2  # inbound per node
    per_cluster: int = 4

"""Live migration: phases (the seed's seven steps), the record, progress samples."""

from __future__ import annotations

import dataclasses
import enum
import logging
from dataclasses import dataclass

from ferry.model.errors import Conflict
from ferry.model.policy import MigrationLimits, MigrationPolicy, PolicyKind
from ferry.model.vm import VmSpec

__all__ = ["MigrationLimits", "MigrationPolicy", "PolicyKind"]  # re-exported

log = logging.getLogger("ferry.migration")


class MigrationPhase(enum.Enum):
    """The seed's seven steps, plus queueing and the three ends."""

    QUEUED = "queued"
    CONNECTING = "connecting"  # 1. the source connects to the target
    SENDING_CONFIG = "sending-config"  # 2. the source sends the VM's configuration
    CREATING_TARGET = "creating-target"  # 3. the target creates an empty VM from it
    COPYING_MEMORY = "copying-memory"  # 4. memory is copied while the VM runs
    HANDING_OVER_DISKS = "handing-over-disks"  # 5. the target takes over the disks
    BRINGING_ONLINE = "bringing-online"  # 6. the target brings the VM online
    ANNOUNCING = "announcing"  # 7. the switch learns the VM's new port
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (MigrationPhase.COMPLETED, MigrationPhase.FAILED, MigrationPhase.CANCELLED)

    @property
    def step(self) -> int:
        """1..7 for the seed's steps, 0 before, 8 when completed, 9 when it failed or was
        cancelled."""
        return _ORDER.index(self) if self in _ORDER else len(_ORDER)


_ORDER = [
    MigrationPhase.QUEUED,
    MigrationPhase.CONNECTING,
    MigrationPhase.SENDING_CONFIG,
    MigrationPhase.CREATING_TARGET,
    MigrationPhase.COPYING_MEMORY,
    MigrationPhase.HANDING_OVER_DISKS,
    MigrationPhase.BRINGING_ONLINE,
    MigrationPhase.ANNOUNCING,
    MigrationPhase.COMPLETED,
]


def allowed(src: MigrationPhase, dst: MigrationPhase, *, committed: bool) -> bool:
    """Forward one or more steps; to FAILED or CANCELLED only before the point of no return
    (the ownership commit); nothing out of an end."""
    if src.terminal:
        return False
    if dst in (MigrationPhase.FAILED, MigrationPhase.CANCELLED):
        return not committed
    return dst in _ORDER and _ORDER.index(dst) > _ORDER.index(src)


@dataclass(frozen=True)
class PhaseEvent:
    phase: MigrationPhase
    at: float
    node: str
    note: str = ""


@dataclass(frozen=True)
class MigrationOptions:
    """What the requester asked for; the policy engine fills the rest."""

    max_bandwidth: int = 0  # bytes/s; 0: no limit beyond the link
    downtime_limit_ms: int = 50
    priority: int = 0  # higher first in the scheduler's queue
    policy: MigrationPolicy | None = None  # None: the VM's, else the cluster's
    quick: bool = False  # pause, save to the shared volume, restore on the target
    network: str | None = None  # force one migration network
    allow_gateway: bool = False  # permit a network with a default gateway


@dataclass(frozen=True)
class MigrationProgress:
    """One sample of QEMU's query-migrate on the source."""

    at: float
    status: str
    elapsed_ms: int
    ram_total: int
    ram_transferred: int
    ram_remaining: int
    throughput_bps: float
    dirty_rate_pps: float
    page_size: int
    expected_downtime_ms: int
    iterations: int
    throttle_pct: int = 0

    @property
    def percent(self) -> float:
        if self.ram_total <= 0:
            return 0.0
        done = max(0, self.ram_total - self.ram_remaining)
        return min(100.0, 100.0 * done / self.ram_total)

    @property
    def dirty_rate_bps(self) -> float:
        return self.dirty_rate_pps * self.page_size


@dataclass(frozen=True)
class MigrationSummary:
    total_s: float  # from the request to the end, as the user waited
    qemu_total_ms: int  # QEMU's total-time on the source
    downtime_ms: int  # QEMU's downtime on the source
    switchover_ms: float | None  # source STOP to target RESUME (host timestamps)
    bytes_sent: int
    setup_ms: int
    throughput_bps: float


@dataclass(frozen=True)
class TargetConfig:
    """Step 2, "the source sends the VM's configuration": what the target needs to build a
    QEMU with identical devices."""

    spec: VmSpec
    accel: str
    cpu_model: str


@dataclass(frozen=True)
class MigrationRecord:
    id: str
    vm: str
    source: str
    target: str
    phase: MigrationPhase
    created_at: float
    options: MigrationOptions = MigrationOptions()
    timeline: tuple[PhaseEvent, ...] = ()
    error: str = ""
    network: str = ""  # the migration network chosen in step 1
    config: TargetConfig | None = None  # step 2
    target_uri: str = ""  # step 3: where the target listens
    target_error: str = ""  # the target's reason, if it gave up
    stopped_at: float | None = None  # source STOP (host clock)
    committed_at: float | None = None  # ownership moved: the point of no return
    resumed_at: float | None = None  # target RESUME (host clock)
    target_released_at: float | None = None  # target QEMU gone after a failure/cancel
    finished_at: float | None = None
    summary: MigrationSummary | None = None
    admitted_at: float | None = None  # the scheduler let it start (QUEUED until then)
    postcopy_at: float | None = None  # switched to post-copy: the point of no return

    @property
    def committed(self) -> bool:
        """Past the point of no return: ownership has moved to the target."""
        return self.committed_at is not None

    @property
    def settled(self) -> bool:
        """Ended, and if it failed, the target has confirmed its QEMU is gone (or never
        got as far as creating one)."""
        if not self.phase.terminal:
            return False
        if self.phase is MigrationPhase.COMPLETED or self.target_released_at is not None:
            return True
        return not any(e.phase is MigrationPhase.CREATING_TARGET for e in self.timeline)

    def advance(
        self, phase: MigrationPhase, *, at: float, node: str, note: str = ""
    ) -> MigrationRecord:
        """The one way to change phase: checks the transition and logs ``A -> B``."""
        if not allowed(self.phase, phase, committed=self.committed):
            raise Conflict(
                f"migration {self.id}: cannot go from {self.phase.value} to {phase.value}"
            )
        log.info("migration %s (%s): %s -> %s %s", self.id, self.vm, self.phase.value,
                 phase.value, note)
        event = PhaseEvent(phase=phase, at=at, node=node, note=note)
        changes: dict[str, object] = {"phase": phase, "timeline": self.timeline + (event,)}
        if phase.terminal:
            changes["finished_at"] = at
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def note(self, *, at: float, node: str, note: str) -> MigrationRecord:
        """A timeline entry within the current phase (a decision, a measurement)."""
        event = PhaseEvent(phase=self.phase, at=at, node=node, note=note)
        return dataclasses.replace(self, timeline=self.timeline + (event,))

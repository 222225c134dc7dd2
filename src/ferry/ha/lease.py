"""The node's own view of its lease: until when it may act as a member of the cluster.

etcd never expires a lease earlier than its TTL after the last renewal it received, and that
renewal was received after we sent it. So ``sent + ttl`` is a lower bound for the expiry as
etcd sees it; the node stops its HA VMs ``margin`` seconds before that, on its own clock,
without having to reach anyone (design/ha.md: "make each node stop its VMs on its own clock
before anyone else may start them").
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

log = logging.getLogger("ferry.ha.lease")


class LeaseState(enum.Enum):
    NONE = "none"  # not registered yet
    VALID = "valid"  # renewed recently enough: the node may run and start VMs
    LOST = "lost"  # the deadline passed: HA VMs must be gone, nothing may start

    def can_become(self, other: LeaseState) -> bool:
        return other is not self


class LeaseGuard:
    def __init__(self, *, ttl: float, margin: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if margin >= ttl:
            raise ValueError("the self-fence margin must be shorter than the lease TTL")
        self.ttl = ttl
        self.margin = margin
        self.clock = clock
        self.lease = 0
        self.state = LeaseState.NONE
        self._sent = 0.0

    def _become(self, new: LeaseState, why: str) -> None:
        if new is self.state:
            return
        if not self.state.can_become(new):
            raise ValueError(f"lease: {self.state.value} -> {new.value} is not allowed")
        log.info("lease %x: %s -> %s (%s)", self.lease, self.state.value, new.value, why)
        self.state = new

    def granted(self, lease: int, *, sent_at: float) -> None:
        """A new lease, requested at ``sent_at``."""
        self.lease = lease
        self._sent = sent_at
        self._become(LeaseState.VALID, "granted")

    def renewed(self, *, sent_at: float) -> None:
        """A keepalive sent at ``sent_at`` succeeded. Too late to count if the deadline has
        passed in between: once lost, the node must register a new lease."""
        if self.state is LeaseState.VALID and self._sent < sent_at < self.deadline:
            self._sent = sent_at

    @property
    def deadline(self) -> float:
        """Monotonic time by which this node's HA VMs must have stopped."""
        return self._sent + self.ttl - self.margin

    def valid(self) -> bool:
        """Valid now; moves to LOST the first time the deadline is seen passed."""
        if self.state is LeaseState.VALID and self.clock() >= self.deadline:
            self._become(LeaseState.LOST, "not renewed in time: self-fencing")
        return self.state is LeaseState.VALID

    def remaining(self) -> float:
        return max(0.0, self.deadline - self.clock()) if self.state is LeaseState.VALID else 0.0

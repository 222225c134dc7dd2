"""Pure: what a convergence policy sees and says.

A policy sees the engine's current settings (``Engine``) and what QEMU reported at the
start of each pre-copy pass (``MigrationProgress``, sampled right after each dirty-bitmap
sync); ``estimate`` turns those samples into the figures every policy decides on. A policy
answers with one ``Step``, carrying its reason and those figures, so that the timeline can
say why.

Notation (../shared/design/migration.md): B achieved bandwidth, D dirty rate, R bytes left
after the last sync, d the downtime limit. QEMU switches over once R <= B * d; pre-copy
converges iff D < B. The dirty rate is measured as the bytes dirtied during a pass (R at the
next sync) over the pass's duration, not taken from QEMU's dirty-pages-rate, which is
averaged over at least a second and so lags behind throttle changes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ferry.model.migration import MigrationProgress

MiB = 2**20
WINDOW_PASSES = 3  # passes a measurement spans: enough to smooth, few enough to follow


@dataclass(frozen=True)
class Engine:
    """What the engine is set to now. Kept by the driver, changed only by ``after``."""

    downtime_limit_ms: int
    max_bandwidth: int  # bytes/s
    throttle_pct: int = 0  # the throttle ceiling asked for (0: none asked)
    throttle_initial_pct: int = 0  # the first level QEMU applies of the throttle asked for
    throttle_from_ratio: float = 0.0  # D/B when throttling began (0: not measured)
    postcopy: bool = False  # migrate-start-postcopy was issued
    paused: bool = False  # the guest was stopped to finish
    changed_pass: int = 0  # the pass in which the last step was applied
    changed_s: float = 0.0  # elapsed seconds when the last step was applied
    steps: int = 0  # how many steps (other than Continue) were applied

    def after(self, step: Step, *, pass_: int, elapsed_s: float) -> Engine:
        """The settings once ``step`` has been applied in pass ``pass_``."""
        if isinstance(step, Continue | GiveUp):
            return self
        changes: dict[str, object] = {"changed_pass": pass_, "changed_s": elapsed_s,
                                      "steps": self.steps + 1}
        if isinstance(step, SetDowntime):
            changes["downtime_limit_ms"] = step.downtime_ms
        elif isinstance(step, Throttle):
            changes["throttle_pct"] = step.max_pct
            changes["throttle_initial_pct"] = step.initial_pct or step.max_pct
            if not self.throttle_pct and step.estimate is not None:
                changes["throttle_from_ratio"] = step.estimate.ratio or 0.0
        elif isinstance(step, StartPostcopy):
            changes["postcopy"] = True
        elif isinstance(step, PauseAndFinish):
            changes["paused"] = True
            changes["downtime_limit_ms"] = step.downtime_ms
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Setup:
    """What must be configured before ``migrate``: QEMU refuses capability changes while a
    migration runs, so every escape a policy may take later is enabled here."""

    engine: Engine
    auto_converge: bool = False  # capability; throttling stays off until a Throttle step
    qemu_throttle: Throttle | None = None  # QEMU's own auto-converge from the start
    postcopy: bool = False  # capability postcopy-ram, on both source and target
    xbzrle_cache: int = 0  # bytes; 0: XBZRLE off


@dataclass(frozen=True)
class Estimate:
    """The figures a decision rests on, measured over the passes since the last change."""

    pass_: int
    remaining: int  # bytes left at the start of this pass
    bandwidth_bps: float
    dirty_bps: float
    ratio: float | None  # D / B; None until a whole pass has been measured
    throttle_pct: int  # QEMU's throttle now
    limit_ms: int  # the downtime limit now
    settled: bool = True  # measured over a whole pass since the last step took effect
    expected_ms: int = 0  # QEMU's expected-downtime (0: none yet)

    @property
    def downtime_ms(self) -> float:
        """The pause if QEMU switched over now: R / B, or QEMU's own figure if higher. QEMU
        switches over by its own bandwidth figure (the last 100 ms), which is often lower
        than the pass's average."""
        if self.bandwidth_bps <= 0:
            return math.inf
        return max(1000.0 * self.remaining / self.bandwidth_bps, float(self.expected_ms))

    @property
    def converge_s(self) -> float | None:
        """Time until R <= B * d if the ratio holds (geometric passes); None if it never
        gets there."""
        threshold = self.bandwidth_bps * self.limit_ms / 1000.0
        if self.remaining <= threshold:
            return 0.0
        if self.ratio is None or self.ratio >= 1.0 or threshold <= 0:
            return None
        if self.ratio <= 0.0:
            return self.remaining / self.bandwidth_bps
        n = math.ceil(math.log(threshold / self.remaining) / math.log(self.ratio))
        return (self.remaining / self.bandwidth_bps) * (1 - self.ratio**n) / (1 - self.ratio)

    def text(self) -> str:
        ratio = "" if self.ratio is None else f" ({self.ratio:.2f} of it)"
        throttle = f", throttle {self.throttle_pct}%" if self.throttle_pct else ""
        return (f"pass {self.pass_}: {self.remaining / MiB:.1f} MiB left, sending"
                f" {self.bandwidth_bps / MiB:.0f} MiB/s, dirtying {self.dirty_bps / MiB:.0f}"
                f" MiB/s{ratio}{throttle}, downtime if switched now {_ms(self.downtime_ms)}"
                f" (limit {self.limit_ms} ms)")


def _ms(value: float) -> str:
    return "unknown" if math.isinf(value) else f"{value:.0f} ms"


# -- steps: exactly one per decision, each with its reason and figures


@dataclass(frozen=True)
class Continue:
    reason: str
    estimate: Estimate | None = None
    topic: str = ""  # the timeline notes a Continue only when its topic changes
    quiet: bool = False  # never noted (waiting for a step to act)


@dataclass(frozen=True)
class SetDowntime:
    downtime_ms: int
    reason: str
    estimate: Estimate | None = None


@dataclass(frozen=True)
class Throttle:
    """Slow the guest's vCPUs through QEMU's auto-converge: QEMU starts at ``initial_pct``
    and adds ``increment_pct`` each time it finds the dirty rate too high, up to
    ``max_pct``. A policy that wants exactly p% asks (p, p, p)."""

    max_pct: int
    reason: str
    estimate: Estimate | None = None
    initial_pct: int = 0  # 0: max_pct
    increment_pct: int = 0  # 0: straight to max_pct


@dataclass(frozen=True)
class StartPostcopy:
    reason: str
    estimate: Estimate | None = None


@dataclass(frozen=True)
class PauseAndFinish:
    """Stop the guest; QEMU sends the rest and completes. ``downtime_ms`` becomes the
    downtime limit so that QEMU switches over at once rather than after another pass."""

    downtime_ms: int
    reason: str
    estimate: Estimate | None = None


@dataclass(frozen=True)
class GiveUp:
    reason: str
    estimate: Estimate | None = None


Step = Continue | SetDowntime | Throttle | StartPostcopy | PauseAndFinish | GiveUp


def describe(step: Step) -> str:
    """One timeline note: what was decided, why, and the figures."""
    if isinstance(step, Continue):
        head = "continue"
    elif isinstance(step, SetDowntime):
        head = f"downtime limit -> {step.downtime_ms} ms"
    elif isinstance(step, Throttle):
        head = f"throttle guest to {step.max_pct}%"
    elif isinstance(step, StartPostcopy):
        head = "switch to post-copy"
    elif isinstance(step, PauseAndFinish):
        head = "pause the guest and finish"
    else:
        head = "give up"
    figures = f" [{step.estimate.text()}]" if step.estimate is not None else ""
    return f"policy: {head}: {step.reason}{figures}"


# -- measuring


def pass_starts(history: Sequence[MigrationProgress]) -> list[MigrationProgress]:
    """The first sample of each pass (dirty-sync count), oldest first."""
    out: list[MigrationProgress] = []
    for s in history:
        if s.iterations <= 0:
            continue
        if not out or s.iterations > out[-1].iterations:
            out.append(s)
    return out


def estimate(history: Sequence[MigrationProgress], engine: Engine) -> Estimate | None:
    """Bandwidth, dirty rate and their ratio over the whole passes since the last change
    (before it, the guest or the limits were different). During the first pass: QEMU's
    figures without a ratio; None before any sample.

    A pass sends what the previous sync found dirty; what the guest dirtied meanwhile is
    what the next sync finds. So D = R(next) / duration and B = bytes sent / duration."""
    starts = pass_starts(history)
    if len(starts) < 2:
        return _first_pass(history, engine)
    # The last few passes since the last change, but at least the last whole one. The
    # first pass copies all of RAM once and says little about the dirty rate: skip it once
    # there are others.
    first = next((i for i, s in enumerate(starts) if _in_effect(s, engine)), len(starts) - 1)
    first = max(first, len(starts) - 1 - WINDOW_PASSES)
    if starts[first].iterations <= 1 and len(starts) - first > 2:
        first += 1
    settled = first <= len(starts) - 2
    first = min(first, len(starts) - 2)
    window = starts[first:]
    span_s = _seconds(window[0], window[-1])
    if span_s <= 0:
        return None
    sent = window[-1].ram_transferred - window[0].ram_transferred
    dirtied = sum(_dirtied(a, b) for a, b in zip(window, window[1:], strict=False))
    last = window[-1]
    bandwidth = sent / span_s if sent > 0 else last.throughput_bps
    return Estimate(
        pass_=last.iterations, remaining=last.ram_remaining, bandwidth_bps=bandwidth,
        dirty_bps=dirtied / span_s, ratio=(dirtied / sent) if sent > 0 else None,
        throttle_pct=last.throttle_pct, limit_ms=engine.downtime_limit_ms, settled=settled,
        expected_ms=history[-1].expected_downtime_ms if history else 0)


def _dirtied(a: MigrationProgress, b: MigrationProgress) -> int:
    """What the guest dirtied during the pass from ``a`` to ``b``. QEMU syncs as soon as
    what is left drops below B x d, so with a high limit a pass ends early and the next sync
    also finds what the pass did not get to: that part was not dirtied anew."""
    if a.iterations <= 1:
        return b.ram_remaining  # the first pass runs to its end; its zero pages cost no bytes
    leftover = max(0, a.ram_remaining - (b.ram_transferred - a.ram_transferred))
    return max(0, b.ram_remaining - leftover)


def _in_effect(s: MigrationProgress, engine: Engine) -> bool:
    """Did this pass start under the engine's last change? QEMU applies a throttle only
    after it has measured the dirty rate too high twice, seconds after it was asked."""
    return s.iterations >= engine.changed_pass and s.throttle_pct >= min(
        engine.throttle_pct, engine.throttle_initial_pct or engine.throttle_pct)


def _first_pass(history: Sequence[MigrationProgress], engine: Engine) -> Estimate | None:
    """During the first pass only QEMU's own figures exist; no ratio yet. (Before it, in
    QEMU's setup, not even those.)"""
    started = [s for s in history if s.iterations >= 1]
    if not started:
        return None
    last = started[-1]
    return Estimate(pass_=max(1, last.iterations), remaining=last.ram_remaining,
                    bandwidth_bps=last.throughput_bps, dirty_bps=last.dirty_rate_bps,
                    ratio=None, throttle_pct=last.throttle_pct,
                    limit_ms=engine.downtime_limit_ms, settled=False)


def _seconds(a: MigrationProgress, b: MigrationProgress) -> float:
    """QEMU's own clock (total-time) where it has one; the samples' host times otherwise."""
    if b.elapsed_ms > a.elapsed_ms > 0:
        return (b.elapsed_ms - a.elapsed_ms) / 1000.0
    return b.at - a.at


def stalled_passes(history: Sequence[MigrationProgress], *, since_pass: int) -> int:
    """How many of the last passes (since ``since_pass``) did not shrink what is left."""
    starts = [s for s in pass_starts(history) if s.iterations >= since_pass]
    count = 0
    for prev, cur in zip(starts, starts[1:], strict=False):
        count = count + 1 if cur.ram_remaining >= 0.9 * prev.ram_remaining else 0
    return count


def since_progress_s(history: Sequence[MigrationProgress]) -> float:
    """Seconds (QEMU's clock) since what is left last reached a new low at a pass start:
    KubeVirt's notion of progress."""
    starts = pass_starts(history)[1:]  # the first pass always "progresses"
    if not starts or not history:
        return 0.0
    low = starts[0]
    for s in starts[1:]:
        if s.ram_remaining < low.ram_remaining:
            low = s
    return max(0.0, (history[-1].elapsed_ms - low.elapsed_ms) / 1000.0)

"""Pure: the convergence policies of other systems, behind the same interface as Ferry's
(for the policy benchmark, and for operators who want them).

Their time constants are minutes long (Nova waits 150 s per downtime step for a small VM);
they are scaled by ``TIME_SCALE`` so that a benchmark cell takes seconds. Every other
constant is theirs. The policy's budget ends a migration under any of them; its
``max_bandwidth`` caps their bandwidth (a slower link); its other knobs (maximum downtime,
throttle, pause) are Ferry's and are ignored, except ``allow_postcopy`` where the imitated
system has the same switch.

- QEMU_DEFAULTS: 300 ms downtime limit, 128 MiB/s, nothing else; never gives up by itself.
- LIBVIRT (libvirt/KubeVirt-like): unlimited bandwidth, QEMU's 300 ms; QEMU's auto-converge
  (20 %, +10 % per period) once the copy made no progress for KubeVirt's progressTimeout
  (150 s); at the end of the budget post-copy if allowed, else abort.
- NOVA: the downtime ladder 50 -> 500 ms in 10 steps, 75 s per GiB per step (at least
  2 GiB, as Nova counts); post-copy if permitted once a pass shrinks what is left by less
  than 10 %; abort at the completion timeout, 800 s per GiB.
- PROXMOX: auto-converge and XBZRLE (cache 10 % of RAM) from the start, 100 ms downtime
  doubled after more than 5 polls (here: passes) without progress, 16 GiB/s cap; no timeout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ferry.migration.convergence import (
    Continue,
    Engine,
    GiveUp,
    MiB,
    SetDowntime,
    Setup,
    StartPostcopy,
    Step,
    Throttle,
    estimate,
    pass_starts,
    since_progress_s,
)
from ferry.model.migration import MigrationProgress
from ferry.model.policy import MigrationPolicy, PolicyKind

GiB = 2**30
TIME_SCALE = 0.02  # foreign time constants x this: one real minute becomes 1.2 s

QEMU_DOWNTIME_MS = 300
QEMU_BANDWIDTH = 128 * MiB
QEMU_AUTO_CONVERGE = (20, 10, 99)  # initial %, increment %, max %

KUBEVIRT_PROGRESS_TIMEOUT_S = 150.0

NOVA_DOWNTIME_MS = 500
NOVA_STEPS = 10
NOVA_STEP_DELAY_S_PER_GIB = 75.0
NOVA_COMPLETION_S_PER_GIB = 800.0
NOVA_MIN_GIB = 2.0
NOVA_POSTCOPY_PROGRESS = 0.10

PROXMOX_DOWNTIME_MS = 100
PROXMOX_BANDWIDTH = 16 * GiB
PROXMOX_STALL_POLLS = 5

History = Sequence[MigrationProgress]


def _cap(policy: MigrationPolicy, own: int) -> int:
    """Their own bandwidth (0: none), capped by the policy's (a slower link)."""
    if policy.max_bandwidth <= 0:
        return own
    return policy.max_bandwidth if own <= 0 else min(own, policy.max_bandwidth)


def _qemu_auto_converge(reason: str) -> Throttle:
    initial, increment, top = QEMU_AUTO_CONVERGE
    return Throttle(top, reason, initial_pct=initial, increment_pct=increment)


def setup(policy: MigrationPolicy, ram_bytes: int) -> Setup:
    kind = policy.kind
    if kind is PolicyKind.QEMU_DEFAULTS:
        return Setup(engine=Engine(QEMU_DOWNTIME_MS, _cap(policy, QEMU_BANDWIDTH)))
    if kind is PolicyKind.LIBVIRT:
        return Setup(engine=Engine(QEMU_DOWNTIME_MS, _cap(policy, 0)), auto_converge=True,
                     postcopy=policy.allow_postcopy)
    if kind is PolicyKind.NOVA:
        return Setup(engine=Engine(nova_ladder(ram_bytes)[0][1], _cap(policy, 0)),
                     postcopy=policy.allow_postcopy)
    if kind is PolicyKind.PROXMOX:
        throttle = _qemu_auto_converge("Proxmox: auto-converge from the start")
        return Setup(engine=Engine(PROXMOX_DOWNTIME_MS, _cap(policy, PROXMOX_BANDWIDTH),
                                   throttle_pct=throttle.max_pct),
                     auto_converge=True, qemu_throttle=throttle,
                     xbzrle_cache=_power_of_two(ram_bytes // 10))
    raise ValueError(f"not a foreign policy: {kind.value}")


def _power_of_two(n: int) -> int:
    """The nearest power of two (Proxmox rounds the XBZRLE cache so; QEMU wants one)."""
    return 1 << max(12, round(math.log2(max(n, 1))))


def decide(policy: MigrationPolicy, history: History, engine: Engine,
           elapsed_s: float) -> Step:
    return _DECIDE[policy.kind](policy, history, engine, elapsed_s)


def qemu_defaults(policy: MigrationPolicy, history: History, engine: Engine,
                  elapsed_s: float) -> Step:
    est = estimate(history, engine)
    if elapsed_s >= policy.budget_s:
        return GiveUp(f"the budget of {policy.budget_s:g} s is spent; QEMU's defaults have"
                      " no escape", est)
    return Continue("QEMU's defaults: pre-copy, nothing to adjust", est, topic="qemu")


def libvirt(policy: MigrationPolicy, history: History, engine: Engine,
            elapsed_s: float) -> Step:
    est = estimate(history, engine)
    if elapsed_s >= policy.budget_s:
        why = f"the budget of {policy.budget_s:g} s is spent"
        if policy.allow_postcopy and not engine.postcopy:
            return StartPostcopy(f"{why}: post-copy (allowed)", est)
        return GiveUp(f"{why}: abort", est) if not engine.postcopy else Continue(
            "post-copy pulls the rest", est, topic="finishing")
    stall_s = KUBEVIRT_PROGRESS_TIMEOUT_S * TIME_SCALE
    stalled_for = since_progress_s(history)
    if not engine.throttle_pct and stalled_for >= stall_s:
        return _qemu_auto_converge(
            f"no progress for {stalled_for:.1f} s (KubeVirt's progress timeout"
            f" {KUBEVIRT_PROGRESS_TIMEOUT_S:g} s x {TIME_SCALE:g}): QEMU's auto-converge")
    return Continue("libvirt: pre-copy at QEMU's 300 ms", est, topic="libvirt")


def nova_ladder(ram_bytes: int) -> list[tuple[float, int]]:
    """Nova's downtime_steps(): (seconds from the start, downtime limit in ms), scaled."""
    gib = max(NOVA_MIN_GIB, ram_bytes / GiB)
    delay = NOVA_STEP_DELAY_S_PER_GIB * gib * TIME_SCALE
    base = NOVA_DOWNTIME_MS / NOVA_STEPS
    offset = (NOVA_DOWNTIME_MS - base) / NOVA_STEPS
    return [(delay * i, int(base + offset * i)) for i in range(NOVA_STEPS + 1)]


def nova(policy: MigrationPolicy, history: History, engine: Engine,
         elapsed_s: float) -> Step:
    est = estimate(history, engine)
    ram = history[-1].ram_total if history else 0
    gib = max(NOVA_MIN_GIB, ram / GiB)
    timeout = min(policy.budget_s, NOVA_COMPLETION_S_PER_GIB * gib * TIME_SCALE)
    if engine.postcopy:
        return Continue("post-copy pulls the rest", est, topic="finishing")
    if elapsed_s >= timeout:
        return GiveUp(f"completion timeout of {timeout:.1f} s (Nova's"
                      f" {NOVA_COMPLETION_S_PER_GIB:g} s/GiB x {gib:g} GiB x {TIME_SCALE:g},"
                      f" or the budget): abort", est)
    if policy.allow_postcopy and _nova_no_progress(history):
        return StartPostcopy("the last pass shrank what is left by less than 10 %", est)
    steps = [(i, d) for i, (at, d) in enumerate(nova_ladder(ram)) if at <= elapsed_s]
    i, want = steps[-1]
    if want > engine.downtime_limit_ms:
        return SetDowntime(want, f"Nova's downtime ladder, step {i}/{NOVA_STEPS}", est)
    return Continue("Nova: waiting for the next step of the ladder", est, topic="nova")


def _nova_no_progress(history: History) -> bool:
    """Nova's should_switch_to_postcopy: after the first pass, a pass that shrank what is
    left by less than 10 %."""
    starts = pass_starts(history)
    if len(starts) < 3:
        return False
    prev, cur = starts[-2], starts[-1]
    return cur.ram_remaining > (1 - NOVA_POSTCOPY_PROGRESS) * prev.ram_remaining


def proxmox(policy: MigrationPolicy, history: History, engine: Engine,
            elapsed_s: float) -> Step:
    est = estimate(history, engine)
    if elapsed_s >= policy.budget_s:
        return GiveUp(f"the budget of {policy.budget_s:g} s is spent (Proxmox itself would"
                      " go on)", est)
    starts = [s for s in pass_starts(history) if s.iterations > engine.changed_pass]
    no_progress = sum(1 for a, b in zip(starts, starts[1:], strict=False)
                      if b.ram_remaining >= a.ram_remaining)
    if no_progress > PROXMOX_STALL_POLLS:
        doubled = 2 * engine.downtime_limit_ms
        return SetDowntime(doubled, f"{no_progress} passes without progress: Proxmox doubles"
                           " the downtime limit", est)
    return Continue("Proxmox: auto-converge and XBZRLE do the work", est, topic="proxmox")


_DECIDE: dict[PolicyKind, Callable[[MigrationPolicy, History, Engine, float], Step]] = {
    PolicyKind.QEMU_DEFAULTS: qemu_defaults,
    PolicyKind.LIBVIRT: libvirt,
    PolicyKind.NOVA: nova,
    PolicyKind.PROXMOX: proxmox,
}

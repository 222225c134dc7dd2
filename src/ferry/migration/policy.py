"""Pure: Ferry's adaptive convergence policy, and the entry points for every policy kind.

``setup`` says how to configure QEMU before the migration starts; ``decide`` is called at
the start of every pre-copy pass (and now and then in between, so that time limits act
during a long pass) with the samples so far, the engine's settings and the time since the
copy started — the clock is an argument, never read here — and answers one step.

ADAPTIVE, each pass:
1. QEMU will switch over at the next sync (R <= B * d): continue.
2. Pre-copy converges (D < 0.8 B) and is predicted to finish within the budget: continue.
3. The downtime if switched now (R / B) is within the policy's maximum: raise the limit to
   just above it (QEMU then switches over at the next sync).
4. Throttling allowed: throttle the guest — the smallest throttle predicted to bring D to
   half of B, assuming the dirty rate scales with the vCPU time the guest gets; then watch
   a whole pass under it, and throttle harder (at least 10 points more) if that was not
   enough. A throttle of 75 % or more that changed nothing is given up for post-copy or a
   pause, if either would finish now (a guest that dirties memory without using much CPU).
5. Throttling is not allowed, at its ceiling, or the budget left is too short to try: post-
   copy if allowed (it always finishes); else pause the guest and finish if the rest can be
   sent within a bounded pause (10 x the maximum downtime); else give up once the copy has
   stalled for a few passes, or when the budget is spent.
Once paused or in post-copy it waits for QEMU to finish; a pause that lasts three times its
bound is abandoned (the guest resumes on the source).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from ferry.migration import foreign
from ferry.migration.convergence import (
    Continue,
    Engine,
    Estimate,
    GiveUp,
    PauseAndFinish,
    SetDowntime,
    Setup,
    StartPostcopy,
    Step,
    Throttle,
    estimate,
    stalled_passes,
)
from ferry.model.migration import MigrationOptions, MigrationProgress
from ferry.model.policy import MigrationPolicy, PolicyKind

CONVERGING_RATIO = 0.8  # D/B below which pre-copy is left alone
TARGET_RATIO = 0.5  # what a throttle aims for: each pass leaves half as much to send
DOWNTIME_MARGIN = 1.25  # raise the limit this far above the predicted downtime
THROTTLE_FIRST = 20  # QEMU's own initial throttle: below it a throttle hardly shows
THROTTLE_STEP = 10  # each further throttle is at least this much harder
THROTTLE_CEILING = 95  # beyond, the guest is as good as paused, without saying so
SETTLE_S = 6.0  # the longest wait for a step to show (QEMU applies a throttle only after
# two periods of >= 1 s with a high dirty rate; then a whole pass under it is measured)
THROTTLE_PROVEN = 75  # from here, a throttle that changed nothing is given up
NO_EFFECT = 0.9  # ... "nothing": the guest still dirties 90 % of what it did unthrottled
STALL_PASSES = 3  # passes without progress before giving up when nothing may help
PAUSE_FACTOR = 10  # a pause-and-finish may last up to this times the maximum downtime
PAUSE_OVERRUN = 3  # ... and is abandoned (the guest resumes here) after 3 times that

History = Sequence[MigrationProgress]


def effective_policy(options: MigrationOptions, vm: MigrationPolicy | None,
                     cluster: MigrationPolicy | None) -> MigrationPolicy:
    """The migration's own policy, else the VM's, else the cluster's. A bandwidth given with
    the request caps any of them; a downtime limit given with a request that names no
    policy is where the policy starts (and at least its maximum)."""
    policy = options.policy or vm or cluster or MigrationPolicy()
    if options.max_bandwidth > 0:
        policy = dataclasses.replace(policy, max_bandwidth=options.max_bandwidth)
    requested = options.downtime_limit_ms
    if options.policy is None and requested != MigrationOptions().downtime_limit_ms:
        policy = dataclasses.replace(policy, start_downtime_ms=requested,
                                     max_downtime_ms=max(policy.max_downtime_ms, requested))
    return policy


def setup(policy: MigrationPolicy, ram_bytes: int) -> Setup:
    """How to configure QEMU before ``migrate`` for this policy."""
    if policy.kind is PolicyKind.ADAPTIVE:
        return Setup(engine=Engine(downtime_limit_ms=max(1, policy.start_downtime_ms),
                                   max_bandwidth=policy.max_bandwidth),
                     auto_converge=policy.allow_throttle, postcopy=policy.allow_postcopy)
    return foreign.setup(policy, ram_bytes)


def decide(policy: MigrationPolicy, history: History, engine: Engine,
           elapsed_s: float) -> Step:
    """The next step for a migration that has been copying memory for ``elapsed_s``."""
    if policy.kind is PolicyKind.ADAPTIVE:
        return adaptive(policy, history, engine, elapsed_s)
    return foreign.decide(policy, history, engine, elapsed_s)


def pause_bound_ms(policy: MigrationPolicy) -> int:
    return PAUSE_FACTOR * policy.max_downtime_ms


def adaptive(policy: MigrationPolicy, history: History, engine: Engine,
             elapsed_s: float) -> Step:
    paused_s = elapsed_s - engine.changed_s
    if engine.paused and paused_s > PAUSE_OVERRUN * pause_bound_ms(policy) / 1000:
        # QEMU should have finished long ago: resume the guest here rather than keep it
        # paused without end.
        return GiveUp(f"paused to finish, but QEMU has not finished in {paused_s:.1f} s")
    if engine.postcopy or engine.paused:
        what = "post-copy pulls the rest" if engine.postcopy else "the guest is paused"
        return Continue(f"finishing: {what}", topic="finishing", quiet=True)
    est = estimate(history, engine)
    left_s = policy.budget_s - elapsed_s
    if est is None or (est.ratio is None and left_s > 0):
        return Continue("first pass: copying all of memory once", est, topic="first-pass")
    if left_s <= 0:
        return _escape(policy, est, history, engine, f"the budget of {policy.budget_s:g} s is"
                       " spent", final=True)
    if est.downtime_ms <= engine.downtime_limit_ms:
        return Continue(f"QEMU switches over at the next sync (downtime ~{est.downtime_ms:.0f}"
                        f" ms within the limit)", est, topic="switching")
    converge_s = est.converge_s
    if est.ratio is not None and est.ratio < CONVERGING_RATIO and converge_s is not None \
            and converge_s <= left_s:
        return Continue(f"pre-copy converges: about {converge_s:.1f} s to go", est,
                        topic="converging")
    raised = _raise_downtime(policy, est, engine)
    if raised is not None:
        return raised
    if _settling(engine, est, elapsed_s):
        return Continue("watching the last step act", est, topic="settling", quiet=True)
    return _throttle(policy, est, history, engine, left_s)


def _raise_downtime(policy: MigrationPolicy, est: Estimate, engine: Engine) -> Step | None:
    """Step 3: the downtime if switched now is within the maximum: allow it."""
    if est.downtime_ms > policy.max_downtime_ms:
        return None
    limit = min(policy.max_downtime_ms, math.ceil(est.downtime_ms * DOWNTIME_MARGIN))
    if limit <= engine.downtime_limit_ms:
        return None  # already allowed; QEMU's own bandwidth figure must be lower than ours
    return SetDowntime(limit, f"not converging, but what is left fits {est.downtime_ms:.0f} ms"
                       f" of downtime, within the maximum of {policy.max_downtime_ms} ms", est)


def _settling(engine: Engine, est: Estimate, elapsed_s: float) -> bool:
    """A step was taken recently: judge it only once a whole pass ran under it."""
    return engine.steps > 0 and not est.settled and elapsed_s - engine.changed_s < SETTLE_S


def _throttle(policy: MigrationPolicy, est: Estimate, history: History, engine: Engine,
              left_s: float) -> Step:
    """Step 4: the smallest throttle predicted to converge, harder each time."""
    if not policy.allow_throttle:
        return _escape(policy, est, history, engine, "throttling is not allowed")
    asked = max(engine.throttle_pct, est.throttle_pct)
    if asked >= THROTTLE_CEILING:
        return _escape(policy, est, history, engine, f"even at {asked}% throttle the guest"
                       f" dirties {_pct(est.ratio)} of the bandwidth")
    if asked >= THROTTLE_PROVEN and est.ratio is not None \
            and est.ratio >= NO_EFFECT * engine.throttle_from_ratio \
            and _can_finish_otherwise(policy, est):
        return _escape(policy, est, history, engine, f"a {asked}% throttle has not slowed the"
                       f" guest's writes ({_pct(engine.throttle_from_ratio)} of the bandwidth"
                       f" before, {_pct(est.ratio)} now)")
    if left_s < SETTLE_S:
        return _escape(policy, est, history, engine, f"{left_s:.1f} s of budget left is too"
                       " little to throttle")
    ratio = est.ratio if est.ratio is not None else 1.0
    # The guest gets (1 - t) of its vCPU time; assume its dirty rate scales with it.
    share = (1 - est.throttle_pct / 100) * TARGET_RATIO / max(ratio, 1e-6)
    model = 100 * (1 - share)
    floor = asked + THROTTLE_STEP if asked else THROTTLE_FIRST
    pct = min(THROTTLE_CEILING, 5 * math.ceil(max(model, floor) / 5))
    return Throttle(pct, f"dirtying {_pct(est.ratio)} of the bandwidth; {pct}% is the least"
                    f" predicted to bring it to {_pct(TARGET_RATIO)}", est,
                    initial_pct=pct, increment_pct=max(1, pct - est.throttle_pct))


def _can_finish_otherwise(policy: MigrationPolicy, est: Estimate) -> bool:
    """Post-copy or a bounded pause would finish now. (Only then is a throttle that shows no
    effect given up: while the hot set is rewritten whole every pass, the measured ratio
    stays at 1 until the throttle is enough, so harder may still help.)"""
    return policy.allow_postcopy or (policy.allow_pause
                                     and est.downtime_ms <= pause_bound_ms(policy))


def _pct(ratio: float | None) -> str:
    return "?" if ratio is None else f"{100 * ratio:.0f}%"


def _escape(policy: MigrationPolicy, est: Estimate, history: History, engine: Engine,
            why: str, *, final: bool = False) -> Step:
    """Step 5: what is left when pre-copy, the downtime limit and throttling cannot finish."""
    if policy.allow_postcopy:
        return StartPostcopy(f"{why}: post-copy always finishes (from now on the VM runs on"
                             " the target, which pulls the pages it lacks)", est)
    bound = pause_bound_ms(policy)
    if policy.allow_pause and est.downtime_ms <= bound:
        limit = min(bound, max(policy.max_downtime_ms,
                               math.ceil(est.downtime_ms * DOWNTIME_MARGIN)))
        return PauseAndFinish(limit, f"{why}: the rest fits a pause of at most about"
                              f" {est.downtime_ms:.0f} ms (bound {bound} ms)", est)
    closed = _closed_escapes(policy, est, bound, throttle=not policy.allow_throttle
                             and "throttl" not in why)
    if final:
        return GiveUp(f"{why}; {closed}", est)
    stalled = stalled_passes(history, since_pass=engine.changed_pass)
    if stalled >= STALL_PASSES:
        return GiveUp(f"{why}, what is left has not shrunk for {stalled} passes, and {closed}",
                      est)
    return Continue(f"{why}; {closed}: waiting for the copy to shrink", est,
                    topic="no-escape")


def _closed_escapes(policy: MigrationPolicy, est: Estimate, bound: int, *,
                    throttle: bool) -> str:
    closed = ["post-copy is not allowed"]
    if not policy.allow_pause:
        closed.append("pausing is not allowed")
    else:
        closed.append(f"a pause would last about {est.downtime_ms:.0f} ms, over the bound"
                      f" of {bound} ms")
    if throttle:
        closed.append("throttling is not allowed")
    return ", ".join(closed)

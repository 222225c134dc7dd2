"""Convergence policies, pure: synthetic query-migrate samples and a fake clock.

``Sim`` is a small model of QEMU's pre-copy (the notation of design/migration.md): each pass
sends what the last sync found dirty at bandwidth B while the guest dirties a hot working
set W at rate D (D scaled by the vCPU time a throttle leaves, if the guest is CPU-bound);
QEMU switches over once what is left fits B x the downtime limit. Its clock is the sum of
the passes' durations: nothing sleeps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import pytest

from ferry.migration import foreign
from ferry.migration.convergence import (
    Continue,
    Engine,
    GiveUp,
    PauseAndFinish,
    SetDowntime,
    StartPostcopy,
    Step,
    Throttle,
    describe,
    estimate,
    pass_starts,
)
from ferry.migration.policy import (
    THROTTLE_CEILING,
    decide,
    effective_policy,
    pause_bound_ms,
    setup,
)
from ferry.model.migration import MigrationOptions, MigrationProgress
from ferry.model.policy import MigrationPolicy, PolicyKind

MiB = 2**20
GiB = 2**30


def sample(it: int, *, t: float, sent: int, left: int, ram: int = 256 * MiB,
           bw: float = 128 * MiB, throttle: int = 0) -> MigrationProgress:
    return MigrationProgress(
        at=1000.0 + t, status="active", elapsed_ms=int(t * 1000) + 1, ram_total=ram,
        ram_transferred=sent, ram_remaining=left, throughput_bps=bw, dirty_rate_pps=0,
        page_size=4096, expected_downtime_ms=0, iterations=it, throttle_pct=throttle)


@dataclass
class Outcome:
    completed: bool
    elapsed_s: float
    downtime_ms: float
    steps: list[Step] = field(default_factory=list)
    final: Step | None = None

    def of(self, kind: type) -> list[Step]:
        return [s for s in self.steps if isinstance(s, kind)]


@dataclass
class Sim:
    hot: int  # W, bytes
    dirty_bps: float  # D with no throttle
    link_bps: float = 1 * GiB  # what the network could carry
    ram: int = 256 * MiB
    used: int = 128 * MiB  # non-zero memory: what the first pass sends
    cpu_bound: bool = True  # D scales with the vCPU time the throttle leaves

    def dirty(self, throttle: int) -> float:
        if self.cpu_bound:
            return self.dirty_bps * (1 - throttle / 100)
        # A paced writer keeps its rate until the throttle leaves it too little CPU.
        return min(self.dirty_bps, 4 * self.dirty_bps * (1 - throttle / 100))

    def run(self, policy: MigrationPolicy, *, limit_s: float = 600) -> Outcome:
        s = setup(policy, self.ram)
        engine = s.engine
        bw = min(self.link_bps, engine.max_bandwidth or math.inf)
        throttle = s.qemu_throttle.initial_pct if s.qemu_throttle else 0
        t, it, sent, left = 0.0, 1, 0, self.used
        history: list[MigrationProgress] = []
        out = Outcome(completed=False, elapsed_s=0.0, downtime_ms=0.0)
        while t < limit_s:
            history.append(sample(it, t=t, sent=sent, left=left, ram=self.ram, bw=bw,
                                  throttle=throttle))
            step = decide(policy, history, engine, t)
            out.final = step
            if not isinstance(step, Continue):
                out.steps.append(step)
            if isinstance(step, GiveUp):
                out.elapsed_s = t
                return out
            if isinstance(step, Throttle):
                throttle = step.max_pct
            engine = engine.after(step, pass_=it, elapsed_s=t)
            if engine.postcopy or engine.paused or left <= bw * engine.downtime_limit_ms / 1000:
                out.completed, out.elapsed_s = True, t + left / bw
                out.downtime_ms = 0.0 if engine.postcopy else 1000 * left / bw
                return out
            duration = left / bw
            t, sent, it = t + duration, sent + left, it + 1
            left = int(min(self.hot, self.dirty(throttle) * duration))
        out.elapsed_s = t
        return out


ADAPTIVE = MigrationPolicy(budget_s=60)
NO_ESCAPE = MigrationPolicy(allow_throttle=False, allow_postcopy=False, allow_pause=False,
                            budget_s=20)
# The lab's hot set: 96 MiB rewritten at 200 MiB/s over a 128 MiB/s link.
HOT = Sim(hot=96 * MiB, dirty_bps=200 * MiB, link_bps=128 * MiB)


# --- the adaptive policy on whole migrations -------------------------------------------


def test_idle_guest_needs_no_step() -> None:
    out = Sim(hot=0, dirty_bps=0).run(ADAPTIVE)
    assert out.completed and out.steps == []
    assert out.downtime_ms <= ADAPTIVE.start_downtime_ms


def test_slowly_dirtying_guest_converges_by_itself() -> None:
    out = Sim(hot=64 * MiB, dirty_bps=300 * MiB).run(ADAPTIVE)  # D = 0.3 B
    assert out.completed and out.steps == []


def test_qemu_defaults_cannot_finish_the_hot_set_and_adaptive_can() -> None:
    qemu = HOT.run(MigrationPolicy(kind=PolicyKind.QEMU_DEFAULTS, budget_s=30))
    assert not qemu.completed and isinstance(qemu.final, GiveUp)
    assert qemu.elapsed_s >= 30 and "budget" in qemu.final.reason

    out = HOT.run(ADAPTIVE)
    assert out.completed, out.final
    assert out.downtime_ms <= ADAPTIVE.max_downtime_ms
    assert out.of(Throttle), "the hot set needs the guest slowed down"
    assert not out.of(PauseAndFinish) and not out.of(StartPostcopy)


def test_throttle_is_the_smallest_predicted_and_only_grows() -> None:
    # A paced writer: a throttle shows only once it leaves the guest too little CPU.
    policy = dataclasses.replace(ADAPTIVE, allow_pause=False)
    out = dataclasses.replace(HOT, cpu_bound=False).run(policy)
    throttles = [s.max_pct for s in out.of(Throttle)]
    assert throttles == [50, 75, 90]
    assert out.completed and out.downtime_ms <= ADAPTIVE.max_downtime_ms


def test_a_throttle_that_does_not_bite_gives_way_to_a_bounded_pause() -> None:
    out = dataclasses.replace(HOT, cpu_bound=False).run(ADAPTIVE)
    assert [s.max_pct for s in out.of(Throttle)] == [50, 75]
    pause = out.steps[-1]
    assert isinstance(pause, PauseAndFinish) and "has not slowed" in pause.reason
    assert out.completed and out.downtime_ms <= pause_bound_ms(ADAPTIVE)


def test_first_throttle_follows_the_model() -> None:
    # The hot set is rewritten whole every pass, so what a pass measures is D = B (the
    # working set caps it): half the bandwidth needs half the CPU, a 50 % throttle.
    out = HOT.run(ADAPTIVE)
    first = out.of(Throttle)[0]
    assert isinstance(first, Throttle) and first.max_pct == 50
    assert first.initial_pct == 50 and first.increment_pct == 50
    # At a 60 % throttle, a guest dirtying 40 % of the bandwidth is left alone; one dirtying
    # 90 % needs 0.4 x 0.5 / 0.9 = 22 % of its CPU: a 78 % throttle, 80 rounded up.
    engine = Engine(downtime_limit_ms=50, max_bandwidth=0, throttle_pct=60, changed_pass=2,
                    steps=1)
    history = [sample(i, t=i, sent=i * 100 * MiB, left=(100 if i < 3 else 40) * MiB,
                      throttle=60) for i in range(1, 6)]
    policy = dataclasses.replace(ADAPTIVE, max_downtime_ms=100)
    step = decide(policy, history, engine, 10.0)
    assert isinstance(step, Continue) and step.topic == "converging"
    history += [sample(i, t=i, sent=i * 100 * MiB, left=90 * MiB, throttle=60)
                for i in range(6, 9)]
    step = decide(policy, history, engine, 10.0)
    assert isinstance(step, Throttle) and step.max_pct == 80
    assert step.increment_pct == 20


def test_downtime_is_raised_when_what_is_left_fits_the_maximum() -> None:
    # 30 MiB rewritten faster than the link: R/B = 234 ms, within the maximum of 300 ms.
    out = Sim(hot=30 * MiB, dirty_bps=300 * MiB, link_bps=128 * MiB).run(ADAPTIVE)
    (raise_,) = out.of(SetDowntime)
    assert isinstance(raise_, SetDowntime) and 234 < raise_.downtime_ms <= 300
    assert out.completed and out.downtime_ms <= 300 and not out.of(Throttle)


def test_without_throttle_a_bounded_pause_finishes() -> None:
    policy = dataclasses.replace(ADAPTIVE, allow_throttle=False)
    out = HOT.run(policy)
    (pause,) = out.of(PauseAndFinish)
    assert isinstance(pause, PauseAndFinish)
    assert out.completed and out.downtime_ms <= pause_bound_ms(policy)
    assert "throttling is not allowed" in pause.reason


def test_post_copy_when_allowed_and_throttling_cannot_help() -> None:
    policy = dataclasses.replace(ADAPTIVE, allow_throttle=False, allow_postcopy=True)
    out = HOT.run(policy)
    assert out.completed and isinstance(out.steps[-1], StartPostcopy)


def test_forbidding_every_escape_gives_up_early_with_the_reason() -> None:
    out = HOT.run(NO_ESCAPE)
    assert not out.completed and isinstance(out.final, GiveUp)
    assert out.elapsed_s < NO_ESCAPE.budget_s, "nothing can converge: no need to wait"
    reason = out.final.reason
    for words in ("throttling is not allowed", "post-copy is not allowed",
                  "pausing is not allowed", "has not shrunk"):
        assert words in reason


def test_budget_spent_gives_up_when_the_pause_would_be_too_long() -> None:
    # 2 GiB hot at 2 GiB/s over 128 MiB/s, a throttle that does not bite: 16 s pause.
    sim = Sim(hot=2 * GiB, dirty_bps=2 * GiB, link_bps=128 * MiB, ram=4 * GiB, used=3 * GiB,
              cpu_bound=False)
    out = sim.run(MigrationPolicy(budget_s=60))
    assert not out.completed and isinstance(out.final, GiveUp)
    assert "a pause would last" in out.final.reason


def test_budget_spent_during_the_first_pass() -> None:
    policy = MigrationPolicy(budget_s=5, allow_pause=False)
    history = [sample(1, t=6, sent=700 * MiB, left=1300 * MiB)]
    step = decide(policy, history, setup(policy, 2 * GiB).engine, 6.0)
    assert isinstance(step, GiveUp) and "budget of 5 s is spent" in step.reason


def test_after_a_step_the_policy_watches_before_judging() -> None:
    engine = Engine(downtime_limit_ms=50, max_bandwidth=0)
    history = [sample(1, t=0, sent=0, left=128 * MiB),
               sample(2, t=1, sent=128 * MiB, left=96 * MiB),
               sample(3, t=1.75, sent=224 * MiB, left=96 * MiB)]
    step = decide(ADAPTIVE, history, engine, 1.75)
    assert isinstance(step, Throttle)
    engine = engine.after(step, pass_=3, elapsed_s=1.75)
    history.append(sample(4, t=2.5, sent=320 * MiB, left=96 * MiB))
    again = decide(ADAPTIVE, history, engine, 2.5)
    assert isinstance(again, Continue) and again.quiet


def test_finishing_steps_are_not_second_guessed() -> None:
    history = [sample(5, t=9, sent=1 * GiB, left=96 * MiB)]
    post = Engine(downtime_limit_ms=50, max_bandwidth=0, postcopy=True, changed_s=9.0)
    assert isinstance(decide(NO_ESCAPE, history, post, 1000.0), Continue)
    paused = Engine(downtime_limit_ms=50, max_bandwidth=0, paused=True, changed_s=9.0)
    assert isinstance(decide(NO_ESCAPE, history, paused, 12.0), Continue)


def test_a_pause_that_does_not_finish_is_abandoned() -> None:
    # The bound is 3 s; after three times that the guest resumes on the source.
    history = [sample(5, t=9, sent=1 * GiB, left=96 * MiB)]
    paused = Engine(downtime_limit_ms=50, max_bandwidth=0, paused=True, changed_s=9.0)
    assert isinstance(decide(ADAPTIVE, history, paused, 17.9), Continue)
    step = decide(ADAPTIVE, history, paused, 18.5)
    assert isinstance(step, GiveUp) and "has not finished in 9.5 s" in step.reason


def test_throttle_stops_at_its_ceiling() -> None:
    engine = Engine(downtime_limit_ms=50, max_bandwidth=0, throttle_pct=THROTTLE_CEILING,
                    changed_pass=1, steps=1)
    history = [sample(i, t=i, sent=i * 96 * MiB, left=96 * MiB, throttle=THROTTLE_CEILING)
               for i in range(1, 8)]
    policy = dataclasses.replace(ADAPTIVE, allow_pause=False)
    step = decide(policy, history, engine, 7.0)
    assert isinstance(step, GiveUp) and f"even at {THROTTLE_CEILING}% throttle" in step.reason


# --- measuring --------------------------------------------------------------------------


def test_estimate_measures_bandwidth_dirty_rate_and_ratio() -> None:
    engine = Engine(downtime_limit_ms=100, max_bandwidth=0)
    history = [sample(1, t=0, sent=0, left=200 * MiB),
               sample(1, t=0.5, sent=64 * MiB, left=136 * MiB),  # within the first pass
               sample(2, t=1.0, sent=128 * MiB, left=64 * MiB),
               sample(3, t=1.5, sent=192 * MiB, left=48 * MiB),
               sample(4, t=1.875, sent=240 * MiB, left=36 * MiB)]
    assert [s.iterations for s in pass_starts(history)] == [1, 2, 3, 4]
    est = estimate(history, engine)
    assert est is not None
    # The first pass (all of memory) is left out: passes 2-4 sent 112 MiB in 0.875 s and
    # the guest dirtied 84 MiB meanwhile.
    assert est.bandwidth_bps == pytest.approx(128 * MiB)
    assert est.dirty_bps == pytest.approx(96 * MiB)
    assert est.ratio == pytest.approx(0.75)
    assert est.downtime_ms == pytest.approx(1000 * 36 / 128)
    converge = est.converge_s
    assert converge is not None and 0 < converge < 1.5
    assert "pass 4: 36.0 MiB left" in est.text()


def test_estimate_only_counts_passes_since_the_last_change() -> None:
    history = [sample(i, t=i, sent=i * 100 * MiB, left=100 * MiB) for i in range(1, 6)]
    history += [sample(6, t=6, sent=600 * MiB, left=50 * MiB),
                sample(7, t=6.5, sent=650 * MiB, left=25 * MiB)]
    engine = Engine(downtime_limit_ms=50, max_bandwidth=0, changed_pass=5, steps=1)
    est = estimate(history, engine)
    assert est is not None and est.ratio == pytest.approx(75 / 150)


def test_estimate_during_the_first_pass_has_no_ratio() -> None:
    engine = Engine(downtime_limit_ms=50, max_bandwidth=0)
    est = estimate([sample(1, t=0.3, sent=10 * MiB, left=100 * MiB)], engine)
    assert est is not None and est.ratio is None and est.converge_s is None
    assert estimate([], engine) is None


def test_describe_says_what_why_and_the_figures() -> None:
    history = [sample(1, t=0, sent=0, left=128 * MiB),
               sample(2, t=1, sent=128 * MiB, left=96 * MiB),
               sample(3, t=1.75, sent=224 * MiB, left=96 * MiB)]
    step = decide(ADAPTIVE, history, Engine(50, 0), 1.75)
    text = describe(step)
    assert text.startswith("policy: throttle guest to ")
    assert "pass 3: 96.0 MiB left" in text and "MiB/s" in text and "downtime if" in text


# --- which policy applies --------------------------------------------------------------


def test_effective_policy_migration_then_vm_then_cluster() -> None:
    mine = MigrationPolicy(budget_s=1)
    vm = MigrationPolicy(budget_s=2)
    cluster = MigrationPolicy(budget_s=3)
    assert effective_policy(MigrationOptions(policy=mine), vm, cluster) == mine
    assert effective_policy(MigrationOptions(), vm, cluster) == vm
    assert effective_policy(MigrationOptions(), None, cluster) == cluster
    assert effective_policy(MigrationOptions(), None, None) == MigrationPolicy()


def test_request_bandwidth_and_downtime_apply_to_the_policy() -> None:
    p = effective_policy(MigrationOptions(max_bandwidth=20 * MiB, downtime_limit_ms=500),
                         None, MigrationPolicy(max_downtime_ms=300))
    assert p.max_bandwidth == 20 * MiB
    assert (p.start_downtime_ms, p.max_downtime_ms) == (500, 500)
    named = MigrationPolicy(start_downtime_ms=10)
    p = effective_policy(MigrationOptions(policy=named, downtime_limit_ms=500), None, None)
    assert p.start_downtime_ms == 10, "a named policy keeps its own downtime"


def test_adaptive_setup_enables_only_the_allowed_escapes() -> None:
    s = setup(MigrationPolicy(start_downtime_ms=40, max_bandwidth=5 * MiB), GiB)
    assert (s.engine.downtime_limit_ms, s.engine.max_bandwidth) == (40, 5 * MiB)
    assert s.auto_converge and not s.postcopy and s.qemu_throttle is None
    s = setup(MigrationPolicy(allow_throttle=False, allow_postcopy=True), GiB)
    assert not s.auto_converge and s.postcopy


# --- the others' policies --------------------------------------------------------------


def test_qemu_defaults_are_128_mib_and_300_ms_and_never_give_up_early() -> None:
    policy = MigrationPolicy(kind=PolicyKind.QEMU_DEFAULTS, budget_s=30)
    s = setup(policy, GiB)
    assert (s.engine.downtime_limit_ms, s.engine.max_bandwidth) == (300, 128 * MiB)
    assert not (s.auto_converge or s.postcopy or s.xbzrle_cache)
    capped = setup(dataclasses.replace(policy, max_bandwidth=20 * MiB), GiB)
    assert capped.engine.max_bandwidth == 20 * MiB
    history = [sample(i, t=i, sent=i * 96 * MiB, left=96 * MiB) for i in range(1, 20)]
    assert isinstance(decide(policy, history, s.engine, 29.9), Continue)
    assert isinstance(decide(policy, history, s.engine, 30.0), GiveUp)


def test_nova_ladder_is_novas_scaled() -> None:
    ladder = foreign.nova_ladder(256 * MiB)  # counted as 2 GiB, as Nova does
    assert [d for _, d in ladder] == [50, 95, 140, 185, 230, 275, 320, 365, 410, 455, 500]
    step_s = 75 * 2 * foreign.TIME_SCALE
    assert [at for at, _ in ladder] == pytest.approx([i * step_s for i in range(11)])


def test_nova_climbs_the_ladder_then_aborts_at_its_completion_timeout() -> None:
    out = HOT.run(MigrationPolicy(kind=PolicyKind.NOVA, budget_s=600))
    downtimes = [s.downtime_ms for s in out.of(SetDowntime)]
    assert downtimes == sorted(downtimes) and downtimes[-1] == 500
    assert not out.completed and isinstance(out.final, GiveUp)
    timeout = 800 * 2 * foreign.TIME_SCALE
    assert timeout <= out.elapsed_s < timeout + 2
    assert "completion timeout" in out.final.reason


def test_nova_finishes_a_set_its_ladder_reaches() -> None:
    out = Sim(hot=48 * MiB, dirty_bps=300 * MiB, link_bps=128 * MiB).run(
        MigrationPolicy(kind=PolicyKind.NOVA))
    assert out.completed and 300 < out.downtime_ms <= 500


def test_nova_switches_to_post_copy_when_permitted_and_stuck() -> None:
    out = HOT.run(MigrationPolicy(kind=PolicyKind.NOVA, allow_postcopy=True))
    assert out.completed and isinstance(out.steps[-1], StartPostcopy)


def test_proxmox_starts_with_auto_converge_and_xbzrle_and_doubles_downtime() -> None:
    policy = MigrationPolicy(kind=PolicyKind.PROXMOX)
    s = setup(policy, 1 * GiB)
    assert s.auto_converge and s.qemu_throttle is not None
    assert (s.qemu_throttle.initial_pct, s.qemu_throttle.increment_pct,
            s.qemu_throttle.max_pct) == (20, 10, 99)
    assert s.xbzrle_cache == 128 * MiB  # 10 % of 1 GiB, to a power of two
    assert s.engine.downtime_limit_ms == 100
    history = [sample(i, t=i, sent=i * 96 * MiB, left=96 * MiB) for i in range(1, 7)]
    step = decide(policy, history, s.engine, 6.0)
    assert isinstance(step, Continue), "5 passes without progress are not yet enough"
    history.append(sample(7, t=7, sent=7 * 96 * MiB, left=96 * MiB))
    step = decide(policy, history, s.engine, 7.0)
    assert isinstance(step, SetDowntime) and step.downtime_ms == 200


def test_libvirt_turns_on_auto_converge_after_no_progress() -> None:
    policy = MigrationPolicy(kind=PolicyKind.LIBVIRT, budget_s=60)
    s = setup(policy, GiB)
    assert s.auto_converge and s.qemu_throttle is None and s.engine.downtime_limit_ms == 300
    stall = foreign.KUBEVIRT_PROGRESS_TIMEOUT_S * foreign.TIME_SCALE
    history = [sample(i, t=i * 0.5, sent=i * 64 * MiB, left=96 * MiB) for i in range(1, 4)]
    assert isinstance(decide(policy, history, s.engine, 1.5), Continue)
    history += [sample(i, t=i * 0.5, sent=i * 64 * MiB, left=96 * MiB)
                for i in range(4, 4 + int(2 * stall) + 2)]
    step = decide(policy, history, s.engine, history[-1].at - 1000)
    assert isinstance(step, Throttle)
    assert (step.initial_pct, step.increment_pct, step.max_pct) == (20, 10, 99)


def test_libvirt_aborts_at_the_budget_or_switches_to_post_copy_if_allowed() -> None:
    policy = MigrationPolicy(kind=PolicyKind.LIBVIRT, budget_s=10)
    engine = setup(policy, GiB).engine
    history = [sample(1, t=10, sent=GiB, left=96 * MiB)]
    assert isinstance(decide(policy, history, engine, 10.0), GiveUp)
    post = dataclasses.replace(policy, allow_postcopy=True)
    assert isinstance(decide(post, history, engine, 10.0), StartPostcopy)


@pytest.mark.parametrize("kind", list(PolicyKind))
def test_every_policy_gives_up_when_its_budget_is_long_spent(kind: PolicyKind) -> None:
    policy = MigrationPolicy(kind=kind, budget_s=10, allow_throttle=False, allow_pause=False)
    s = setup(policy, 8 * GiB)
    history = [sample(i, t=i, sent=i * 96 * MiB, left=2 * GiB, ram=8 * GiB)
               for i in range(1, 6)]
    assert isinstance(decide(policy, history, s.engine, 1000.0), GiveUp)


def test_engine_after_records_each_step() -> None:
    e = Engine(downtime_limit_ms=50, max_bandwidth=0)
    e2 = e.after(SetDowntime(120, "x"), pass_=4, elapsed_s=2.0)
    assert (e2.downtime_limit_ms, e2.changed_pass, e2.changed_s, e2.steps) == (120, 4, 2.0, 1)
    e3 = e2.after(Throttle(40, "x"), pass_=6, elapsed_s=3.0)
    assert e3.throttle_pct == 40 and e3.steps == 2
    assert e3.after(Continue("x"), pass_=9, elapsed_s=9.0) == e3
    e4 = e3.after(PauseAndFinish(900, "x"), pass_=7, elapsed_s=4.0)
    assert e4.paused and e4.downtime_limit_ms == 900
    assert e4.after(StartPostcopy("x"), pass_=8, elapsed_s=5.0).postcopy

"""The pure migration scheduler: limits, priority, fairness across sources, reasons."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from ferry.migration.scheduler import is_queued, is_running, queue_order, schedule
from ferry.model.migration import MigrationOptions, MigrationPhase, MigrationRecord
from ferry.model.policy import MigrationLimits

P = MigrationPhase
ONE_AT_A_TIME = MigrationLimits(per_source=1, per_target=1, per_cluster=1)
WIDE = MigrationLimits(per_source=10, per_target=10, per_cluster=10)


def rec(mid: str, source: str = "node1", target: str = "node2", *, at: float = 0.0,
        priority: int = 0, phase: MigrationPhase = P.QUEUED,
        admitted_at: float | None = None, vm: str | None = None) -> MigrationRecord:
    return MigrationRecord(id=mid, vm=vm or f"vm-{mid}", source=source, target=target,
                           phase=phase, created_at=at,
                           options=MigrationOptions(priority=priority),
                           admitted_at=admitted_at)


def running(mid: str, source: str = "node1", target: str = "node2") -> MigrationRecord:
    return rec(mid, source, target, phase=P.COPYING_MEMORY, admitted_at=1.0)


def ids(recs: tuple[MigrationRecord, ...] | list[MigrationRecord]) -> list[str]:
    return [r.id for r in recs]


# --- what counts as queued and running --------------------------------------------------


def test_queued_means_queued_and_not_admitted() -> None:
    assert is_queued(rec("a"))
    assert not is_queued(rec("a", admitted_at=5.0))
    assert not is_queued(rec("a", phase=P.CONNECTING))


@pytest.mark.parametrize("phase", list(P))
def test_running_means_admitted_or_past_queued_and_not_ended(phase: MigrationPhase) -> None:
    # Records from before the scheduler have no admitted_at: past QUEUED, they run.
    legacy = rec("a", phase=phase)
    admitted = rec("a", phase=phase, admitted_at=5.0)
    assert is_running(legacy) is (not phase.terminal and phase is not P.QUEUED)
    assert is_running(admitted) is (not phase.terminal)


def test_ended_migrations_neither_wait_nor_count() -> None:
    ended = [rec(f"e{i}", phase=p, admitted_at=1.0)
             for i, p in enumerate((P.COMPLETED, P.FAILED, P.CANCELLED))]
    s = schedule([*ended, rec("q")], ONE_AT_A_TIME)
    assert ids(s.admit) == ["q"]
    assert s.waiting == {}
    assert s.running == 1


# --- limits ---------------------------------------------------------------------------


def test_nothing_queued_nothing_admitted() -> None:
    s = schedule([running("r")], MigrationLimits())
    assert s.admit == () and s.waiting == {} and s.running == 1


def test_outbound_limit_one_admits_the_oldest_and_queues_the_rest() -> None:
    queued = [rec("c", at=3.0), rec("a", at=1.0), rec("b", at=2.0)]
    s = schedule(queued, MigrationLimits(per_source=1))
    assert ids(s.admit) == ["a"]
    assert s.waiting["b"].position == 1 and s.waiting["c"].position == 2
    assert s.waiting["b"].why == "node1 has 1 outbound migration running (limit 1): vm-a"


def test_a_running_migration_blocks_its_source() -> None:
    s = schedule([running("r", "node1", "node3"), rec("q", "node1", "node2")],
                 MigrationLimits(per_source=1))
    assert s.admit == ()
    assert s.waiting["q"].why == "node1 has 1 outbound migration running (limit 1): vm-r"


def test_a_legacy_migration_past_queued_without_admitted_at_counts_as_running() -> None:
    legacy = rec("old", phase=P.COPYING_MEMORY)
    s = schedule([legacy, rec("q")], MigrationLimits(per_source=1))
    assert s.admit == () and "vm-old" in s.waiting["q"].why


def test_an_admitted_migration_still_in_queued_phase_counts_as_running() -> None:
    s = schedule([rec("a", admitted_at=1.0), rec("q", at=1.0)], MigrationLimits(per_source=1))
    assert s.admit == () and s.running == 1


def test_a_legacy_queued_migration_without_admitted_at_is_admitted() -> None:
    # Requested before the scheduler existed: it waits like any other and gets admitted.
    s = schedule([rec("old", at=-100.0)], MigrationLimits())
    assert ids(s.admit) == ["old"]


def test_inbound_limit() -> None:
    queued = [rec("a", "node1", "node9", at=1), rec("b", "node2", "node9", at=2),
              rec("c", "node3", "node9", at=3)]
    s = schedule(queued, MigrationLimits(per_source=1, per_target=2, per_cluster=10))
    assert ids(s.admit) == ["a", "b"]
    assert s.waiting["c"].why == ("node9 has 2 inbound migrations running (limit 2):"
                                  " vm-a, vm-b")


def test_cluster_limit() -> None:
    queued = [rec(f"m{i}", f"node{i}", f"t{i}", at=i) for i in range(6)]
    s = schedule([running("r", "x", "y"), *queued], MigrationLimits(per_cluster=4))
    assert ids(s.admit) == ["m0", "m1", "m2"]
    assert s.running == 4
    assert s.waiting["m3"].why == "4 migrations running in the cluster (limit 4)"
    assert [s.waiting[f"m{i}"].position for i in (3, 4, 5)] == [1, 2, 3]


def test_every_reason_that_applies_is_given() -> None:
    s = schedule([running("r", "node1", "node2"), rec("q", "node1", "node2")], ONE_AT_A_TIME)
    why = s.waiting["q"].why.split("; ")
    assert why == ["node1 has 1 outbound migration running (limit 1): vm-r",
                   "node2 has 1 inbound migration running (limit 1): vm-r",
                   "1 migration running in the cluster (limit 1)"]


def test_many_running_are_named_briefly() -> None:
    rs = [running(f"r{i}", "node1", f"t{i}") for i in range(5)]
    s = schedule([*rs, rec("q")], MigrationLimits(per_source=5, per_cluster=9))
    assert s.waiting["q"].why.endswith("vm-r0, vm-r1, vm-r2 and 2 more")


def test_a_blocked_migration_does_not_hold_back_one_that_fits() -> None:
    # Work-conserving: node1 is busy, node3's migration goes anyway although it is younger.
    s = schedule([running("r", "node1", "node5"), rec("a", "node1", "node2", at=1),
                  rec("b", "node3", "node4", at=2)], MigrationLimits(per_source=1))
    assert ids(s.admit) == ["b"]
    assert s.waiting["a"].position == 1


def test_down_nodes_wait_and_take_no_slot() -> None:
    queued = [rec("a", "node1", "node2", at=1), rec("b", "node3", "node4", at=2),
              rec("c", "node5", "node6", at=3)]
    s = schedule(queued, MigrationLimits(per_cluster=1), down={"node2", "node3"})
    assert ids(s.admit) == ["c"]
    assert s.waiting["a"].why == "target node2 is down"
    assert s.waiting["b"].why == "source node3 is down"


# --- priority -------------------------------------------------------------------------


def test_higher_priority_first_whatever_its_age() -> None:
    queued = [rec("old", at=1.0), rec("urgent", at=9.0, priority=5), rec("mid", at=5.0,
                                                                          priority=1)]
    assert ids(queue_order(queued)) == ["urgent", "mid", "old"]
    s = schedule(queued, MigrationLimits(per_source=1))
    assert ids(s.admit) == ["urgent"]
    assert [s.waiting[m].position for m in ("mid", "old")] == [1, 2]


def test_negative_priorities_go_last() -> None:
    assert ids(queue_order([rec("low", at=0.0, priority=-1), rec("norm", at=5.0)])) == [
        "norm", "low"]


def test_a_lower_priority_never_takes_a_slot_a_waiting_higher_one_needs() -> None:
    # "hi" waits for node1 (busy); node2 has a free inbound slot, which it will need: the
    # low-priority migration from node3 to node2 must not take it.
    s = schedule([running("r", "node1", "node9"), rec("hi", "node1", "node2", priority=5),
                  rec("lo", "node3", "node2", at=-5.0)],
                 MigrationLimits(per_source=1, per_target=1, per_cluster=10))
    assert s.admit == ()
    assert s.waiting["hi"].position == 1
    assert s.waiting["lo"].why == ("node2's inbound slot is kept for vm-hi (migration hi,"
                                   " priority 5)")


def test_a_lower_priority_may_use_nodes_the_higher_one_does_not_need() -> None:
    s = schedule([running("r", "node1", "node9"), rec("hi", "node1", "node2", priority=5),
                  rec("lo", "node3", "node4")], MigrationLimits(per_source=1))
    assert ids(s.admit) == ["lo"]


def test_equal_priorities_do_not_hold_slots() -> None:
    s = schedule([running("r", "node1", "node9"), rec("a", "node1", "node2", at=1),
                  rec("b", "node3", "node2", at=2)],
                 MigrationLimits(per_source=1, per_target=1, per_cluster=10))
    assert ids(s.admit) == ["b"]


# --- fairness -------------------------------------------------------------------------


def test_round_robin_across_sources_oldest_first_within_each() -> None:
    # node1 is drained (five migrations) just before node2 asks for two: node2 is not
    # stuck behind the whole drain.
    drain = [rec(f"d{i}", "node1", "node3", at=10 + i) for i in range(5)]
    other = [rec(f"o{i}", "node2", "node3", at=20 + i) for i in range(2)]
    order = ids(queue_order(other + drain))
    assert order == ["d0", "o0", "d1", "o1", "d2", "d3", "d4"]


def test_fair_admission_across_sources_under_a_cluster_limit() -> None:
    drain = [rec(f"d{i}", "node1", f"t{i}", at=10 + i) for i in range(5)]
    other = [rec("o0", "node2", "t9", at=30)]
    s = schedule(drain + other, MigrationLimits(per_source=5, per_target=5, per_cluster=2))
    assert ids(s.admit) == ["d0", "o0"]


def test_the_same_input_in_any_order_gives_the_same_schedule() -> None:
    recs = [rec(f"m{i}", f"node{i % 3}", f"node{3 + i % 2}", at=i % 4, priority=i % 2)
            for i in range(9)] + [running("r", "node0", "node4")]
    limits = MigrationLimits(per_source=1, per_target=2, per_cluster=3)
    want = schedule(recs, limits)
    rng = random.Random(7)
    for _ in range(20):
        rng.shuffle(recs)
        assert schedule(recs, limits) == want


@pytest.mark.parametrize("seed", range(30))
def test_limits_are_never_exceeded(seed: int) -> None:
    rng = random.Random(seed)
    nodes = [f"n{i}" for i in range(4)]
    recs = []
    for i in range(rng.randint(0, 15)):
        src, dst = rng.sample(nodes, 2)
        phase = rng.choice([P.QUEUED, P.QUEUED, P.QUEUED, P.COPYING_MEMORY, P.COMPLETED])
        recs.append(rec(f"m{i}", src, dst, at=rng.random(), priority=rng.randint(0, 2),
                        phase=phase, admitted_at=None if phase is P.QUEUED else 1.0))
    limits = MigrationLimits(per_source=rng.randint(1, 2), per_target=rng.randint(1, 3),
                             per_cluster=rng.randint(1, 5))
    s = schedule(recs, limits)
    admitted = {r.id for r in s.admit}
    after = [dataclasses.replace(r, admitted_at=2.0) if r.id in admitted else r for r in recs]
    live = [r for r in after if is_running(r)]
    for node in nodes:
        assert sum(r.source == node for r in live) <= max(
            limits.per_source, sum(r.source == node for r in recs if is_running(r)))
        assert sum(r.target == node for r in live) <= max(
            limits.per_target, sum(r.target == node for r in recs if is_running(r)))
    assert len(live) <= max(limits.per_cluster, sum(is_running(r) for r in recs))
    assert s.running == len(live)
    # Every queued migration is either admitted or told where it stands and why.
    queued = {r.id for r in recs if is_queued(r)}
    assert admitted | set(s.waiting) == queued and not admitted & set(s.waiting)
    assert sorted(w.position for w in s.waiting.values()) == list(range(1, len(s.waiting) + 1))
    assert all(w.why for w in s.waiting.values())


def test_admission_over_time_runs_three_one_after_another() -> None:
    """Three from node1 with an outbound limit of 1: one at a time, in request order."""
    recs = {m: rec(m, "node1", "node2", at=i) for i, m in enumerate(("a", "b", "c"))}
    started = []
    for t in itertools.count(10):
        s = schedule(recs.values(), MigrationLimits(per_source=1))
        assert len(s.admit) <= 1
        for r in s.admit:
            started.append(r.id)
            recs[r.id] = dataclasses.replace(r, admitted_at=float(t))
        for m, r in recs.items():  # whatever runs ends before the next step
            if is_running(r) and r.id not in {a.id for a in s.admit}:
                recs[m] = r.advance(P.COMPLETED, at=float(t), node="node1")
        if all(r.phase.terminal for r in recs.values()):
            break
    assert started == ["a", "b", "c"]

"""Migration phases, their transitions, ``settled``, and progress samples."""

from __future__ import annotations

import dataclasses

import pytest

from ferry.model.errors import Conflict
from ferry.model.migration import (
    MigrationPhase,
    MigrationProgress,
    MigrationRecord,
    PhaseEvent,
    allowed,
)

P = MigrationPhase
STEPS = [P.QUEUED, P.CONNECTING, P.SENDING_CONFIG, P.CREATING_TARGET, P.COPYING_MEMORY,
         P.HANDING_OVER_DISKS, P.BRINGING_ONLINE, P.ANNOUNCING, P.COMPLETED]
ENDS = [P.COMPLETED, P.FAILED, P.CANCELLED]


def rec(phase: MigrationPhase = P.QUEUED, *, committed_at: float | None = None,
        timeline: tuple[PhaseEvent, ...] = (),
        target_released_at: float | None = None) -> MigrationRecord:
    return MigrationRecord(id="m1", vm="vm1", source="node1", target="node2", phase=phase,
                           created_at=1.0, committed_at=committed_at, timeline=timeline,
                           target_released_at=target_released_at)


def progress(*, total: int, remaining: int) -> MigrationProgress:
    return MigrationProgress(at=1.0, status="active", elapsed_ms=10, ram_total=total,
                             ram_transferred=total - remaining, ram_remaining=remaining,
                             throughput_bps=1e9, dirty_rate_pps=100.0, page_size=4096,
                             expected_downtime_ms=30, iterations=1)


# --- phases --------------------------------------------------------------------------


def test_steps_number_the_seeds_seven_steps() -> None:
    assert [p.step for p in STEPS] == list(range(9))
    assert P.CONNECTING.step == 1
    assert P.ANNOUNCING.step == 7
    assert P.FAILED.step == 9
    assert P.CANCELLED.step == 9


def test_terminal_phases() -> None:
    assert {p for p in P if p.terminal} == set(ENDS)


def test_every_phase_is_either_a_step_or_an_end() -> None:
    assert set(STEPS) | set(ENDS) == set(P)


# --- advance -------------------------------------------------------------------------


def test_advance_through_every_step_records_the_timeline() -> None:
    r = rec()
    for i, phase in enumerate(STEPS[1:], start=1):
        r = r.advance(phase, at=float(i), node="node1", note=f"step {i}")
    assert r.phase is P.COMPLETED
    assert [e.phase for e in r.timeline] == STEPS[1:]
    assert [e.at for e in r.timeline] == [float(i) for i in range(1, 9)]
    assert r.timeline[0] == PhaseEvent(phase=P.CONNECTING, at=1.0, node="node1", note="step 1")
    assert r.finished_at == 8.0


def test_advance_returns_a_new_record_and_leaves_the_old_one() -> None:
    r = rec()
    r2 = r.advance(P.CONNECTING, at=2.0, node="node1")
    assert r.phase is P.QUEUED
    assert r.timeline == ()
    assert r2.phase is P.CONNECTING
    assert r2.finished_at is None


@pytest.mark.parametrize(("src", "dst"), [
    (a, b) for i, a in enumerate(STEPS[:-1]) for b in STEPS[i + 1:]
])
def test_forward_by_one_or_more_steps_is_allowed(src: MigrationPhase,
                                                 dst: MigrationPhase) -> None:
    assert allowed(src, dst, committed=False)
    assert rec(src).advance(dst, at=5.0, node="n").phase is dst


@pytest.mark.parametrize(("src", "dst"), [
    (a, b) for i, a in enumerate(STEPS[:-1]) for b in STEPS[: i + 1]
])
def test_backward_or_same_phase_is_a_conflict(src: MigrationPhase, dst: MigrationPhase) -> None:
    assert not allowed(src, dst, committed=False)
    with pytest.raises(Conflict, match=f"cannot go from {src.value} to {dst.value}"):
        rec(src).advance(dst, at=5.0, node="n")


@pytest.mark.parametrize("src", STEPS[:-1])
@pytest.mark.parametrize("end", [P.FAILED, P.CANCELLED])
def test_failed_or_cancelled_before_commit(src: MigrationPhase, end: MigrationPhase) -> None:
    r = rec(src).advance(end, at=9.0, node="node2", note="boom")
    assert r.phase is end
    assert r.finished_at == 9.0
    assert r.timeline[-1] == PhaseEvent(phase=end, at=9.0, node="node2", note="boom")


@pytest.mark.parametrize("src", [P.BRINGING_ONLINE, P.ANNOUNCING])
@pytest.mark.parametrize("end", [P.FAILED, P.CANCELLED])
def test_failed_or_cancelled_after_commit_is_a_conflict(src: MigrationPhase,
                                                        end: MigrationPhase) -> None:
    r = rec(src, committed_at=3.0)
    assert r.committed
    with pytest.raises(Conflict, match="m1"):
        r.advance(end, at=9.0, node="node2")


@pytest.mark.parametrize("src", [P.BRINGING_ONLINE, P.ANNOUNCING])
def test_committed_migration_still_moves_forward(src: MigrationPhase) -> None:
    r = rec(src, committed_at=3.0).advance(P.COMPLETED, at=4.0, node="node1")
    assert r.phase is P.COMPLETED
    assert r.finished_at == 4.0


@pytest.mark.parametrize("src", ENDS)
@pytest.mark.parametrize("dst", list(P))
def test_nothing_leaves_a_terminal_phase(src: MigrationPhase, dst: MigrationPhase) -> None:
    assert not allowed(src, dst, committed=False)
    assert not allowed(src, dst, committed=True)
    with pytest.raises(Conflict):
        rec(src).advance(dst, at=1.0, node="n")


def test_note_adds_a_timeline_entry_in_the_current_phase() -> None:
    r = rec(P.COPYING_MEMORY).note(at=3.0, node="node1", note="converging")
    assert r.phase is P.COPYING_MEMORY
    assert r.timeline == (PhaseEvent(phase=P.COPYING_MEMORY, at=3.0, node="node1",
                                     note="converging"),)
    assert r.finished_at is None


def test_committed_follows_committed_at() -> None:
    assert not rec().committed
    assert rec(committed_at=0.0).committed


# --- settled -------------------------------------------------------------------------


@pytest.mark.parametrize("phase", [p for p in P if not p.terminal])
def test_a_running_migration_is_not_settled(phase: MigrationPhase) -> None:
    assert not rec(phase, target_released_at=1.0).settled


def test_completed_is_settled() -> None:
    created = (PhaseEvent(P.CREATING_TARGET, 1.0, "node2"),)
    assert rec(P.COMPLETED, timeline=created).settled


@pytest.mark.parametrize("end", [P.FAILED, P.CANCELLED])
def test_failed_before_creating_the_target_is_settled(end: MigrationPhase) -> None:
    r = rec().advance(P.CONNECTING, at=1.0, node="node1").advance(end, at=2.0, node="node1")
    assert r.settled


@pytest.mark.parametrize("end", [P.FAILED, P.CANCELLED])
def test_failed_after_creating_the_target_settles_once_the_target_is_released(
    end: MigrationPhase,
) -> None:
    r = rec(P.SENDING_CONFIG).advance(P.CREATING_TARGET, at=1.0, node="node2")
    r = r.advance(end, at=2.0, node="node1")
    assert not r.settled
    released = dataclasses.replace(r, target_released_at=3.0)
    assert released.settled


# --- progress ------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "remaining", "percent"), [
    (1000, 1000, 0.0),
    (1000, 750, 25.0),
    (1000, 0, 100.0),
    (1000, 1500, 0.0),  # remaining above total (dirtied meanwhile): never negative
    (1000, -5, 100.0),  # never above 100
    (0, 0, 0.0),
    (-1, 0, 0.0),
])
def test_percent(total: int, remaining: int, percent: float) -> None:
    assert progress(total=total, remaining=remaining).percent == pytest.approx(percent)


def test_dirty_rate_in_bytes() -> None:
    assert progress(total=1, remaining=0).dirty_rate_bps == 100.0 * 4096

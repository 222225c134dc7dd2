"""LeaseGuard: the node's own view of its lease, on an injected clock."""

from __future__ import annotations

import pytest

from ferry.ha.lease import LeaseGuard, LeaseState
from ferry.store.memory import ManualClock

TTL = 4.0
MARGIN = 1.0
LEASE = 0x7E57


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=100.0)


@pytest.fixture
def guard(clock: ManualClock) -> LeaseGuard:
    return LeaseGuard(ttl=TTL, margin=MARGIN, clock=clock)


def granted(guard: LeaseGuard, clock: ManualClock) -> LeaseGuard:
    guard.granted(LEASE, sent_at=clock())
    return guard


@pytest.mark.parametrize("margin", [TTL, TTL + 1])
def test_a_margin_not_shorter_than_the_ttl_is_refused(margin: float) -> None:
    with pytest.raises(ValueError, match="margin"):
        LeaseGuard(ttl=TTL, margin=margin, clock=ManualClock())


def test_before_any_lease_nothing_is_valid(guard: LeaseGuard) -> None:
    assert guard.state is LeaseState.NONE
    assert not guard.valid()
    assert guard.remaining() == 0.0
    assert guard.state is LeaseState.NONE


def test_a_renewal_before_any_grant_changes_nothing(guard: LeaseGuard, clock: ManualClock
                                                    ) -> None:
    guard.renewed(sent_at=clock())
    assert guard.state is LeaseState.NONE
    assert not guard.valid()


def test_granted_is_valid_until_sent_plus_ttl_minus_margin(guard: LeaseGuard,
                                                           clock: ManualClock) -> None:
    sent = clock()
    clock.advance(0.3)  # the grant took a while to come back: the request time counts
    guard.granted(LEASE, sent_at=sent)
    assert guard.state is LeaseState.VALID
    assert guard.lease == LEASE
    assert guard.deadline == sent + TTL - MARGIN
    assert guard.valid()
    assert guard.remaining() == pytest.approx(TTL - MARGIN - 0.3)


def test_just_before_the_deadline_it_is_still_valid(guard: LeaseGuard, clock: ManualClock
                                                    ) -> None:
    granted(guard, clock)
    clock.advance(TTL - MARGIN - 0.01)
    assert guard.valid()
    assert guard.state is LeaseState.VALID


def test_at_the_deadline_the_lease_is_lost(guard: LeaseGuard, clock: ManualClock) -> None:
    granted(guard, clock)
    clock.advance(TTL - MARGIN)
    assert not guard.valid()
    assert guard.state is LeaseState.LOST
    assert guard.remaining() == 0.0


def test_a_renewal_moves_the_deadline_to_its_send_time(guard: LeaseGuard, clock: ManualClock
                                                       ) -> None:
    granted(guard, clock)
    clock.advance(2.0)
    sent = clock()
    clock.advance(0.5)
    guard.renewed(sent_at=sent)
    assert guard.deadline == sent + TTL - MARGIN
    clock.advance(TTL - MARGIN - 0.5 - 0.01)  # past the first deadline, before the new one
    assert guard.valid()
    clock.advance(0.01)
    assert not guard.valid()


def test_an_older_renewal_does_not_move_the_deadline_back(guard: LeaseGuard,
                                                          clock: ManualClock) -> None:
    granted(guard, clock)
    early = clock()
    clock.advance(2.0)
    guard.renewed(sent_at=clock())
    deadline = guard.deadline
    guard.renewed(sent_at=early + 1.0)  # a reply that overtook a later one
    assert guard.deadline == deadline


def test_successive_renewals_keep_it_valid(guard: LeaseGuard, clock: ManualClock) -> None:
    granted(guard, clock)
    for _ in range(10):
        clock.advance(TTL / 3)
        guard.renewed(sent_at=clock())
        assert guard.valid()
    assert guard.state is LeaseState.VALID


def test_a_late_renewal_after_lost_does_not_revive(guard: LeaseGuard, clock: ManualClock
                                                   ) -> None:
    granted(guard, clock)
    sent = clock() + 1.0  # sent before the deadline, answered after it was seen passed
    clock.advance(TTL)
    assert not guard.valid()
    deadline = guard.deadline
    guard.renewed(sent_at=sent)
    guard.renewed(sent_at=clock())
    assert guard.state is LeaseState.LOST
    assert guard.deadline == deadline
    assert not guard.valid()
    assert guard.remaining() == 0.0


def test_after_lost_only_a_new_grant_makes_it_valid(guard: LeaseGuard, clock: ManualClock
                                                    ) -> None:
    granted(guard, clock)
    clock.advance(TTL)
    assert not guard.valid()
    guard.granted(LEASE + 1, sent_at=clock())
    assert guard.state is LeaseState.VALID
    assert guard.lease == LEASE + 1
    assert guard.valid()
    assert guard.deadline == clock() + TTL - MARGIN


def test_a_second_grant_while_valid_takes_the_new_lease(guard: LeaseGuard, clock: ManualClock
                                                        ) -> None:
    granted(guard, clock)
    clock.advance(1.0)
    guard.granted(LEASE + 1, sent_at=clock())
    assert guard.state is LeaseState.VALID
    assert guard.lease == LEASE + 1
    assert guard.deadline == clock() + TTL - MARGIN


def test_remaining_counts_down_on_the_clock(guard: LeaseGuard, clock: ManualClock) -> None:
    granted(guard, clock)
    clock.advance(1.25)
    assert guard.remaining() == pytest.approx(TTL - MARGIN - 1.25)


def test_states_can_become_any_other_state_but_not_themselves() -> None:
    for a in LeaseState:
        for b in LeaseState:
            assert a.can_become(b) is (a is not b)


def test_a_renewal_sent_after_the_deadline_does_not_count() -> None:
    clock = ManualClock()
    guard = LeaseGuard(ttl=4, margin=1.0, clock=clock)
    guard.granted(7, sent_at=clock())
    clock.advance(3.5)  # past the deadline (3 s), not yet seen by valid()
    guard.renewed(sent_at=clock())
    assert not guard.valid()
    assert guard.state is LeaseState.LOST

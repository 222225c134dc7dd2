"""The agent drives a migration it is the source of only once the scheduler admitted it."""

from __future__ import annotations

from dataclasses import replace

from ferry.agent.reconcile import DriveSource, DriveTarget, ReportStatus, decide
from ferry.model.migration import MigrationPhase
from ferry.model.vm import VmState
from tests.unit.test_reconcile import HERE, OTHER, facts, local, record, running_status, snap


def test_a_queued_migration_not_yet_admitted_is_not_driven() -> None:
    rec = record(MigrationPhase.QUEUED, source=HERE, target=OTHER)
    plan = decide(snap({"vm1": facts(migration="m1", target=OTHER, status=running_status())},
                       local_={"vm1": local()}, migrations={"m1": rec}))
    assert plan.actions == ()
    assert "source of migration" not in plan.reason


def test_an_admitted_queued_migration_is_driven() -> None:
    rec = replace(record(MigrationPhase.QUEUED, source=HERE, target=OTHER), admitted_at=2.0)
    plan = decide(snap({"vm1": facts(migration="m1", target=OTHER)},
                       local_={"vm1": local()}, migrations={"m1": rec}))
    assert plan.actions == (DriveSource(vm="vm1", migration="m1"),)


def test_a_legacy_migration_past_queued_without_admitted_at_is_driven_to_its_end() -> None:
    # Requested and started before the scheduler existed: the agent finishes it.
    rec = record(MigrationPhase.COPYING_MEMORY, source=HERE, target=OTHER)
    assert rec.admitted_at is None
    plan = decide(snap({"vm1": facts(migration="m1", target=OTHER)},
                       local_={"vm1": local()}, migrations={"m1": rec}))
    assert plan.actions == (DriveSource(vm="vm1", migration="m1"),)


def test_a_vm_waiting_in_the_queue_is_still_looked_after() -> None:
    """Not driven means not busy either: its state is still reported as usual."""
    rec = record(MigrationPhase.QUEUED, source=HERE, target=OTHER)
    plan = decide(snap({"vm1": facts(migration="m1", target=OTHER)},
                       local_={"vm1": local(run_state="paused")}, migrations={"m1": rec}))
    (action,) = plan.actions
    assert isinstance(action, ReportStatus)
    assert action.status is not None and action.status.state is VmState.PAUSED


def test_the_target_does_nothing_for_a_queued_migration() -> None:
    for admitted in (None, 2.0):
        rec = replace(record(MigrationPhase.QUEUED, source=OTHER, target=HERE),
                      admitted_at=admitted)
        plan = decide(snap({"vm1": facts(node=OTHER, migration="m1", target=HERE)},
                           migrations={"m1": rec}))
        assert not any(isinstance(a, (DriveSource, DriveTarget)) for a in plan.actions)

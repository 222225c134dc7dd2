"""The agent's pure decision: one snapshot -> a plan (actions and the reason logged)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import pytest

from ferry.agent.reconcile import (
    DriveSource,
    DriveTarget,
    KillVm,
    LocalFacts,
    LocalRole,
    Plan,
    ReleaseVm,
    ReportStatus,
    Snapshot,
    StartVm,
    StopVm,
    VmFacts,
    decide,
    observed_state,
)
from ferry.model.migration import MigrationPhase, MigrationRecord
from ferry.model.vm import DiskSpec, NicSpec, Owner, Power, VmSpec, VmState, VmStatus

HERE = "node1"
OTHER = "node2"
THIRD = "node3"


def spec(name: str = "vm1") -> VmSpec:
    return VmSpec(
        name=name, uid="0123456789ab", memory_mib=256, vcpus=1, volume="shared0",
        config_path=f"/vol/vms/{name}/vm.json",
        disks=(DiskSpec(path=f"/vol/vms/{name}/disk0.qcow2", size_bytes=1 << 30),),
        nics=(NicSpec(mac="52:54:00:01:23:45"),),
    )


def facts(
    name: str = "vm1",
    *,
    node: str | None = HERE,
    power: Power = Power.ON,
    rev: int = 42,
    status: VmStatus | None = None,
    force: bool = False,
    migration: str | None = None,
    target: str | None = None,
) -> VmFacts:
    owner = Owner(node=node, power=power, force=force, migration=migration, target=target)
    return VmFacts(spec=spec(name), owner=owner, owner_rev=rev, status=status)


def local(
    *,
    role: LocalRole = LocalRole.PRIMARY,
    run_state: str = "running",
    token: int = 42,
    migration: str | None = None,
    pid: int = 4242,
    since: float = 100.0,
) -> LocalFacts:
    return LocalFacts(role=role, run_state=run_state, token=token, migration=migration, pid=pid,
                      since=since)


def record(
    phase: MigrationPhase,
    *,
    mid: str = "m1",
    vm: str = "vm1",
    source: str = OTHER,
    target: str = HERE,
) -> MigrationRecord:
    return MigrationRecord(id=mid, vm=vm, source=source, target=target, phase=phase,
                           created_at=1.0)


def snap(
    vms: Mapping[str, VmFacts] | None = None,
    *,
    local_: Mapping[str, LocalFacts] | None = None,
    migrations: Mapping[str, MigrationRecord] | None = None,
    busy: frozenset[str] = frozenset(),
    held: frozenset[str] = frozenset(),
) -> Snapshot:
    return Snapshot(node=HERE, vms=vms or {}, migrations=migrations or {},
                    local=local_ or {}, busy=busy, held=held)


def running_status(*, node: str = HERE, token: int = 42, pid: int = 4242) -> VmStatus:
    return VmStatus(node=node, state=VmState.RUNNING, token=token, pid=pid, since=100.0)


# --- starting and stopping -----------------------------------------------------------


def test_owned_powered_on_without_qemu_is_started_with_the_owner_revision() -> None:
    plan = decide(snap({"vm1": facts(rev=77)}))
    assert plan.actions == (StartVm(vm="vm1", token=77),)
    assert "vm1" in plan.reason
    assert "starting" in plan.reason


def test_held_vm_is_not_started_and_the_reason_says_it_waits() -> None:
    plan = decide(snap({"vm1": facts()}, held=frozenset({"vm1"})))
    assert plan.actions == ()
    assert "vm1" in plan.reason
    assert "waiting" in plan.reason


def test_held_only_affects_the_named_vm() -> None:
    plan = decide(snap({"vm1": facts(rev=5), "vm2": facts("vm2", rev=6)},
                       held=frozenset({"vm1"})))
    assert plan.actions == (StartVm(vm="vm2", token=6),)


@pytest.mark.parametrize("force", [False, True])
def test_power_off_with_local_qemu_stops_it_carrying_force(force: bool) -> None:
    plan = decide(snap({"vm1": facts(power=Power.OFF, force=force)}, local_={"vm1": local()}))
    assert plan.actions == (StopVm(vm="vm1", force=force),)
    assert "vm1" in plan.reason
    assert "stopping" in plan.reason


def test_power_off_without_local_qemu_releases_the_vm() -> None:
    plan = decide(snap({"vm1": facts(power=Power.OFF)}))
    assert plan.actions == (ReleaseVm(vm="vm1", owner_rev=facts().owner_rev),)
    assert "releasing" in plan.reason


def test_a_vm_powered_off_during_a_migration_is_not_released() -> None:
    plan = decide(snap({"vm1": facts(power=Power.OFF, migration="m1", target=OTHER)}))
    assert not any(isinstance(a, ReleaseVm) for a in plan.actions)


def test_vm_owned_by_nobody_is_not_started() -> None:
    plan = decide(snap({"vm1": facts(node=None, power=Power.OFF)}))
    assert plan.actions == ()


def test_vm_owned_elsewhere_and_not_local_is_left_alone() -> None:
    plan = decide(snap({"vm1": facts(node=OTHER)}))
    assert plan.actions == ()


# --- killing what must not run here --------------------------------------------------


def test_local_qemu_of_a_vm_owned_by_another_node_is_killed() -> None:
    plan = decide(snap({"vm1": facts(node=OTHER)}, local_={"vm1": local()}))
    assert plan.actions == (KillVm(vm="vm1", why=f"owned by {OTHER}"),)
    assert "vm1" in plan.reason
    assert "killing" in plan.reason


def test_local_qemu_of_an_unowned_vm_is_killed() -> None:
    plan = decide(snap({"vm1": facts(node=None, power=Power.OFF)}, local_={"vm1": local()}))
    (action,) = plan.actions
    assert isinstance(action, KillVm)
    assert action.vm == "vm1"
    assert "killing" in plan.reason


def test_local_qemu_of_a_vm_without_owner_record_is_killed() -> None:
    f = VmFacts(spec=spec(), owner=None, owner_rev=0, status=None)
    plan = decide(snap({"vm1": f}, local_={"vm1": local()}))
    assert plan.actions == (KillVm(vm="vm1", why="owned by nobody"),)


def test_vm_without_owner_record_is_not_started() -> None:
    f = VmFacts(spec=spec(), owner=None, owner_rev=0, status=running_status())
    plan = decide(snap({"vm1": f}))
    assert plan.actions == (ReportStatus(vm="vm1", status=None),)


@pytest.mark.parametrize("phase", [p for p in MigrationPhase if not p.terminal])
def test_incoming_qemu_of_an_ongoing_migration_to_here_is_left_alone(
    phase: MigrationPhase,
) -> None:
    plan = decide(snap(
        {"vm1": facts(node=OTHER, migration="m1", target=HERE)},
        local_={"vm1": local(role=LocalRole.INCOMING, run_state="inmigrate", migration="m1")},
        migrations={"m1": record(phase)},
    ))
    target_steps = MigrationPhase.CREATING_TARGET.step <= phase.step
    driving = target_steps and phase.step < MigrationPhase.ANNOUNCING.step
    assert plan.actions == ((DriveTarget(vm="vm1", migration="m1"),) if driving else ())


@pytest.mark.parametrize("phase", [
    MigrationPhase.COMPLETED, MigrationPhase.FAILED, MigrationPhase.CANCELLED,
])
def test_incoming_qemu_of_a_terminal_migration_is_killed(phase: MigrationPhase) -> None:
    plan = decide(snap(
        {"vm1": facts(node=OTHER)},
        local_={"vm1": local(role=LocalRole.INCOMING, run_state="inmigrate", migration="m1")},
        migrations={"m1": record(phase)},
    ))
    assert plan.actions == (KillVm(vm="vm1", why=f"owned by {OTHER}"),)


def test_incoming_qemu_of_a_migration_to_another_node_is_killed() -> None:
    plan = decide(snap(
        {"vm1": facts(node=OTHER)},
        local_={"vm1": local(role=LocalRole.INCOMING, migration="m1")},
        migrations={"m1": record(MigrationPhase.COPYING_MEMORY, target=THIRD)},
    ))
    assert plan.actions == (KillVm(vm="vm1", why=f"owned by {OTHER}"),)


def test_incoming_qemu_of_an_unknown_migration_is_killed() -> None:
    plan = decide(snap(
        {"vm1": facts(node=OTHER)},
        local_={"vm1": local(role=LocalRole.INCOMING, migration="gone")},
    ))
    assert plan.actions == (KillVm(vm="vm1", why=f"owned by {OTHER}"),)


def test_primary_qemu_is_killed_even_during_a_migration_to_here() -> None:
    """Only an INCOMING QEMU is protected by an ongoing migration, not a stray primary."""
    plan = decide(snap(
        {"vm1": facts(node=OTHER, migration="m1", target=HERE)},
        local_={"vm1": local(role=LocalRole.PRIMARY, migration="m1")},
        migrations={"m1": record(MigrationPhase.ANNOUNCING)},
    ))
    assert KillVm(vm="vm1", why=f"owned by {OTHER}") in plan.actions


def test_vm_deleted_from_the_store_but_running_here_is_killed() -> None:
    plan = decide(snap({}, local_={"ghost": local()}))
    assert plan.actions == (KillVm(vm="ghost", why="VM no longer exists"),)
    assert "ghost" in plan.reason
    assert "deleted" in plan.reason


# --- status --------------------------------------------------------------------------


def test_status_is_reported_when_none_is_stored() -> None:
    plan = decide(snap({"vm1": facts(status=None)}, local_={"vm1": local(token=42, pid=7)}))
    assert plan.actions == (ReportStatus(vm="vm1", status=VmStatus(
        node=HERE, state=VmState.RUNNING, token=42, pid=7, since=100.0)),)
    assert "vm1" in plan.reason
    assert "reporting running" in plan.reason


@pytest.mark.parametrize("stored", [
    running_status(node=OTHER),
    running_status(token=41),
    running_status(pid=1),
    VmStatus(node=HERE, state=VmState.PAUSED, token=42, pid=4242, since=100.0),
])
def test_status_is_reported_when_the_stored_one_differs(stored: VmStatus) -> None:
    plan = decide(snap({"vm1": facts(status=stored)}, local_={"vm1": local()}))
    assert len(plan.actions) == 1
    action = plan.actions[0]
    assert isinstance(action, ReportStatus)
    assert action.status == VmStatus(node=HERE, state=VmState.RUNNING, token=42, pid=4242,
                                     since=100.0)


def test_status_equal_to_the_stored_one_is_not_reported() -> None:
    plan = decide(snap({"vm1": facts(status=running_status())}, local_={"vm1": local()}))
    assert plan.actions == ()
    assert plan.reason == "in sync (1 VMs owned here, 1 QEMUs)"


def test_status_differing_only_in_detail_or_since_is_not_rewritten() -> None:
    stored = VmStatus(node=HERE, state=VmState.RUNNING, token=42, pid=4242, since=5.0,
                      detail="booted")
    plan = decide(snap({"vm1": facts(status=stored)}, local_={"vm1": local(since=99.0)}))
    assert plan.actions == ()


def test_paused_qemu_is_reported_paused() -> None:
    plan = decide(snap({"vm1": facts()}, local_={"vm1": local(run_state="paused")}))
    (action,) = plan.actions
    assert isinstance(action, ReportStatus) and action.status is not None
    assert action.status.state is VmState.PAUSED
    assert "reporting paused" in plan.reason


@pytest.mark.parametrize(("run_state", "state"), [
    ("running", VmState.RUNNING),
    ("paused", VmState.PAUSED),
    ("inmigrate", VmState.PAUSED),
    ("postmigrate", VmState.PAUSED),
    ("shutdown", VmState.STOPPING),
    ("guest-panicked", VmState.FAILED),
    ("internal-error", VmState.FAILED),
])
def test_observed_state(run_state: str, state: VmState) -> None:
    assert observed_state(run_state) is state


def test_stale_status_of_this_node_is_cleared_when_not_owned_here() -> None:
    plan = decide(snap({"vm1": facts(node=OTHER, status=running_status(node=HERE))}))
    assert plan.actions == (ReportStatus(vm="vm1", status=None),)
    assert "vm1" in plan.reason
    assert "clearing" in plan.reason


def test_stale_status_of_this_node_goes_with_the_release() -> None:
    plan = decide(snap({"vm1": facts(power=Power.OFF, status=running_status())}))
    assert plan.actions == (ReleaseVm(vm="vm1", owner_rev=facts().owner_rev),)


def test_another_nodes_status_is_never_cleared() -> None:
    for f in (facts(node=OTHER, status=running_status(node=OTHER)),
              facts(node=None, power=Power.OFF, status=running_status(node=OTHER))):
        plan = decide(snap({"vm1": f}))
        assert plan.actions == (), f


# --- migrations ----------------------------------------------------------------------


@pytest.mark.parametrize("phase", [p for p in MigrationPhase if not p.terminal])
def test_source_drives_every_non_terminal_phase(phase: MigrationPhase) -> None:
    rec = replace(record(phase, source=HERE, target=OTHER), admitted_at=1.5)
    plan = decide(snap({"vm1": facts(migration="m1", target=OTHER)},
                       local_={"vm1": local()}, migrations={"m1": rec}))
    assert plan.actions == (DriveSource(vm="vm1", migration="m1"),)
    assert f"vm1: source of migration m1 ({phase.value})" in plan.reason


@pytest.mark.parametrize("phase", [p for p in MigrationPhase if p.terminal])
def test_nobody_drives_a_terminal_migration(phase: MigrationPhase) -> None:
    for source, target in ((HERE, OTHER), (OTHER, HERE)):
        rec = record(phase, source=source, target=target)
        plan = decide(snap({"vm1": facts(node=source, status=running_status(node=source))},
                           migrations={"m1": rec}))
        assert not any(isinstance(a, (DriveSource, DriveTarget)) for a in plan.actions)


@pytest.mark.parametrize(("phase", "drives"), [
    (MigrationPhase.QUEUED, False),
    (MigrationPhase.CONNECTING, False),
    (MigrationPhase.SENDING_CONFIG, False),
    (MigrationPhase.CREATING_TARGET, True),
    (MigrationPhase.COPYING_MEMORY, True),
    (MigrationPhase.HANDING_OVER_DISKS, True),
    (MigrationPhase.BRINGING_ONLINE, True),
    (MigrationPhase.ANNOUNCING, False),
])
def test_target_drives_from_creating_target_until_announcing(
    phase: MigrationPhase, drives: bool
) -> None:
    rec = record(phase, source=OTHER, target=HERE)
    plan = decide(snap({"vm1": facts(node=OTHER, migration="m1", target=HERE)},
                       migrations={"m1": rec}))
    drive = DriveTarget(vm="vm1", migration="m1")
    assert (drive in plan.actions) is drives
    if drives:
        assert plan.actions == (drive,)
        assert f"vm1: target of migration m1 ({phase.value})" in plan.reason


def test_a_migration_between_two_other_nodes_is_not_driven_here() -> None:
    rec = record(MigrationPhase.COPYING_MEMORY, source=OTHER, target=THIRD)
    plan = decide(snap({"vm1": facts(node=OTHER)}, migrations={"m1": rec}))
    assert plan.actions == ()


def test_busy_vm_gets_no_migration_action() -> None:
    rec = record(MigrationPhase.COPYING_MEMORY, source=HERE, target=OTHER)
    plan = decide(snap({"vm1": facts(migration="m1", target=OTHER)}, local_={"vm1": local()},
                       migrations={"m1": rec}, busy=frozenset({"vm1"})))
    assert plan.actions == ()


def test_busy_vm_is_skipped_entirely() -> None:
    # It would be started, stopped, killed or reported otherwise.
    cases = [
        snap({"vm1": facts()}, busy=frozenset({"vm1"})),
        snap({"vm1": facts(power=Power.OFF)}, local_={"vm1": local()}, busy=frozenset({"vm1"})),
        snap({"vm1": facts(node=OTHER)}, local_={"vm1": local()}, busy=frozenset({"vm1"})),
        snap({}, local_={"vm1": local()}, busy=frozenset({"vm1"})),
        snap({"vm1": facts()}, local_={"vm1": local()}, busy=frozenset({"vm1"})),
    ]
    for case in cases:
        assert decide(case).actions == ()


def test_a_driven_vm_gets_no_other_action() -> None:
    """While this node drives the migration, it does not also report or stop the VM."""
    rec = record(MigrationPhase.COPYING_MEMORY, source=HERE, target=OTHER)
    plan = decide(snap({"vm1": facts(power=Power.OFF, migration="m1", target=OTHER)},
                       local_={"vm1": local()}, migrations={"m1": rec}))
    assert plan.actions == (DriveSource(vm="vm1", migration="m1"),)


def test_migrations_and_vms_are_handled_together_in_name_order() -> None:
    vms = {
        "a": facts("a", rev=3),
        "b": facts("b", power=Power.OFF),
        "c": facts("c", node=OTHER, migration="m9", target=HERE),
    }
    plan = decide(snap(
        vms,
        local_={"b": local(), "z": local()},
        migrations={"m9": record(MigrationPhase.COPYING_MEMORY, mid="m9", vm="c")},
    ))
    assert plan.actions == (
        DriveTarget(vm="c", migration="m9"),
        StartVm(vm="a", token=3),
        StopVm(vm="b", force=False),
        KillVm(vm="z", why="VM no longer exists"),
    )
    parts = plan.reason.split("; ")
    assert parts == [
        "c: target of migration m9 (copying-memory)",
        "a: owned here and should run: starting",
        "b: power off requested: stopping",
        "z: deleted: killing its QEMU",
    ]


def test_in_sync_reason_counts_vms_owned_here_and_local_qemus() -> None:
    plan = decide(snap(
        {"a": facts("a", status=running_status()), "b": facts("b", node=OTHER),
         "c": facts("c", node=None, power=Power.OFF)},
        local_={"a": local()},
    ))
    assert plan == Plan(actions=(), reason="in sync (1 VMs owned here, 1 QEMUs)")


def test_empty_snapshot_is_in_sync() -> None:
    assert decide(snap()) == Plan(actions=(), reason="in sync (0 VMs owned here, 0 QEMUs)")

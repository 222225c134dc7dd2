"""The agent's pure decision, HA rules: arming, the HA marker, the lease, fencing tokens."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import pytest

from ferry.agent.reconcile import (
    Action,
    ArmHa,
    DriveTarget,
    KillVm,
    LocalFacts,
    LocalRole,
    Plan,
    ReportStatus,
    SetMarker,
    Snapshot,
    StartVm,
    StopVm,
    VmFacts,
    decide,
)
from ferry.model.ha import HaPolicy, StartAction
from ferry.model.migration import MigrationPhase, MigrationRecord
from ferry.model.vm import DiskSpec, NicSpec, Owner, Power, VmSpec, VmState, VmStatus

HERE = "node1"
OTHER = "node2"


def spec(name: str = "vm1", *, ha: bool = True) -> VmSpec:
    return VmSpec(
        name=name, uid="0123456789ab", memory_mib=256, vcpus=1, volume="shared0",
        config_path=f"/vol/vms/{name}/vm.json",
        disks=(DiskSpec(path=f"/vol/vms/{name}/disk0.qcow2", size_bytes=1 << 30),),
        nics=(NicSpec(mac="52:54:00:01:23:45"),),
        ha=HaPolicy() if ha else None,
        start_action=StartAction.NONE if ha else StartAction.START,
    )


def facts(name: str = "vm1", *, ha: bool = True, armed: bool = False, node: str | None = HERE,
          power: Power = Power.ON, rev: int = 42, granted: int = 0,
          migration: str | None = None, target: str | None = None,
          status: VmStatus | None = None) -> VmFacts:
    owner = Owner(node=node, power=power, ha=armed, granted=granted, migration=migration,
                  target=target)
    return VmFacts(spec=spec(name, ha=ha), owner=owner, owner_rev=rev, status=status)


def local(*, role: LocalRole = LocalRole.PRIMARY, token: int = 42, marker: bool = False,
          migration: str | None = None, run_state: str = "running") -> LocalFacts:
    return LocalFacts(role=role, run_state=run_state, token=token, migration=migration,
                      pid=4242, since=100.0, ha=marker)


def status(*, token: int = 42) -> VmStatus:
    return VmStatus(node=HERE, state=VmState.RUNNING, token=token, pid=4242, since=100.0)


def record(phase: MigrationPhase, *, mid: str = "m1", source: str = OTHER, target: str = HERE,
           committed: bool = False) -> MigrationRecord:
    rec = MigrationRecord(id=mid, vm="vm1", source=source, target=target, phase=phase,
                          created_at=1.0)
    return replace(rec, committed_at=5.0) if committed else rec


def snap(vms: Mapping[str, VmFacts], *, local_: Mapping[str, LocalFacts] | None = None,
         migrations: Mapping[str, MigrationRecord] | None = None,
         lease_valid: bool = True) -> Snapshot:
    return Snapshot(node=HERE, vms=vms, migrations=migrations or {}, local=local_ or {},
                    lease_valid=lease_valid)


def kinds(plan: Plan) -> list[type[Action]]:
    return [type(a) for a in plan.actions]


# --- arming ---------------------------------------------------------------------------


def test_an_ha_vm_is_armed_before_it_starts() -> None:
    plan = decide(snap({"vm1": facts(rev=77)}))
    assert plan.actions == (ArmHa(vm="vm1", owner_rev=77, on=True),)
    assert "arming HA" in plan.reason


def test_an_armed_ha_vm_starts() -> None:
    plan = decide(snap({"vm1": facts(armed=True, rev=80, granted=77)}))
    assert plan.actions == (StartVm(vm="vm1", token=77),)


def test_a_running_vm_that_became_ha_is_armed() -> None:
    plan = decide(snap({"vm1": facts(status=status())}, local_={"vm1": local()}))
    assert plan.actions == (ArmHa(vm="vm1", owner_rev=42, on=True),)


def test_an_ha_vm_owned_elsewhere_is_not_armed_here() -> None:
    plan = decide(snap({"vm1": facts(node=OTHER)}))
    assert plan.actions == ()


def test_no_arming_during_a_migration() -> None:
    f = facts(migration="m1", target=OTHER, status=status())
    plan = decide(snap({"vm1": f}, local_={"vm1": local()}))
    assert ArmHa not in kinds(plan)
    assert plan.actions == ()


def test_no_disarming_during_a_migration() -> None:
    f = facts(ha=False, armed=True, migration="m1", target=OTHER, status=status())
    plan = decide(snap({"vm1": f}, local_={"vm1": local(marker=True)}))
    assert ArmHa not in kinds(plan)


def test_disarmed_when_the_spec_is_no_longer_ha() -> None:
    f = facts(ha=False, armed=True, status=status())
    plan = decide(snap({"vm1": f}, local_={"vm1": local(marker=True)}))
    assert plan.actions == (ArmHa(vm="vm1", owner_rev=42, on=False),)
    assert "disarming HA" in plan.reason


def test_disarming_needs_no_valid_lease() -> None:
    f = facts(ha=False, armed=True, status=status())
    plan = decide(snap({"vm1": f}, local_={"vm1": local(marker=True)}, lease_valid=False))
    assert plan.actions == (ArmHa(vm="vm1", owner_rev=42, on=False),)


def test_no_arming_without_a_valid_lease() -> None:
    plan = decide(snap({"vm1": facts()}, lease_valid=False))
    assert plan.actions == ()
    assert "lease" in plan.reason


def test_arming_of_a_powered_off_vm_is_not_followed_by_a_start() -> None:
    plan = decide(snap({"vm1": facts(power=Power.OFF)}))
    assert StartVm not in kinds(plan)


def test_a_plain_vm_is_never_armed() -> None:
    plan = decide(snap({"vm1": facts(ha=False)}))
    assert plan.actions == (StartVm(vm="vm1", token=42),)


# --- the HA marker ----------------------------------------------------------------------


def test_the_marker_is_set_on_an_armed_vms_qemu() -> None:
    f = facts(armed=True, status=status())
    plan = decide(snap({"vm1": f}, local_={"vm1": local(marker=False)}))
    assert plan.actions == (SetMarker(vm="vm1", on=True),)
    assert "marker" in plan.reason


def test_the_marker_is_cleared_on_a_disarmed_vms_qemu() -> None:
    f = facts(ha=False, armed=False, status=status())
    plan = decide(snap({"vm1": f}, local_={"vm1": local(marker=True)}))
    assert plan.actions == (SetMarker(vm="vm1", on=False),)


def test_a_marker_in_sync_needs_nothing() -> None:
    f = facts(armed=True, status=status())
    plan = decide(snap({"vm1": f}, local_={"vm1": local(marker=True)}))
    assert plan.actions == ()


def test_the_marker_follows_the_record_during_a_migration() -> None:
    f = facts(armed=True, migration="m1", target=OTHER, status=status())
    plan = decide(snap({"vm1": f}, local_={"vm1": local(marker=False)}))
    assert plan.actions == (SetMarker(vm="vm1", on=True),)


def test_a_powered_off_armed_vm_still_gets_its_marker_before_it_stops() -> None:
    f = facts(armed=True, power=Power.OFF, status=status())
    plan = decide(snap({"vm1": f}, local_={"vm1": local(marker=False)}))
    assert plan.actions == (SetMarker(vm="vm1", on=True),)
    f_synced = decide(snap({"vm1": f}, local_={"vm1": local(marker=True)}))
    assert f_synced.actions == (StopVm(vm="vm1", force=False),)


# --- the lease ------------------------------------------------------------------------


@pytest.mark.parametrize("ha", [True, False])
def test_nothing_starts_without_a_valid_lease(ha: bool) -> None:
    plan = decide(snap({"vm1": facts(ha=ha, armed=ha)}, lease_valid=False))
    assert StartVm not in kinds(plan)
    assert plan.actions == ()
    assert "lease is not valid" in plan.reason


def test_a_running_vm_is_still_reported_without_a_valid_lease() -> None:
    plan = decide(snap({"vm1": facts(armed=True)}, local_={"vm1": local(marker=True)},
                       lease_valid=False))
    assert kinds(plan) == [ReportStatus]


def test_a_stop_still_happens_without_a_valid_lease() -> None:
    f = facts(armed=True, power=Power.OFF, status=status())
    plan = decide(snap({"vm1": f}, local_={"vm1": local(marker=True)}, lease_valid=False))
    assert plan.actions == (StopVm(vm="vm1", force=False),)


# --- fencing tokens ----------------------------------------------------------------------


def test_a_primary_copy_from_an_older_grant_is_killed() -> None:
    # The manager gave the VM to another node and back: a new grant, a new token.
    f = facts(armed=True, rev=90)
    plan = decide(snap({"vm1": f}, local_={"vm1": local(token=42, marker=True)}))
    (kill,) = plan.actions
    assert isinstance(kill, KillVm)
    assert kill.vm == "vm1"
    assert "42" in kill.why and "90" in kill.why
    assert "stale" in plan.reason


def test_a_primary_copy_under_the_carried_token_is_kept() -> None:
    # Arming, stopping, migration flags: the record changed, the grant did not.
    f = facts(armed=True, rev=90, granted=42, status=status(token=42))
    plan = decide(snap({"vm1": f}, local_={"vm1": local(token=42, marker=True)}))
    assert plan.actions == ()


def test_a_primary_copy_from_a_newer_token_than_the_record_is_killed() -> None:
    f = facts(armed=True, rev=90, granted=42)
    plan = decide(snap({"vm1": f}, local_={"vm1": local(token=50, marker=True)}))
    assert kinds(plan) == [KillVm]


def test_a_stale_copy_is_killed_before_anything_else() -> None:
    # Unarmed, powered off and stale: the kill comes first, alone.
    f = facts(power=Power.OFF, rev=90)
    plan = decide(snap({"vm1": f}, local_={"vm1": local(token=42)}))
    assert kinds(plan) == [KillVm]


# --- incoming copies on the owning node ---------------------------------------------------


def test_an_incoming_copy_of_a_failed_migration_is_killed_once_the_vm_is_owned_here() -> None:
    # The source died mid-migration; the manager recovered the VM onto this node, which
    # was the migration's target: the waiting incoming QEMU is not the VM.
    f = facts(armed=True, rev=90)
    plan = decide(snap(
        {"vm1": f},
        local_={"vm1": local(role=LocalRole.INCOMING, migration="m1", token=0,
                             run_state="inmigrate")},
        migrations={"m1": record(MigrationPhase.FAILED)}))
    assert kinds(plan) == [KillVm]


def test_an_incoming_copy_of_an_unknown_migration_on_the_owner_is_killed() -> None:
    f = facts(armed=True)
    plan = decide(snap({"vm1": f}, local_={
        "vm1": local(role=LocalRole.INCOMING, migration="gone", run_state="inmigrate")}))
    assert kinds(plan) == [KillVm]


def test_an_incoming_copy_without_a_migration_on_the_owner_is_killed() -> None:
    f = facts(armed=True)
    plan = decide(snap({"vm1": f}, local_={
        "vm1": local(role=LocalRole.INCOMING, migration=None, run_state="inmigrate")}))
    assert kinds(plan) == [KillVm]


def test_an_incoming_copy_of_another_migration_than_the_owners_is_killed() -> None:
    f = facts(armed=True, migration="m2", target=OTHER)
    plan = decide(snap(
        {"vm1": f},
        local_={"vm1": local(role=LocalRole.INCOMING, migration="m1",
                             run_state="inmigrate")},
        migrations={"m1": record(MigrationPhase.ANNOUNCING, committed=True)}))
    assert kinds(plan) == [KillVm]


def test_an_uncommitted_incoming_copy_of_a_live_migration_is_killed_if_owned_here() -> None:
    # Owned here with no migration in the record, and its migration never committed.
    f = facts(armed=True)
    plan = decide(snap(
        {"vm1": f},
        local_={"vm1": local(role=LocalRole.INCOMING, migration="m1",
                             run_state="inmigrate")},
        migrations={"m1": record(MigrationPhase.ANNOUNCING)}))
    assert kinds(plan) == [KillVm]


@pytest.mark.parametrize("phase", [MigrationPhase.ANNOUNCING, MigrationPhase.COMPLETED])
def test_a_committed_incoming_copy_is_not_killed(phase: MigrationPhase) -> None:
    # The target committed ownership: its QEMU is the VM, being promoted.
    f = facts(armed=True, rev=90)
    plan = decide(snap(
        {"vm1": f},
        local_={"vm1": local(role=LocalRole.INCOMING, migration="m1", token=0,
                             marker=True)},
        migrations={"m1": record(phase, committed=True)}))
    assert KillVm not in kinds(plan)


def test_a_committed_incoming_copy_gets_no_marker_action() -> None:
    f = facts(armed=True, status=status(token=0))
    plan = decide(snap(
        {"vm1": f},
        local_={"vm1": local(role=LocalRole.INCOMING, migration="m1", token=0)},
        migrations={"m1": record(MigrationPhase.ANNOUNCING, committed=True)}))
    assert SetMarker not in kinds(plan)
    assert KillVm not in kinds(plan)


def test_the_target_of_an_ongoing_migration_is_driven_not_killed() -> None:
    f = facts(node=OTHER, armed=True, migration="m1", target=HERE)
    plan = decide(snap(
        {"vm1": f},
        local_={"vm1": local(role=LocalRole.INCOMING, migration="m1",
                             run_state="inmigrate")},
        migrations={"m1": record(MigrationPhase.COPYING_MEMORY)}))
    assert plan.actions == (DriveTarget(vm="vm1", migration="m1"),)

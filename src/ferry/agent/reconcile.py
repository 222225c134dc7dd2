"""Pure: one snapshot of the store and of this node -> what to do, and why.

The agent's loop is level-triggered (Patroni's ``_run_cycle``): it takes a snapshot, calls
``decide``, carries out the actions and logs the reason. Nothing here does I/O, so every rule
is unit-tested with plain data.

The rules that keep a VM from running twice:
- a node starts a VM only when the store names it the owner, the power is on and its own
  lease is valid (a node past its lease deadline has fenced itself);
- a node kills any local QEMU whose VM it does not own, unless that QEMU is the target of a
  migration to this node that is still going on; and any QEMU started under an older
  fencing token than the owner record's;
- an HA VM is armed (its QEMU carries the HA marker that the watchdog and self-fencing act
  on) before the owner record says so, and before it starts: the manager restarts elsewhere
  only VMs whose record says armed.

A migration's source drives it only once the cluster manager has admitted it
(``migration/scheduler.py``); until then the VM is handled like any other.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from ferry.model.migration import MigrationPhase, MigrationRecord
from ferry.model.vm import Owner, Power, VmSpec, VmState, VmStatus


class LocalRole(enum.Enum):
    PRIMARY = "primary"
    INCOMING = "incoming"


@dataclass(frozen=True)
class VmFacts:
    spec: VmSpec
    owner: Owner | None
    owner_rev: int
    status: VmStatus | None


@dataclass(frozen=True)
class LocalFacts:
    role: LocalRole
    run_state: str  # QEMU's run state: running, paused, inmigrate, postmigrate, ...
    token: int
    migration: str | None
    pid: int
    since: float = 0.0
    ha: bool = False  # the HA marker is set


@dataclass(frozen=True)
class Snapshot:
    node: str
    vms: Mapping[str, VmFacts]
    migrations: Mapping[str, MigrationRecord]
    local: Mapping[str, LocalFacts]
    busy: frozenset[str] = frozenset()  # VMs with an operation in flight on this node
    held: frozenset[str] = frozenset()  # VMs whose start failed recently (back off)
    lease_valid: bool = True


@dataclass(frozen=True)
class StartVm:
    vm: str
    token: int


@dataclass(frozen=True)
class StopVm:
    vm: str
    force: bool


@dataclass(frozen=True)
class KillVm:
    vm: str
    why: str


@dataclass(frozen=True)
class ReportStatus:
    vm: str
    status: VmStatus | None  # None: remove this node's status


@dataclass(frozen=True)
class DriveSource:
    vm: str
    migration: str


@dataclass(frozen=True)
class DriveTarget:
    vm: str
    migration: str


@dataclass(frozen=True)
class ArmHa:
    """Set (``on``) or clear the VM's HA protection: marker first, then the owner record
    when arming; the record first, then the marker when disarming."""

    vm: str
    owner_rev: int
    on: bool


@dataclass(frozen=True)
class ReleaseVm:
    """The VM is off and its QEMU gone: give the owner record back (node None), so that the
    cluster may start it anywhere. Until then it counts as still stopping here."""

    vm: str
    owner_rev: int


@dataclass(frozen=True)
class SetMarker:
    vm: str
    on: bool


Action = (StartVm | StopVm | KillVm | ReportStatus | DriveSource | DriveTarget | ArmHa
          | SetMarker | ReleaseVm)


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    reason: str


def observed_state(run_state: str) -> VmState:
    if run_state == "running":
        return VmState.RUNNING
    if run_state in ("shutdown", "guest-panicked", "internal-error"):
        return VmState.STOPPING if run_state == "shutdown" else VmState.FAILED
    return VmState.PAUSED


def decide(snap: Snapshot) -> Plan:
    actions: list[Action] = []
    notes: list[str] = []
    for mid, rec in sorted(snap.migrations.items()):
        act = _migration_action(snap, mid, rec)
        if act is not None:
            actions.append(act)
            notes.append(f"{rec.vm}: {'source' if isinstance(act, DriveSource) else 'target'}"
                         f" of migration {mid} ({rec.phase.value})")
    driven = {a.vm for a in actions}
    for name in sorted(set(snap.vms) | set(snap.local)):
        if name in snap.busy or name in driven:
            continue
        todo, note = _vm_action(snap, name)
        actions.extend(todo)
        if note:
            notes.append(f"{name}: {note}")
    if not notes:
        in_sync = sum(1 for v in snap.vms.values() if v.owner and v.owner.node == snap.node)
        notes.append(f"in sync ({in_sync} VMs owned here, {len(snap.local)} QEMUs)")
    return Plan(actions=tuple(actions), reason="; ".join(notes))


def _migration_action(snap: Snapshot, mid: str, rec: MigrationRecord) -> Action | None:
    if rec.phase.terminal or rec.vm in snap.busy:
        return None
    if rec.source == snap.node:
        # Queued migrations wait for the cluster manager's scheduler to admit them (limits
        # per node and cluster); one past QUEUED was admitted, or started before there
        # was a scheduler, and is driven to its end.
        if rec.phase is MigrationPhase.QUEUED and rec.admitted_at is None:
            return None
        return DriveSource(vm=rec.vm, migration=mid)
    # The target's part ends once the VM runs there (ANNOUNCING); the source finishes.
    if rec.target == snap.node and (
        MigrationPhase.CREATING_TARGET.step <= rec.phase.step < MigrationPhase.ANNOUNCING.step
    ):
        return DriveTarget(vm=rec.vm, migration=mid)
    return None


def _vm_action(snap: Snapshot, name: str) -> tuple[list[Action], str]:
    facts = snap.vms.get(name)
    local = snap.local.get(name)
    if facts is None:
        return [KillVm(vm=name, why="VM no longer exists")], "deleted: killing its QEMU"
    owner = facts.owner
    mine = owner is not None and owner.node == snap.node
    if local is not None and not mine:
        if _incoming_in_flight(snap, name, local):
            return [], ""
        holder = owner.node if owner is not None and owner.node else "nobody"
        return [KillVm(vm=name, why=f"owned by {holder}")], (
            "runs here but is not owned here: killing it"
        )
    if not mine or owner is None:
        return _drop_stale_status(snap, facts)
    token = owner.token(facts.owner_rev)
    if local is not None and _stale(snap, owner, local, token):
        return [KillVm(vm=name, why=f"started under token {local.token}, owner token is"
                       f" {token}")], "stale copy: killing it"
    arm = _arming(snap, facts, local)
    if arm is not None:
        return [arm[0]], arm[1]
    if owner.power is Power.OFF:
        if local is not None:
            return [StopVm(vm=name, force=owner.force)], "power off requested: stopping"
        if owner.migration is None:
            return [ReleaseVm(vm=name, owner_rev=facts.owner_rev)], "stopped: releasing it"
        return _drop_stale_status(snap, facts)
    if local is None:
        if not snap.lease_valid:
            return [], "should run, but this node's lease is not valid: not starting"
        if name in snap.held:
            return [], "start failed recently: waiting before the next try"
        return [StartVm(vm=name, token=token)], "owned here and should run: starting"
    want = VmStatus(node=snap.node, state=observed_state(local.run_state),
                    token=local.token, pid=local.pid, since=local.since)
    have = facts.status
    if have is None or (have.node, have.state, have.pid, have.token) != (
        want.node, want.state, want.pid, want.token
    ):
        return [ReportStatus(vm=name, status=want)], f"reporting {want.state.value}"
    return [], ""


def _stale(snap: Snapshot, owner: Owner, local: LocalFacts, token: int) -> bool:
    """A local QEMU that is not the owner's current copy although the owner is this node:
    a leftover target of a migration that did not commit, or a copy from an older grant."""
    if local.role is LocalRole.INCOMING:
        if owner.migration is not None:
            return owner.migration != local.migration
        rec = snap.migrations.get(local.migration) if local.migration else None
        return rec is None or not rec.committed  # committed: it is the VM, being promoted
    return local.token != token


def _arming(snap: Snapshot, facts: VmFacts, local: LocalFacts | None
            ) -> tuple[Action, str] | None:
    owner = facts.owner
    assert owner is not None
    want = facts.spec.ha is not None
    if owner.migration is None and want != owner.ha and (snap.lease_valid or not want):
        # Not during a migration: arming changes the owner record, which the migration's
        # commit is guarded by.
        return (ArmHa(vm=facts.spec.name, owner_rev=facts.owner_rev, on=want),
                "arming HA" if want else "disarming HA")
    if local is not None and local.role is LocalRole.PRIMARY and local.ha != owner.ha:
        return SetMarker(vm=facts.spec.name, on=owner.ha), "syncing the HA marker"
    return None


def _incoming_in_flight(snap: Snapshot, name: str, local: LocalFacts) -> bool:
    if local.role is not LocalRole.INCOMING or local.migration is None:
        return False
    rec = snap.migrations.get(local.migration)
    return rec is not None and rec.target == snap.node and not rec.phase.terminal


def _drop_stale_status(snap: Snapshot, facts: VmFacts) -> tuple[list[Action], str]:
    if facts.status is not None and facts.status.node == snap.node:
        return [ReportStatus(vm=facts.spec.name, status=None)], "clearing this node's old status"
    return [], ""

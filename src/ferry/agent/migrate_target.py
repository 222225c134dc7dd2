"""The target side of a live migration: steps 3 (create), 6 (bring online), 7 (announce).

The target commits the migration: once QEMU has received the whole VM (it waits paused,
started with ``-S``), one transaction moves ownership here, guarded by the owner record's
revision and by the absence of a cancel request. Only then does the VM resume here. If that
transaction fails, the VM never ran here and the source resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from ferry.agent.context import AgentContext
from ferry.agent.postcopy import await_switch, follow_target
from ferry.agent.runtime import LocalVm, Role
from ferry.migration.policy import effective_policy, setup
from ferry.model import codec
from ferry.model.errors import FerryError, QemuError
from ferry.model.migration import MigrationPhase as P
from ferry.model.migration import MigrationRecord
from ferry.model.vm import Owner, Power, VmState, VmStatus
from ferry.qemu.argv import Hardware
from ferry.store.base import Compare, Put

log = logging.getLogger(__name__)

# Announce at once after the switchover: QEMU's default first announce comes 50 ms late,
# and until it does the switch keeps sending the VM's traffic to the source.
ANNOUNCE = {"announce-initial": 1, "announce-max": 100, "announce-rounds": 5,
            "announce-step": 20}
INCOMING_POLL_S = 0.25


class TargetGaveUp(FerryError):
    pass


@dataclasses.dataclass(frozen=True)
class Received:
    at: float  # when the stream completed, or when the source switched to post-copy
    postcopy: bool  # the source moved ownership here and switched to post-copy


async def drive_target(ctx: AgentContext, mid: str) -> None:
    rec, _ = await ctx.read_record(mid)
    local = ctx.runtime.vms.get(rec.vm)
    owner_key = ctx.keys.vm_owner(rec.vm)
    try:
        entry = await ctx.store.get(owner_key)
        owner = codec.decode(Owner, entry.value) if entry else None
        completed_at = time.time()
        if owner is None or owner.node != ctx.node:  # not committed yet
            got = await _take_over(ctx, rec, local, entry_rev=entry.mod_revision if entry else 0,
                                   owner=owner)
            if got is None:
                return
            local, token, completed_at, postcopy = got
        else:
            token = owner.token(entry.mod_revision) if entry else 0
            postcopy = rec.postcopy_at is not None
        if postcopy:
            await _online_postcopy(ctx, mid, local, token=token, switched_at=completed_at)
        else:
            await _online(ctx, mid, local, token=token, completed_at=completed_at)
    except FerryError as err:
        if await _owned_here(ctx, rec.vm):
            log.error("migration %s: committed, but finishing failed: %s; the VM stays", mid, err)
            return
        reason = str(err)
        log.warning("migration %s: target gives up: %s", mid, reason)
        with contextlib.suppress(FerryError):
            await ctx.update_record(mid, lambda r: r if r.committed else
                                    dataclasses.replace(r, target_error=reason))
        await _release(ctx, mid, ctx.runtime.vms.get(rec.vm))


async def _take_over(ctx: AgentContext, rec: MigrationRecord, local: LocalVm | None, *,
                     entry_rev: int, owner: Owner | None
                     ) -> tuple[LocalVm, int, float, bool] | None:
    """Steps 3 to the commit: create the target, receive the VM, commit (or find that the
    source committed it here, switching to post-copy). Returns the QEMU, the token, when it
    was received or switched, and whether in post-copy; None, and the target QEMU gone, if
    the migration ended without this node."""
    mid = rec.id
    owner_key = ctx.keys.vm_owner(rec.vm)
    if rec.phase.terminal or rec.target_error or owner is None or owner.migration != mid:
        await _release(ctx, mid, local)
        return None
    if local is None:
        if rec.target_uri:
            raise TargetGaveUp("the target QEMU is gone")
        local = await _create(ctx, rec, ha=owner.ha)
    received = await _receive(ctx, mid, local)
    if received is None:
        await _release(ctx, mid, local)
        return None
    postcopy = received.postcopy
    token = None if postcopy else await _commit(ctx, mid, owner_key=owner_key,
                                                owner_rev=entry_rev, ha=owner.ha)
    if token is None:
        # The source may have committed it here itself, switching to post-copy.
        token, postcopy = await _owner_token(ctx, owner_key), True
    if token is None:
        await _release(ctx, mid, local)
        return None
    return local, token, received.at, postcopy


async def _create(ctx: AgentContext, rec: MigrationRecord, *, ha: bool) -> LocalVm:
    """Step 3: an empty VM with identical devices, waiting for the stream."""
    if rec.config is None:
        raise TargetGaveUp("the source sent no configuration")
    address = ctx.migration_address(rec.network)
    if address is None:
        raise TargetGaveUp(f"{ctx.node} has no address on network {rec.network}")
    hw = Hardware(accel=rec.config.accel, cpu_model=rec.config.cpu_model)
    # Armed from the start if the VM is: after the commit it is this node's to guard.
    local = await ctx.runtime.start(rec.config.spec, hw=hw, token=0, role=Role.INCOMING,
                                    migration=rec.id, ha=ha)
    mon = local.monitor
    # Post-copy needs its capability on both sides before the stream starts; the source
    # wrote the policy in force into the record with the configuration.
    policy = effective_policy(rec.options, None, None)
    postcopy = setup(policy, rec.config.spec.memory_mib * 2**20).postcopy
    await mon.set_capabilities({"events": True, "postcopy-ram": postcopy,
                                "postcopy-blocktime": postcopy})
    await mon.set_parameters(ANNOUNCE)
    await mon.migrate_incoming(f"tcp:{address}:0")
    port = await mon.incoming_port()
    uri = f"tcp:{address}:{port}"
    await ctx.update_record(rec.id, lambda r: dataclasses.replace(r.note(
        at=time.time(), node=ctx.node, note=f"target QEMU pid {local.proc.pid} listens at {uri}"),
        target_uri=uri))
    return local


async def _receive(ctx: AgentContext, mid: str, local: LocalVm) -> Received | None:
    """Wait until QEMU has the whole VM, or the source switched to post-copy (it committed
    the migration to this node), or the migration ended without us."""
    with local.monitor.events("MIGRATION") as events:
        while True:
            with contextlib.suppress(QemuError):
                ev = await events.get(timeout=INCOMING_POLL_S)
                if ev.status == "completed":
                    return Received(at=ev.timestamp, postcopy=False)
            rec = ctx.view.migration(mid)
            if rec is not None and rec.postcopy_at is not None:
                return Received(at=rec.postcopy_at, postcopy=True)
            if rec is None or rec.phase.terminal or ctx.view.cancel_requested(mid):
                return None
            if local.exited.is_set():
                raise TargetGaveUp("the target QEMU exited during the transfer")
            with contextlib.suppress(QemuError):
                info = await local.monitor.query_migrate()
                log.debug("migration %s: target sees %s, run state %s", mid, info.status,
                          local.run_state)
                if info.status == "completed":
                    return Received(at=time.time(), postcopy=False)


async def _commit(ctx: AgentContext, mid: str, *, owner_key: str, owner_rev: int,
                  ha: bool) -> int | None:
    """The point of no return: ownership moves here in one transaction, guarded by the
    owner record's revision (a failed or ended migration changes it) and by the absence of
    a cancel request. It is prepared in advance so that the VM's pause is one round trip
    longer than QEMU's own switchover, no more. Returns the new token, or None."""
    res = await ctx.store.txn(
        [Compare.unchanged(owner_key, owner_rev), Compare.absent(ctx.keys.migration_cancel(mid))],
        [Put(owner_key, codec.encode(Owner(node=ctx.node, power=Power.ON, ha=ha)))],
    )
    return res.revision if res.succeeded else None


async def _owner_token(ctx: AgentContext, owner_key: str) -> int | None:
    """This node's fencing token, if the owner record names it."""
    entry = await ctx.store.get(owner_key)
    owner = codec.decode(Owner, entry.value) if entry is not None else None
    if entry is None or owner is None or owner.node != ctx.node:
        return None
    return owner.token(entry.mod_revision)


async def _resume(local: LocalVm) -> float | None:
    """Step 6: run the VM here (it waited paused, started with -S); the RESUME time."""
    with local.monitor.events("RESUME") as resumes:
        try:
            await local.monitor.cont()
        except QemuError:
            if await local.monitor.run_state() == "running":
                return None  # resumed before an agent restart
            raise
        return (await resumes.get(timeout=10)).timestamp


async def _online(ctx: AgentContext, mid: str, local: LocalVm | None, *, token: int,
                  completed_at: float) -> None:
    """Steps 6 and 7 once committed: resume, announce, then record steps 5-7 in one write.

    Step 5 is recorded when the stream completed: the source had flushed and released the
    disks, and this QEMU takes them over as it resumes."""
    committed_at = time.time()
    if local is None:
        log.error("migration %s: committed but the target QEMU is gone", mid)
        return  # the owner record says run here: the loop starts the VM afresh
    resumed_at = await _resume(local)
    # QEMU announces by itself at completion (ANNOUNCE parameters above).

    def steps_5_to_7(rec: MigrationRecord) -> MigrationRecord:
        if rec.phase.step >= P.ANNOUNCING.step:
            return rec
        if rec.phase is P.COPYING_MEMORY:
            rec = rec.advance(P.HANDING_OVER_DISKS, at=completed_at, node=ctx.node,
                              note="stream complete: the source released the disks")
        if not rec.committed:
            rec = rec.advance(P.BRINGING_ONLINE, at=committed_at, node=ctx.node,
                              note="ownership moved to the target (point of no return)")
        rec = rec.advance(P.ANNOUNCING, at=time.time(), node=ctx.node,
                          note="running on the target; announced on the switch")
        return dataclasses.replace(rec, committed_at=rec.committed_at or committed_at,
                                   resumed_at=resumed_at or rec.resumed_at)

    rec = await ctx.update_record(mid, steps_5_to_7)
    await _promote(ctx, rec.vm, local, token=token)


async def _promote(ctx: AgentContext, vm: str, local: LocalVm, *, token: int) -> None:
    ctx.runtime.promote(local, token=token)
    local.run_state = await local.monitor.run_state()
    await ctx.report_status(vm, VmStatus(node=ctx.node, state=VmState.RUNNING, token=token,
                                         pid=local.proc.pid, since=local.meta.started_at))


async def _online_postcopy(ctx: AgentContext, mid: str, local: LocalVm | None, *, token: int,
                           switched_at: float) -> None:
    """Steps 5-7 when the source committed the VM here and switched to post-copy: resume as
    soon as the source has switched, then stay until every page has arrived; only then
    step 7, which tells the source it may quit its QEMU (the last pages may still be in
    flight when it says it is done)."""
    if local is None:
        log.error("migration %s: committed in post-copy but the target QEMU is gone", mid)
        return
    await await_switch(local)
    with local.monitor.events("MIGRATION") as events:
        # Watched from the switch on, beside the resume: the stream may break any time.
        follow = asyncio.create_task(follow_target(ctx, mid, local, events))
        try:
            await _resume_postcopy(ctx, mid, local, token=token, switched_at=switched_at)
            blocktime = await follow
        finally:
            follow.cancel()
    await ctx.update_record(mid, lambda r: r if r.phase.step >= P.ANNOUNCING.step else r.advance(
        P.ANNOUNCING, at=time.time(), node=ctx.node, note=(
            f"post-copy complete: every page is here (the guest's vCPUs waited {blocktime} ms"
            " for pages in all); announced on the switch")))


async def _resume_postcopy(ctx: AgentContext, mid: str, local: LocalVm, *, token: int,
                           switched_at: float) -> None:
    resumed_at = await _resume(local)
    now = time.time()

    def steps_5_and_6(rec: MigrationRecord) -> MigrationRecord:
        if rec.phase.step >= P.BRINGING_ONLINE.step:
            return rec
        if rec.phase is P.COPYING_MEMORY:
            rec = rec.advance(P.HANDING_OVER_DISKS, at=switched_at, node=ctx.node, note=(
                "post-copy: the source released the disks; memory follows on demand"))
        rec = rec.advance(P.BRINGING_ONLINE, at=now, node=ctx.node,
                          note="resumed here in post-copy: missing pages come from the source")
        return dataclasses.replace(rec, resumed_at=resumed_at or rec.resumed_at)

    rec = await ctx.update_record(mid, steps_5_and_6)
    await _promote(ctx, rec.vm, local, token=token)


async def _owned_here(ctx: AgentContext, vm: str) -> bool:
    try:
        entry = await ctx.store.get(ctx.keys.vm_owner(vm))
    except FerryError:
        return True  # cannot tell: never kill what might be the only running copy
    return entry is not None and codec.decode(Owner, entry.value).node == ctx.node


async def _release(ctx: AgentContext, mid: str, local: LocalVm | None) -> None:
    """Not committed: the target's QEMU must go; say so in the record."""
    if await _owned_here(ctx, local.name if local else ""):
        return
    if local is not None and local.meta.role is Role.INCOMING and local.meta.migration == mid:
        await ctx.runtime.kill(local)
    with contextlib.suppress(FerryError):
        await ctx.update_record(mid, lambda r: r if r.committed or r.target_released_at else
                                dataclasses.replace(r, target_released_at=time.time()))

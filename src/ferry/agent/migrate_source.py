"""The source side of a live migration: it drives the seed's seven steps.

Resumable: each run starts from the phase in the store, so an agent restarted mid-migration
picks up where it was (QEMU keeps migrating meanwhile). Until the target commits ownership,
every failure and every cancel ends with the VM running here and the target's QEMU gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from ferry.agent.context import AgentContext
from ferry.agent.networks import choose_migration_network
from ferry.agent.postcopy import resume_source
from ferry.agent.runtime import LocalVm
from ferry.agent.steering import (
    UNLIMITED_BANDWIDTH,
    Steering,
    capabilities,
    describe_setup,
    engine_now,
    parameters,
    policy_for,
)
from ferry.migration.policy import setup
from ferry.model.errors import FerryError, MigrationFailed, QemuError
from ferry.model.migration import (
    MigrationPhase as P,
)
from ferry.model.migration import (
    MigrationProgress,
    MigrationRecord,
    MigrationSummary,
    TargetConfig,
)
from ferry.qemu.monitor import OUTGOING_ACTIVE, MigrateInfo

log = logging.getLogger(__name__)

__all__ = ["UNLIMITED_BANDWIDTH", "drive_source"]
TARGET_CREATE_TIMEOUT_S = 60.0
COMMIT_TIMEOUT_S = 30.0
POLL_S = 0.05
PUBLISH_S = 0.2


class CancelRequested(FerryError):
    """A user asked to cancel this migration."""


async def drive_source(ctx: AgentContext, mid: str) -> None:
    rec, _ = await ctx.read_record(mid)
    if rec.phase.terminal:
        return
    local = ctx.runtime.vms.get(rec.vm)
    try:
        if local is None:
            raise MigrationFailed(rec.phase.value, f"{rec.vm} has no QEMU on {ctx.node}")
        if rec.phase.step < P.COPYING_MEMORY.step:
            rec = await _prepare(ctx, rec, local)
        copied: Copied | None = None
        if rec.phase is P.COPYING_MEMORY:
            copied = await _copy_memory(ctx, rec, local)
        if not rec.committed:
            await _await_commit(ctx, rec)
        await _finish(ctx, mid, local, copied)
    except CancelRequested:
        await _abort(ctx, mid, local, P.CANCELLED, "cancelled by request")
    except FerryError as err:
        reason = err.reason if isinstance(err, MigrationFailed) else str(err)
        await _abort(ctx, mid, local, P.FAILED, reason)


def _check_cancel(ctx: AgentContext, mid: str) -> None:
    if ctx.view.cancel_requested(mid):
        raise CancelRequested(mid)


async def _prepare(ctx: AgentContext, rec: MigrationRecord, local: LocalVm) -> MigrationRecord:
    """Steps 1-3. Steps 1 and 2 are decided here and written with step 3 in one update, so
    the target starts creating its QEMU one store round trip after the request."""
    mid = rec.id
    _check_cancel(ctx, mid)
    if rec.phase.step < P.CREATING_TARGET.step:
        network, address = _choose_network(ctx, rec)
        config = TargetConfig(spec=local.meta.spec, accel=local.meta.accel,
                              cpu_model=local.meta.cpu_model)
        # Resolved once and written with the configuration: the target sets up its side
        # (post-copy) from it, and a restarted agent goes on with the same policy.
        options = dataclasses.replace(rec.options, policy=policy_for(ctx, rec, local))

        def steps_1_to_3(r: MigrationRecord) -> MigrationRecord:
            now = time.time()
            if r.phase is P.QUEUED:
                r = r.advance(P.CONNECTING, at=now, node=ctx.node,
                              note=f"{r.target} is up on network {network} ({address})")
            if r.phase is P.CONNECTING:
                r = r.advance(P.SENDING_CONFIG, at=now, node=ctx.node,
                              note=f"{config.spec.memory_mib} MiB, {config.accel},"
                                   f" cpu {config.cpu_model}")
                r = dataclasses.replace(r, network=network, config=config, options=options)
            if r.phase is P.SENDING_CONFIG:
                r = r.advance(P.CREATING_TARGET, at=now, node=ctx.node,
                              note="target creates an empty VM")
            return r

        await ctx.update_record(mid, steps_1_to_3)
    rec = await _await_target(ctx, mid)
    policy = policy_for(ctx, rec, local)
    s = setup(policy, local.meta.spec.memory_mib * 2**20)
    info = await local.monitor.query_migrate()
    if info.outgoing not in OUTGOING_ACTIVE:
        # Capabilities cannot change once the migration runs: every escape the policy may
        # take later is enabled now.
        await local.monitor.set_capabilities(capabilities(s))
        await local.monitor.set_parameters(parameters(s))
        await local.monitor.migrate(rec.target_uri)
    return await ctx.advance(mid, P.COPYING_MEMORY,
                             f"sending to {rec.target_uri}; {describe_setup(policy, s)}")


def _choose_network(ctx: AgentContext, rec: MigrationRecord) -> tuple[str, str]:
    """Step 1: the target must be up, alike, and reachable on a migration network. Returns
    the network and, for the timeline, the target's address on it and why it was chosen."""
    target = ctx.view.node_info(rec.target)
    if target is None or not ctx.view.node_alive(rec.target):
        raise MigrationFailed(P.CONNECTING.value, f"target node {rec.target} is not up")
    if target.accel != ctx.hardware.accel:
        raise MigrationFailed(
            P.CONNECTING.value,
            f"{rec.target} uses {target.accel}, {ctx.node} uses {ctx.hardware.accel}")
    choice = choose_migration_network(ctx, rec)
    if choice.network is None:
        raise MigrationFailed(P.CONNECTING.value, choice.reason)
    return choice.network, f"{choice.address}; {choice.note}"


async def _await_target(ctx: AgentContext, mid: str) -> MigrationRecord:
    def ready() -> MigrationRecord | None:
        rec = ctx.view.migration(mid)
        if ctx.view.cancel_requested(mid) or rec is None:
            return rec
        if rec.target_uri or rec.target_error or rec.phase.terminal:
            return rec
        if not ctx.view.node_alive(rec.target):
            return rec
        return None

    rec = await ctx.view.wait_for(ready, timeout=TARGET_CREATE_TIMEOUT_S)
    _check_cancel(ctx, mid)
    if rec.target_error:
        raise MigrationFailed(P.CREATING_TARGET.value, f"target: {rec.target_error}")
    if not rec.target_uri:
        raise MigrationFailed(P.CREATING_TARGET.value, f"target node {rec.target} went down")
    return rec


@dataclasses.dataclass(frozen=True)
class Copied:
    """What the source's QEMU said when the copy completed (gone once it quits)."""

    info: MigrateInfo
    stopped_at: float | None


async def _copy_memory(ctx: AgentContext, rec: MigrationRecord, local: LocalVm) -> Copied:
    """Step 4. Writes nothing when it ends: the VM is paused until the target commits, and
    a write then would wake every agent and compete for the CPU and the store."""
    with local.monitor.events("STOP") as stops:
        info = await _follow(ctx, rec, local)
        stopped_at = None
        with contextlib.suppress(QemuError):
            stopped_at = (await stops.get(timeout=0.5)).timestamp
    return Copied(info=info, stopped_at=stopped_at)


async def _follow(ctx: AgentContext, rec: MigrationRecord, local: LocalVm) -> MigrateInfo:
    """Poll query-migrate until QEMU finishes: publish progress, let the policy steer at the
    start of each pass, honour cancel requests."""
    steer = await _steering(ctx, rec, local)
    published = 0.0
    uri = rec.target_uri
    with local.monitor.events("MIGRATION_PASS") as passes:
        while True:
            info = await local.monitor.query_migrate()
            now = time.time()
            if info.outgoing == "completed":
                return await local.monitor.completed_migrate_info()
            if info.outgoing not in OUTGOING_ACTIVE:
                raise MigrationFailed(P.COPYING_MEMORY.value, info.error or
                                      f"QEMU reports the migration {info.outgoing}")
            if info.outgoing == "postcopy-paused":
                uri = await resume_source(ctx, rec, local, uri)
            elif not (info.outgoing.startswith("postcopy") or steer.engine.postcopy):
                # Past the switch to post-copy this QEMU holds pages the VM needs: it is
                # never cancelled then (the commit refused any cancel requested earlier).
                await _check_still_wanted(ctx, rec, local)
            sample = _progress(info, now)
            await steer.observe(sample, now)
            if now - published >= PUBLISH_S:
                await ctx.publish_progress(rec.id, sample)
                published = now
            # Sampled right after each dirty-bitmap sync, what is left is what the guest
            # dirtied during the last pass: the policy's measure of the dirty rate.
            with contextlib.suppress(QemuError):
                await passes.get(timeout=POLL_S)


async def _check_still_wanted(ctx: AgentContext, rec: MigrationRecord, local: LocalVm) -> None:
    if ctx.view.cancel_requested(rec.id):
        await local.monitor.migrate_cancel()
        raise CancelRequested(rec.id)
    if not ctx.view.node_alive(rec.target):
        await local.monitor.migrate_cancel()
        raise MigrationFailed(P.COPYING_MEMORY.value, f"target node {rec.target} went down")


async def _steering(ctx: AgentContext, rec: MigrationRecord, local: LocalVm) -> Steering:
    policy = policy_for(ctx, rec, local)
    s = setup(policy, local.meta.spec.memory_mib * 2**20)
    # The budget counts from the start of the copy, also for an agent restarted mid-copy.
    started = next((e.at for e in rec.timeline if e.phase is P.COPYING_MEMORY), time.time())
    info = await local.monitor.query_migrate()
    engine = await engine_now(local.monitor, s, info, time.time() - started,
                              postcopy=rec.postcopy_at is not None)
    return Steering(ctx, rec, local, policy, engine, started_at=started)


def _progress(info: MigrateInfo, now: float) -> MigrationProgress:
    return MigrationProgress(
        at=now, status=info.outgoing, elapsed_ms=info.total_time_ms, ram_total=info.ram_total,
        ram_transferred=info.ram_transferred, ram_remaining=info.ram_remaining,
        throughput_bps=info.ram_mbps * 1e6 / 8, dirty_rate_pps=info.dirty_pages_rate,
        page_size=info.page_size, expected_downtime_ms=info.expected_downtime_ms,
        iterations=info.dirty_sync_count, throttle_pct=info.throttle_pct,
    )


async def _await_commit(ctx: AgentContext, rec: MigrationRecord) -> None:
    """Step 5 is done here; the target now commits ownership and brings the VM online."""
    mid = rec.id

    def settled() -> str | None:
        owner, _ = ctx.view.owner(rec.vm)
        if owner is not None and owner.node == rec.target:
            return "committed"
        r = ctx.view.migration(mid)
        if ctx.view.cancel_requested(mid):
            return "cancel"
        if r is None or r.target_error or r.phase.terminal:
            return "target-failed"
        if not ctx.view.node_alive(rec.target):
            return "target-down"
        return None

    outcome = await ctx.view.wait_for(settled, timeout=COMMIT_TIMEOUT_S)
    if outcome == "cancel":
        raise CancelRequested(mid)
    if outcome != "committed":
        r = ctx.view.migration(mid)
        why = r.target_error if r and r.target_error else outcome
        raise MigrationFailed(P.HANDING_OVER_DISKS.value, f"target did not take over: {why}")


async def _finish(ctx: AgentContext, mid: str, local: LocalVm | None,
                  copied: Copied | None) -> None:
    """After the commit: quit the paused source copy, then write the summary (one write).
    In post-copy the target needs this QEMU until it has every page, which is later than
    this QEMU says it is done: quit only once the target says so (step 7)."""
    postcopy = (await ctx.read_record(mid))[0].postcopy_at is not None
    if postcopy:
        await _await_announced(ctx, mid, patient=True)
    if local is not None and ctx.runtime.vms.get(local.name) is local:
        await ctx.runtime.kill(local)
    if not postcopy:
        await _await_announced(ctx, mid, patient=False)

    def complete(rec: MigrationRecord) -> MigrationRecord:
        if rec.phase.terminal:
            return rec
        now = time.time()
        summary = rec.summary or MigrationSummary(0.0, 0, 0, None, 0, 0, 0.0)
        stopped_at = rec.stopped_at
        if copied is not None:
            info = copied.info
            stopped_at = copied.stopped_at
            summary = MigrationSummary(
                total_s=0.0, qemu_total_ms=info.total_time_ms, downtime_ms=info.downtime_ms,
                switchover_ms=None, bytes_sent=info.ram_transferred,
                setup_ms=info.setup_time_ms, throughput_bps=info.ram_mbps * 1e6 / 8)
            rec = rec.note(at=now, node=ctx.node, note=(
                f"memory copied: {info.ram_transferred / 2**20:.0f} MiB in"
                f" {info.total_time_ms} ms, QEMU downtime {info.downtime_ms} ms"))
        switchover = None
        if stopped_at is not None and rec.resumed_at is not None:
            switchover = (rec.resumed_at - stopped_at) * 1000
        summary = dataclasses.replace(summary, total_s=now - rec.created_at,
                                      switchover_ms=switchover)
        rec = rec.advance(P.COMPLETED, at=now, node=ctx.node, note="source QEMU has quit")
        return dataclasses.replace(rec, summary=summary, stopped_at=stopped_at)

    await ctx.update_record(mid, complete)
    if copied is not None:
        await ctx.publish_progress(mid, _progress(copied.info, time.time()))


async def _await_announced(ctx: AgentContext, mid: str, *, patient: bool) -> None:
    def announced() -> MigrationRecord | None:
        r = ctx.view.migration(mid)
        return r if r is not None and (r.phase.step >= P.ANNOUNCING.step) else None

    while True:
        try:
            await ctx.view.wait_for(announced, timeout=COMMIT_TIMEOUT_S)
            return
        except FerryError:
            if not patient:
                return
            log.warning("migration %s: post-copy: waiting for the target to have every page",
                        mid)


async def _abort(ctx: AgentContext, mid: str, local: LocalVm | None, phase: P, reason: str) -> None:
    """Before the commit: make the VM run here again and end the migration."""
    log.warning("migration %s: %s: %s", mid, phase.value, reason)
    if local is not None and ctx.runtime.vms.get(local.name) is local:
        with contextlib.suppress(QemuError):
            info = await local.monitor.query_migrate()
            if info.outgoing in OUTGOING_ACTIVE:
                await local.monitor.migrate_cancel()
                await _wait_settled(local)
    ended = await ctx.end_migration(mid, phase, reason)
    if not ended:
        log.info("migration %s: the target committed first; finishing instead", mid)
        await _finish(ctx, mid, local, None)
        return
    if local is not None and ctx.runtime.vms.get(local.name) is local:
        with contextlib.suppress(QemuError):
            if await local.monitor.run_state() in ("postmigrate", "paused", "finish-migrate"):
                await local.monitor.cont()
                log.info("migration %s: %s resumed on the source", mid, local.name)


async def _wait_settled(local: LocalVm) -> None:
    for _ in range(200):
        info = await local.monitor.query_migrate()
        if info.outgoing not in OUTGOING_ACTIVE:
            return
        await asyncio.sleep(0.025)

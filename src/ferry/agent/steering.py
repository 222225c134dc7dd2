"""The source's side of the convergence policy: which policy applies, how QEMU is set up for
it, and carrying out its steps (the decisions themselves are pure: ferry.migration.policy).

Every step the policy takes goes into the migration's timeline with its reason and figures,
so that `ferry migration show` says why a migration was throttled, paused or given up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from ferry.agent.context import AgentContext
from ferry.agent.postcopy import start_postcopy
from ferry.agent.runtime import LocalVm
from ferry.migration.convergence import (
    Continue,
    Engine,
    GiveUp,
    MiB,
    PauseAndFinish,
    SetDowntime,
    Setup,
    StartPostcopy,
    Step,
    Throttle,
    describe,
)
from ferry.migration.policy import decide, effective_policy
from ferry.model import codec
from ferry.model.cluster import ClusterConfig
from ferry.model.errors import InvalidSpec, MigrationFailed
from ferry.model.migration import MigrationPhase as P
from ferry.model.migration import MigrationProgress, MigrationRecord
from ferry.model.policy import MigrationPolicy
from ferry.qemu.monitor import MigrateInfo, Monitor

log = logging.getLogger(__name__)

UNLIMITED_BANDWIDTH = 64 * 1024**3  # bytes/s: QEMU's default of 128 MiB/s is the bottleneck
DECIDE_S = 1.0  # between passes, ask the policy this often (time limits act mid-pass)
KEEP_PASSES = 200  # pass samples kept for the policy (it looks at the last few)
# Auto-converge must be switched on before the migration starts, but throttling is the
# policy's to decide: until it asks, QEMU's own trigger only fires when the guest dirties
# more than is sent (threshold 100 %), and then throttles by 1 %.
INERT_THROTTLE: Mapping[str, int | bool] = {
    "throttle-trigger-threshold": 100, "cpu-throttle-initial": 1,
    "cpu-throttle-increment": 1, "max-cpu-throttle": 1, "cpu-throttle-tailslow": False}


def policy_for(ctx: AgentContext, rec: MigrationRecord, local: LocalVm) -> MigrationPolicy:
    """The migration's policy, else the VM's, else the cluster's."""
    spec = ctx.view.spec(rec.vm) or local.meta.spec
    return effective_policy(rec.options, spec.migration_policy, _cluster_policy(ctx))


def _cluster_policy(ctx: AgentContext) -> MigrationPolicy | None:
    entry = ctx.view.entries.get(ctx.keys.cluster_config)
    if entry is None:
        return None
    try:
        return codec.decode(ClusterConfig, entry.value).migration_policy
    except InvalidSpec as err:
        log.error("cluster configuration unreadable, using the default policy: %s", err)
        return None


def capabilities(s: Setup) -> dict[str, bool]:
    """Every capability a policy may use, on or off: a QEMU that migrated before keeps its
    old ones otherwise."""
    return {"events": True, "auto-converge": s.auto_converge, "postcopy-ram": s.postcopy,
            "xbzrle": s.xbzrle_cache > 0}


def parameters(s: Setup) -> dict[str, int | bool]:
    params: dict[str, int | bool] = {
        "max-bandwidth": s.engine.max_bandwidth or UNLIMITED_BANDWIDTH,
        "downtime-limit": s.engine.downtime_limit_ms,
        **throttle_parameters(s.qemu_throttle)}
    if s.postcopy:  # the background copy in post-copy, under the same cap
        params["max-postcopy-bandwidth"] = s.engine.max_bandwidth
    if s.xbzrle_cache:
        params["xbzrle-cache-size"] = s.xbzrle_cache
    return params


def throttle_parameters(t: Throttle | None) -> dict[str, int | bool]:
    if t is None:
        return dict(INERT_THROTTLE)
    return {"throttle-trigger-threshold": 50, "cpu-throttle-initial": t.initial_pct or t.max_pct,
            "cpu-throttle-increment": t.increment_pct or t.max_pct,
            "max-cpu-throttle": t.max_pct, "cpu-throttle-tailslow": False}


def describe_setup(policy: MigrationPolicy, s: Setup) -> str:
    """The policy in force, for the timeline."""
    bw = s.engine.max_bandwidth
    escapes = [name for name, on in (("throttle", policy.allow_throttle),
                                     ("post-copy", policy.allow_postcopy),
                                     ("pause", policy.allow_pause)) if on]
    return (f"policy {policy.kind.value}: max downtime {policy.max_downtime_ms} ms, budget"
            f" {policy.budget_s:g} s, may {', '.join(escapes) or 'not escape'}; starts at"
            f" downtime {s.engine.downtime_limit_ms} ms,"
            f" bandwidth {f'{bw / 2**20:.0f} MiB/s' if bw else 'unlimited'}")


async def engine_now(monitor: Monitor, s: Setup, info: MigrateInfo, elapsed_s: float, *,
                     postcopy: bool) -> Engine:
    """The engine as QEMU has it: right after ``migrate`` that is the setup; after an agent
    restart mid-copy it is whatever the policy had set, which is then watched for a while
    before it is judged."""
    params = await monitor.query_parameters()
    throttling = params.throttle_trigger_threshold < INERT_THROTTLE["throttle-trigger-threshold"]
    fresh = info.dirty_sync_count <= 1
    return Engine(
        downtime_limit_ms=params.downtime_limit_ms, max_bandwidth=s.engine.max_bandwidth,
        throttle_pct=params.max_cpu_throttle if throttling else 0,
        postcopy=postcopy or info.outgoing.startswith("postcopy"),
        paused=await monitor.run_state() == "paused",
        changed_pass=info.dirty_sync_count, changed_s=elapsed_s, steps=0 if fresh else 1)


class Steering:
    """Feeds the policy QEMU's samples, one per pass, and carries out its steps."""

    def __init__(self, ctx: AgentContext, rec: MigrationRecord, local: LocalVm,
                 policy: MigrationPolicy, engine: Engine, *, started_at: float) -> None:
        self.ctx, self.mid, self.local = ctx, rec.id, local
        self.policy, self.engine = policy, engine
        self.started_at = started_at  # when the copy started (host clock)
        self.passes: list[MigrationProgress] = []
        self.decided_at = 0.0
        self.noted_topic = ""

    async def observe(self, sample: MigrationProgress, now: float) -> None:
        """Ask the policy at the start of each pass, and every DECIDE_S in between."""
        new_pass = not self.passes or sample.iterations > self.passes[-1].iterations
        if new_pass:
            self.passes = [*self.passes[-KEEP_PASSES:], sample]
        elif now - self.decided_at < DECIDE_S:
            return
        self.decided_at = now
        history = self.passes if new_pass else [*self.passes, sample]
        elapsed = now - self.started_at
        step = decide(self.policy, history, self.engine, elapsed)
        done = await self.apply(step)
        self.engine = self.engine.after(done, pass_=sample.iterations, elapsed_s=elapsed)

    async def apply(self, step: Step) -> Step:
        """Carry out ``step``; returns what was done (a switch to post-copy may not be)."""
        mon = self.local.monitor
        if isinstance(step, GiveUp):
            raise MigrationFailed(P.COPYING_MEMORY.value, describe(step))
        if isinstance(step, StartPostcopy):
            return await self._postcopy(step)
        if isinstance(step, Continue):
            if step.quiet or step.topic == self.noted_topic:
                return step
            self.noted_topic = step.topic
        elif isinstance(step, SetDowntime):
            await mon.set_parameters({"downtime-limit": step.downtime_ms})
        elif isinstance(step, Throttle):
            await mon.set_parameters(throttle_parameters(step))
        elif isinstance(step, PauseAndFinish):
            await mon.stop()  # from here the guest dirties nothing: QEMU sends the rest
            await mon.set_parameters({"downtime-limit": step.downtime_ms})
        self.noted_topic = "" if not isinstance(step, Continue) else self.noted_topic
        await self.note(describe(step))
        return step

    async def _postcopy(self, step: StartPostcopy) -> Step:
        est = step.estimate
        left = f"{est.remaining / MiB:.0f} MiB left" if est is not None else "the rest"
        log.info("migration %s: %s", self.mid, describe(step))
        why_not = await start_postcopy(self.ctx, self.mid, self.local,
                                       decision=describe(step), left=left)
        if why_not is None:
            return step
        # Not committed (a cancel came first, or the migration ended): pre-copy goes on and
        # the driver's loop sees why.
        return Continue(f"post-copy not started: {why_not}", est, topic="no-postcopy")

    async def note(self, text: str) -> None:
        log.info("migration %s: %s", self.mid, text)
        node = self.ctx.node
        await self.ctx.update_record(
            self.mid, lambda r: r if r.phase.terminal else r.note(at=time.time(), node=node,
                                                                  note=text))

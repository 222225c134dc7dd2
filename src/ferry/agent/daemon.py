"""The node agent's main loop: register the node, follow the store, reconcile, act.

One cycle = one snapshot, one pure ``decide``, its actions, one logged reason. Operations
that take time (starting, stopping, migrating) run as tasks, one per VM; the VM counts as
busy while its task runs, so the next cycle leaves it alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Coroutine
from typing import Any

from ferry.agent import reconcile as rc
from ferry.agent.config import AgentConfig, resolve_accel
from ferry.agent.context import AgentContext
from ferry.agent.membership import Membership
from ferry.agent.migrate_source import drive_source
from ferry.agent.migrate_target import drive_target
from ferry.agent.networks import NetworkPublisher
from ferry.agent.runtime import Role, Runtime
from ferry.agent.view import StoreView
from ferry.ha.manager import Manager
from ferry.model import codec
from ferry.model.errors import FerryError, StoreError, Unavailable
from ferry.model.vm import Owner, Power, VmState, VmStatus
from ferry.qemu.argv import Hardware
from ferry.store.base import ClusterStore, Compare, Put
from ferry.store.keys import Keys

log = logging.getLogger("ferry.agent")

START_BACKOFF_S = (5.0, 10.0, 30.0, 60.0)
MANAGER_PERIOD_S = 0.5


def default_cpu_model(accel: str) -> str:
    return "host" if accel == "kvm" else "qemu64"


class Agent:
    def __init__(self, config: AgentConfig, store: ClusterStore) -> None:
        self.config = config
        keys = Keys(config.cluster)
        accel = resolve_accel(config.accel)
        hw = Hardware(accel=accel, cpu_model=config.cpu_model or default_cpu_model(accel))
        self.wake = asyncio.Event()
        runtime = Runtime(config.run_dir, bridge=config.bridge, qemu_binary=config.qemu_binary,
                          on_change=self.wake.set)
        view = StoreView(store, keys)
        self.manager_wake = asyncio.Event()

        def store_changed() -> None:
            self.wake.set()
            self.manager_wake.set()

        view.on_change = store_changed
        self.ctx = AgentContext(config=config, store=store, keys=keys, view=view,
                                runtime=runtime, hardware=hw)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.failures: dict[str, tuple[int, float]] = {}  # vm -> (attempts, retry at)
        self.last_reason = ""
        self.membership = Membership(self.ctx, on_change=self.wake.set)
        self.manager = Manager(node=config.node, store=store, keys=keys,
                               base_delay=config.timings.fence_delay_s)

    async def run(self) -> None:
        ctx = self.ctx
        adopted = await ctx.runtime.adopt_all()
        log.info("node %s: adopted %d running VMs: %s", self.config.node, len(adopted),
                 ", ".join(adopted) or "-")
        await self.membership.register_until_done()
        await ctx.view.load()
        m = self.membership
        background = [
            asyncio.create_task(ctx.view.follow(), name="watch"),
            asyncio.create_task(m.keepalive(), name="keepalive"),
            asyncio.create_task(m.guard_deadline(), name="self-fence"),
            asyncio.create_task(m.feed_watchdog(), name="watchdog"),
            asyncio.create_task(self._manage(), name="manager"),
            asyncio.create_task(NetworkPublisher(ctx).run(), name="networks"),
        ]
        try:
            while True:
                self.wake.clear()
                await self.cycle()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.config.timings.resync_s)
        finally:
            for t in background + list(self.tasks.values()):
                t.cancel()

    async def _manage(self) -> None:
        last = ""
        while True:
            # On every store change (a migration request is admitted at once), and at least
            # every period (the fence delay is counted on the clock, not on changes).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.manager_wake.wait(), MANAGER_PERIOD_S)
            self.manager_wake.clear()
            if not self.membership.guard.valid():
                continue  # a node past its lease deadline decides nothing for others
            try:
                reason = await self.manager.step(self.ctx.view.entries,
                                                 lease=self.membership.guard.lease)
            except StoreError as err:
                reason = f"store error: {err}"
            if reason != last:
                log.info("manager: %s", reason)
                last = reason

    def snapshot(self) -> rc.Snapshot:
        view = self.ctx.view
        keys = self.ctx.keys
        vms: dict[str, rc.VmFacts] = {}
        for name in view.names(keys.vms):
            spec = view.spec(name)
            if spec is None:
                continue
            owner, rev = view.owner(name)
            vms[name] = rc.VmFacts(spec=spec, owner=owner, owner_rev=rev, status=view.status(name))
        migrations = {}
        for mid in view.names(keys.migrations):
            rec = view.migration(mid)
            if rec is not None and (not rec.phase.terminal or self._local_incoming(mid)):
                migrations[mid] = rec
        local = {
            name: rc.LocalFacts(
                role=rc.LocalRole(vm.meta.role.value), run_state=vm.run_state,
                token=vm.meta.token, migration=vm.meta.migration, pid=vm.proc.pid,
                since=vm.meta.started_at, ha=self.ctx.runtime.has_marker(name))
            for name, vm in self.ctx.runtime.vms.items()
        }
        now = time.monotonic()
        held = frozenset(v for v, (_, at) in self.failures.items() if at > now)
        return rc.Snapshot(node=self.config.node, vms=vms, migrations=migrations, local=local,
                           busy=frozenset(self.tasks), held=held,
                           lease_valid=self.membership.guard.valid())

    def _local_incoming(self, mid: str) -> bool:
        return any(v.meta.role is Role.INCOMING and v.meta.migration == mid
                   for v in self.ctx.runtime.vms.values())

    async def cycle(self) -> str:
        plan = rc.decide(self.snapshot())
        if plan.reason != self.last_reason or plan.actions:
            log.info("cycle: %s", plan.reason)
        self.last_reason = plan.reason
        for action in plan.actions:
            await self._act(action)
        return plan.reason

    async def _act(self, action: rc.Action) -> None:
        match action:
            case rc.StartVm(vm=vm, token=token):
                self._spawn(vm, self._start(vm, token))
            case rc.StopVm(vm=vm, force=force):
                local = self.ctx.runtime.vms[vm]
                self._spawn(vm, self.ctx.runtime.stop(
                    local, force=force, timeout=self.config.timings.stop_timeout_s))
            case rc.KillVm(vm=vm, why=why):
                log.warning("VM %s: killing local QEMU: %s", vm, why)
                self._spawn(vm, self.ctx.runtime.kill(self.ctx.runtime.vms[vm]))
            case rc.ReportStatus(vm=vm, status=status):
                try:
                    await self.ctx.report_status(vm, status)
                except StoreError as err:
                    log.warning("VM %s: cannot report status: %s", vm, err)
            case rc.DriveSource(vm=vm, migration=mid):
                self._spawn(vm, drive_source(self.ctx, mid))
            case rc.DriveTarget(vm=vm, migration=mid):
                self._spawn(vm, drive_target(self.ctx, mid))
            case rc.ArmHa(vm=vm, owner_rev=rev, on=on):
                self._spawn(vm, self._arm(vm, rev, on=on))
            case rc.SetMarker(vm=vm, on=on):
                self.ctx.runtime.set_marker(vm, on=on)
            case rc.ReleaseVm(vm=vm, owner_rev=rev):
                self._spawn(vm, self.ctx.release(vm, rev))

    def _spawn(self, vm: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=f"op:{vm}")
        self.tasks[vm] = task

        def done(t: asyncio.Task[None]) -> None:
            if self.tasks.get(vm) is t:
                del self.tasks[vm]
            if not t.cancelled() and t.exception() is not None:
                log.error("VM %s: operation failed: %s", vm, t.exception(),
                          exc_info=t.exception())
            self.wake.set()

        task.add_done_callback(done)

    async def _arm(self, vm: str, rev: int, *, on: bool) -> None:
        """Arming: the marker exists before the owner record says armed. Disarming: the
        record first, then the marker. Either way the marker covers every armed QEMU."""
        ctx = self.ctx
        local = ctx.runtime.vms.get(vm)
        if on and local is not None:
            ctx.runtime.set_marker(vm, on=True)
        key = ctx.keys.vm_owner(vm)
        entry = await ctx.store.get(key)
        if entry is None or entry.mod_revision != rev:
            return
        owner = codec.decode(Owner, entry.value)
        res = await ctx.store.txn([Compare.unchanged(key, rev)],
                                  [Put(key, codec.encode(owner.amend(rev, ha=on)))])
        if res.succeeded:
            log.info("VM %s: HA %s", vm, "armed" if on else "disarmed")
            if not on and local is not None:
                ctx.runtime.set_marker(vm, on=False)

    async def _start(self, vm: str, token: int) -> None:
        """Start only if the store (read now, not from the watch copy) still says so, and
        while this node's lease is valid.

        The STARTING status is written *before* the owner record is read: a stop the read
        does not see comes later, and then finds this status and reads "stopping" until the
        QEMU is gone — so nobody starts the VM elsewhere meanwhile."""
        ctx = self.ctx
        spec = ctx.view.spec(vm)
        if spec is None:
            return
        me = self.config.node
        lease = self.membership.guard.lease  # the start is valid under this lease only

        def may_start() -> bool:
            return self.membership.guard.valid() and self.membership.guard.lease == lease

        starting = VmStatus(node=me, state=VmState.STARTING, token=token, since=time.time())
        await ctx.report_status(vm, starting)
        entry = await ctx.store.get(ctx.keys.vm_owner(vm))
        owner = codec.decode(Owner, entry.value) if entry is not None else None
        if owner is None or entry is None or owner.node != me or owner.power is not Power.ON \
                or owner.token(entry.mod_revision) != token or not may_start():
            await ctx.withdraw_status(vm, starting)
            return  # the owner record moved on since the snapshot: the next cycle decides
        try:
            local = await ctx.runtime.start(spec, hw=ctx.hardware, token=token, ha=owner.ha,
                                            tag=f"{me}:{token}",
                                            may_start=may_start)
        except Unavailable:
            await ctx.withdraw_status(vm, starting)
            return
        except FerryError as err:
            attempts = self.failures.get(vm, (0, 0.0))[0]
            delay = START_BACKOFF_S[min(attempts, len(START_BACKOFF_S) - 1)]
            self.failures[vm] = (attempts + 1, time.monotonic() + delay)
            log.error("VM %s: start failed: %s (next try in %.0fs)", vm, err, delay)
            await ctx.report_status(vm, VmStatus(node=self.config.node, state=VmState.FAILED,
                                                 token=token, since=time.time(),
                                                 detail=str(err)))
            return
        self.failures.pop(vm, None)
        await ctx.report_status(vm, VmStatus(
            node=self.config.node, state=rc.observed_state(local.run_state), token=token,
            pid=local.proc.pid, since=local.meta.started_at))


AGENT_NICE = -5


async def run_agent(config: AgentConfig, store: ClusterStore) -> None:
    # The agent is idle almost always, but when a migration switches over the VM waits for
    # it: it must not queue behind the guests' vCPU threads for the CPU.
    try:
        os.nice(AGENT_NICE)
    except OSError as err:
        log.warning("cannot raise the agent's priority: %s", err)
    agent = Agent(config, store)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main.cancel)
    try:
        await agent.run()
    except asyncio.CancelledError:
        log.info("node %s: agent stopping; its VMs keep running", config.node)
    except FerryError as err:
        log.error("node %s: %s", config.node, err)
        raise
    finally:
        await store.close()

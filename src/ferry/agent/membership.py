"""This node's membership: its lease, self-fencing, its watchdog, and rejoining.

- ``register`` grants a lease, publishes the node's info, and creates ``alive`` on the
  lease. A node the manager fenced first kills every local QEMU it no longer owns, then
  clears ``fenced`` in the same transaction that makes it alive again ("rejoins cleanly").
- ``keepalive`` renews every T/8, at least 0.5 s (retrying quickly on errors);
  ``guard_deadline`` kills the node's HA QEMUs when the lease deadline passes without a
  renewal (self-fencing); after that the node registers a new lease before it runs
  anything again.
- ``feed_watchdog`` feeds the separate watchdog process only while the lease is valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

import ferry
from ferry.agent.context import AgentContext
from ferry.ha.events import event_put
from ferry.ha.lease import LeaseGuard, LeaseState
from ferry.ha.watchdog import HW_DEVICE, Feeder, kill_ha_qemus
from ferry.model import codec
from ferry.model.errors import FerryError, LeaseExpired, StoreError
from ferry.model.ha import EventKind
from ferry.model.node import NodeInfo
from ferry.model.vm import Owner
from ferry.store.base import Compare, Delete, Put, TxnOp

log = logging.getLogger("ferry.agent.membership")

RETRY_S = 0.25


class Membership:
    def __init__(self, ctx: AgentContext, *, on_change: Callable[[], None]) -> None:
        self.ctx = ctx
        t = ctx.config.timings
        self.timings = t
        self.guard = LeaseGuard(ttl=t.lease_ttl, margin=t.self_fence_margin_s)
        self.feeder = Feeder(ctx.config.run_dir, timeout=t.watchdog_s,
                             hw_device=HW_DEVICE if HW_DEVICE.exists() else None)
        self.on_change = on_change
        self.fenced_vms: list[str] = []  # killed by self-fencing, told once rejoined

    @property
    def node(self) -> str:
        return self.ctx.node

    async def register_until_done(self) -> None:
        while True:
            try:
                await self.register()
                return
            except StoreError as err:
                log.warning("node %s: cannot register: %s; retrying", self.node, err)
                await asyncio.sleep(1.0)

    async def register(self) -> None:
        ctx = self.ctx
        sent = time.monotonic()
        lease = await ctx.store.grant_lease(self.timings.lease_ttl)
        info = NodeInfo(
            name=self.node, cluster_address=ctx.config.cluster_address,
            migration_addresses=ctx.config.migration_networks, bridge=ctx.config.bridge,
            memory_mib=_memory_mib(), cpus=os.cpu_count() or 1, accel=ctx.hardware.accel,
            version=ferry.__version__, started_at=time.time(),
            lease_ttl=self.timings.lease_ttl, watchdog_s=self.timings.watchdog_s,
            fence_delay_s=self.timings.fence_delay_s,
        )
        while not await self._come_alive(lease, info):
            pass  # fenced in between: clean up again
        self.fenced_vms = []
        ctx.lease = lease
        self.guard.granted(lease, sent_at=sent)
        self.feeder.feed()  # the watchdog may have fired meanwhile: stop it killing afresh
        if ctx.view.revision:
            # After a time cut off, the watch's copy is old: decide on a fresh one.
            with contextlib.suppress(FerryError):
                await ctx.view.load()
        log.info("node %s: registered (lease %x, %s, cpu %s)", self.node, lease,
                 ctx.hardware.accel, ctx.hardware.cpu_model)
        self.on_change()

    async def _come_alive(self, lease: int, info: NodeInfo) -> bool:
        """``alive`` on the new lease, in one transaction with clearing ``fenced`` (after
        killing what the node lost), guarded so that a fence written meanwhile is seen."""
        ctx = self.ctx
        key = ctx.keys.node_fenced(self.node)
        # The info and ``alive`` together: a manager never sees a new node without ``alive``
        # (and calls it down).
        ops: list[TxnOp] = [Put(ctx.keys.node_info(self.node), codec.encode(info)),
                            Put(ctx.keys.node_alive(self.node), str(os.getpid()), lease=lease)]
        fenced = await ctx.store.get(key)
        if fenced is not None:
            killed = await self._kill_lost_vms()
            ops += [Delete(key), self._event(
                EventKind.NODE_REJOINED, f"{self.node} rejoined after being fenced; killed"
                f" {', '.join(killed) or 'no'} VMs it had lost")]
        if self.fenced_vms:
            ops.append(self._event(EventKind.SELF_FENCED, f"{self.node} lost its lease and"
                                   f" stopped its HA VMs: {', '.join(self.fenced_vms)}"))
        guard = Compare.unchanged(key, fenced.mod_revision if fenced else 0)
        return (await ctx.store.txn([guard], ops)).succeeded

    def _event(self, kind: EventKind, message: str) -> Put:
        return event_put(self.ctx.keys, kind=kind, message=message, by=self.node, node=self.node)

    async def _kill_lost_vms(self) -> list[str]:
        """Before a fenced node counts as up again: no QEMU of a VM it does not own."""
        ctx = self.ctx
        killed = []
        for name, local in list(ctx.runtime.vms.items()):
            entry = await ctx.store.get(ctx.keys.vm_owner(name))
            owner = codec.decode(Owner, entry.value) if entry else None
            if owner is None or owner.node != self.node:
                log.warning("VM %s: owned by %s now: killing the local QEMU before rejoining",
                            name, owner.node if owner else "nobody")
                await ctx.runtime.kill(local)
                killed.append(name)
        return killed

    async def keepalive(self) -> None:
        # Often enough that an etcd leader election (1-2 s) fits between the last
        # successful renewal and the self-fence deadline (T - margin after it).
        interval = max(0.5, self.timings.lease_ttl / 8)
        while True:
            if self.guard.state is not LeaseState.VALID:
                await self.register_until_done()
            sent = time.monotonic()
            try:
                await self.ctx.store.keepalive(self.guard.lease)
            except LeaseExpired:
                log.error("node %s: lease expired; registering again", self.node)
                self.guard.valid()  # LOST if past the deadline
                with contextlib.suppress(FerryError):
                    await self.register()
                continue
            except StoreError as err:
                log.warning("node %s: keepalive failed (%s); %.1fs left", self.node, err,
                            self.guard.remaining())
                await asyncio.sleep(RETRY_S)
                continue
            self.guard.renewed(sent_at=sent)
            await asyncio.sleep(interval)

    async def guard_deadline(self) -> None:
        """Self-fencing: at the deadline, the HA QEMUs go, whatever else the agent is doing."""
        while True:
            if self.guard.state is LeaseState.VALID:
                await asyncio.sleep(max(0.02, self.guard.remaining()))
                if not self.guard.valid():
                    self.self_fence()
            else:
                await asyncio.sleep(0.1)

    def self_fence(self) -> None:
        killed = kill_ha_qemus(self.ctx.runtime.vms_dir)
        names = [vm for vm, _ in killed]
        self.fenced_vms.extend(names)
        log.error("node %s: lease deadline passed without renewal: self-fenced, killed %s",
                  self.node, ", ".join(f"{vm} (pid {pid})" for vm, pid in killed) or "no HA VM")
        self.on_change()

    async def feed_watchdog(self) -> None:
        await asyncio.to_thread(self.feeder.ensure_running)
        interval = min(0.5, self.timings.watchdog_s / 4)
        while True:
            if self.guard.valid() and not self.feeder.feed():
                await asyncio.to_thread(self.feeder.ensure_running)  # it died: a new one
                self.feeder.feed()
            await asyncio.sleep(interval)


def _memory_mib() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0

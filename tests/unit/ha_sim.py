"""A deterministic simulation of Ferry's HA: the real decision code, virtual time, faults.

What runs for real: ``LeaseGuard`` (each node's view of its lease deadline), ``Manager``
(election, fence delay, recovery transactions, ``recovery.decide``, placement), the agent's
pure ``reconcile.decide``, the agent's ``StoreView`` typed reads, the user operations of
``control`` (stop, start, HA on/off), and ``MemoryStore`` (revisions, transactions, leases)
on one ``ManualClock``. What is replicated here, minimally, is the agent's I/O around them:
``Membership`` (register, keepalive, guard_deadline, feed_watchdog), ``Agent`` (snapshot,
cycle, _act, _start, _arm), ``AgentContext.report_status``, the watchdog process and QEMU.
Each replica names the function it mirrors.

Time is discrete-event: every agent task (keepalive loop, deadline guard, watchdog feeder,
manager loop, reconcile cycle, an operation's next await) is a timer on one queue; timers
due at the same instant run in a random order, latencies (RPCs, watch delivery, QEMU start
and stop) are random, all drawn from one seeded ``random.Random``: the same seed gives the
same run. Store calls complete at once (MemoryStore answers immediately); where the delay
between sending and applying a request matters it is modelled (a keepalive or lease grant
reaches etcd later than the agent sent it; an operation's read comes back after a round
trip), and each agent's view of the store lags the store (the watch, coalesced: a view
catches up with a linearizable read). A transaction may be applied and its answer lost (the
etcd client then raises StoreError "may have been applied"). Registration (four RPCs) is one
step: nothing interleaves within it.

Faults: power off/on a node (its QEMUs vanish; a fresh agent registers on power-on), cut
a node off from the store (its calls raise StoreError, its QEMUs run on), freeze an agent
(SIGSTOP: its tasks stop, its watchdog and QEMUs do not; on thaw the deadline guard runs
first, then what became due), crash and restart an agent (QEMUs survive and are adopted, new
lease), an etcd leader change (the whole store unreachable for 0.5-1.5 s, no lease expires
meanwhile, every lease renewed to its TTL after it), and user operations (stop, start, HA
on/off, through the real control functions). Faults may target whichever node is the
manager at the time. Then everything heals (some nodes may stay dead).

Checked after every step: (1) at most one running copy of each VM. At the moment it
happens: (2) the fencing token of a starting copy is never lower than one that ran before;
(3) a recovery commits only once the source's copy is dead (design/ha.md invariant 3);
(4) every successful manager write is made by the manager whose term matches the manager key,
and at most one manager's term matches it. After the final heal: (5) every VM that should
run runs again within ``Timing.bound()``, given capacity (an HA VM never armed on a dead
node stays down by design).

``Masks`` keeps random schedules clear of bugs already found (each documented there and
reproduced by a test); ``Masks.none()`` shows them.

Not modelled: live migration (the model has no paused source copies), start failures and
their back-off, the hardware watchdog, disk contents and QEMU's image locks, clock drift
between nodes, etcd compaction and slow watches that re-list, QEMU crashing by itself,
paused (drained) nodes.

Speed: JSON decoding is memoized while simulating (``quiet``), and a few zero-cost reads
of MemoryStore's internals (``_kv``, ``_leases``) serve the checks and etcd's lease renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ferry.agent import reconcile as rc
from ferry.agent.view import StoreView
from ferry.control import ha as ha_ctl
from ferry.control import vms as vm_ctl
from ferry.control.client import ClusterClient
from ferry.ha.events import event_put
from ferry.ha.lease import LeaseGuard, LeaseState
from ferry.ha.manager import Manager, ManagerState
from ferry.ha.placement import Homeless, NodeLoad, place_all
from ferry.model import codec
from ferry.model.cluster import ClusterConfig, Volume
from ferry.model.errors import FerryError, LeaseExpired, StoreError
from ferry.model.ha import Event, EventKind, HaPolicy, HaPriority, StartAction
from ferry.model.node import NodeInfo
from ferry.model.vm import DiskSpec, NicSpec, Owner, Power, VmSpec, VmState, VmStatus, mac_for
from ferry.store.base import Compare, Delete, Entry, Op, Put, Target, TxnOp, TxnResult
from ferry.store.keys import Keys
from ferry.store.memory import ManualClock, MemoryStore

KEYS = Keys("sim")
MANAGER_KEY = KEYS.manager
WALL0 = 1_700_000_000.0  # wall-clock time at virtual time 0
FAULT_KINDS = ("power", "isolate", "freeze", "crash", "etcd", "user")


# -- configuration --------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """The agent's timings (agent/config.py Timings; lab values by default)."""

    ttl: int = 4
    margin: float = 1.0
    watchdog_s: float = 2.67
    fence_delay_s: float = 4.0
    resync_s: float = 2.0

    @property
    def keepalive_s(self) -> float:  # Membership.keepalive
        return max(0.5, self.ttl / 3)

    @property
    def feed_s(self) -> float:  # Membership.feed_watchdog
        return min(0.5, self.watchdog_s / 4)

    retry_s: float = 0.25  # membership.RETRY_S
    register_retry_s: float = 1.0  # Membership.register_until_done
    manager_s: float = 0.5  # daemon.MANAGER_PERIOD_S
    watch_retry_s: float = 1.0  # StoreView.follow after a broken watch
    watchdog_tick_s: float = 0.1  # watchdog.TICK_S

    def bound(self) -> float:
        """How long after the last fault heals every VM that should run runs again:
        T + D + 3 resyncs + slack (etcd renewals, a manager change, watch and start delays)."""
        return self.ttl + self.fence_delay_s + 3 * self.resync_s + 4.0


@dataclass(frozen=True)
class Latency:
    """Random delays, each drawn uniformly from (low, high)."""

    rpc: tuple[float, float] = (0.001, 0.03)  # an operation's store round trip
    keepalive_early: tuple[float, float] = (0.0, 0.2)  # sent this long before etcd applies it
    watch: tuple[float, float] = (0.0, 0.3)  # store change -> the agent's view
    start: tuple[float, float] = (0.05, 1.0)  # owner read in _start -> QEMU spawned
    stop: tuple[float, float] = (0.1, 1.0)  # ACPI power-down -> QEMU gone
    kill: tuple[float, float] = (0.01, 0.2)  # QMP quit / SIGKILL -> QEMU gone
    wake: tuple[float, float] = (0.0, 0.01)  # wake event -> the next cycle
    # chance that a transaction is applied but its answer is lost: the etcd client raises
    # StoreError "the transaction may have been applied" (store/etcd.py _failover)
    unknown_outcome: float = 0.0


@dataclass(frozen=True)
class Masks:
    """Switches that keep the random schedules clear of bugs already reported, so that the
    suite finds new ones. Each names the bug and has a reproducing test; FERRY_SIM_UNMASK=1
    turns them all off. (Bugs found earlier and fixed since: a QEMU spawned after the lease
    deadline by a slow start, start_vm moving a VM whose node may still run it, a lost
    campaign answer leaving the cluster without manager; their tests now guard the fixes.)"""

    # Bug 1b: Agent._start reads the owner record under lease L1, then runtime.start asks
    # may_start (guard.valid) just before spawning. A freeze in between, long enough for
    # the VM to be recovered elsewhere, during which the keepalive loop re-registers first
    # on thaw (lease L2, valid): may_start says yes and a stale copy starts. Masked: a start
    # whose preparation ends while its agent is frozen reaches may_start at once.
    spawn_during_freeze: bool = False  # fixed: may_start also checks the lease is the same
    # Bug 5: start_vm takes "no status" for "stopped", but a VM's status lives on the lease
    # it was written under: a node that registers again (agent restart, lease lost while cut
    # off) loses it, and a VM it is stopping (busy) is not reported again; the node is up,
    # so start_vm starts the VM on another node while its QEMU still shuts down. Masked: the
    # simulated user does not start a VM whose previous owner still runs or spawns a copy.
    start_while_stopping: bool = False  # fixed: a node releases a VM it has stopped

    @staticmethod
    def none() -> Masks:
        return Masks(spawn_during_freeze=False, start_while_stopping=False)


@dataclass(frozen=True)
class VmDef:
    name: str
    memory_mib: int
    ha: HaPolicy | None
    node: str  # its owner at the start
    power: Power = Power.ON


@dataclass(frozen=True)
class Fault:
    """At ``at`` (virtual seconds from the start), ``kind`` hits ``target`` for ``duration``.

    kinds: power-off (duration 0: stays off until the heal), isolate, freeze, crash (restart
    after duration), etcd (leader change: the store is unreachable for duration), stop,
    start, ha-add, ha-remove (user operations on the VM ``target``). ``target`` "@manager"
    is the node holding the manager key at that moment (any node if none does)."""

    at: float
    kind: str
    target: str = ""
    duration: float = 0.0

    def __str__(self) -> str:
        return f"t={self.at:.2f} {self.kind} {self.target} {self.duration:.2f}s".rstrip()


@dataclass(frozen=True)
class Scenario:
    nodes: tuple[str, ...]
    vms: tuple[VmDef, ...]
    faults: tuple[Fault, ...] = ()
    heal_at: float = 20.0  # every fault ends here (a fault still running is healed)
    dead_at_end: tuple[str, ...] = ()  # powered off at the heal and left dead
    node_memory_mib: int = 8192
    timing: Timing = Timing()
    latency: Latency = Latency()
    boot_spread: float = 0.3  # agents start within this many seconds
    settle: float = 2.0  # run on this long after every VM runs again

    def describe(self) -> str:
        def vm(v: VmDef) -> str:
            ha = ""
            if v.ha is not None:
                pref = "/".join(v.ha.preferred_nodes)
                ha = f", ha {v.ha.priority.value}" + (f" pref {pref}" if pref else "")
            return f"{v.name}({v.memory_mib}M on {v.node}{ha})"

        vms = ", ".join(vm(v) for v in self.vms)
        lines = [f"nodes {', '.join(self.nodes)} ({self.node_memory_mib} MiB); vms {vms}"]
        lines += [f"  fault {f}" for f in self.faults]
        dead = f", {', '.join(self.dead_at_end)} left dead" if self.dead_at_end else ""
        lines.append(f"  heal at t={self.heal_at:.2f}{dead}")
        return "\n".join(lines)


# -- what a run leaves -------------------------------------------------------------------

@dataclass
class Run:
    """One QEMU copy of a VM."""

    vm: str
    node: str
    token: int
    started: float
    ended: float | None = None
    why_ended: str = ""


@dataclass
class Result:
    seed: int | None
    scenario: Scenario
    steps: int = 0
    faults: int = 0
    recoveries: int = 0
    violations: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    recovered_at: float | None = None  # virtual seconds after the heal when all ran again
    end: float = 0.0
    events: list[str] = field(default_factory=list)  # the cluster's event log at the end
    spurious_kills: int = 0  # HA QEMUs the watchdog killed while their agent was healthy
    unmasked: bool = False

    @property
    def ok(self) -> bool:
        return not self.violations

    def runs_of(self, vm: str) -> list[Run]:
        return [r for r in self.runs if r.vm == vm]

    def report(self, last: int = 400) -> str:
        head = f"seed {self.seed}: " if self.seed is not None else ""
        lines = [f"{head}{len(self.violations)} violation(s): " + "; ".join(self.violations)]
        if self.seed is not None:
            unmask = "FERRY_SIM_UNMASK=1 " if self.unmasked else ""
            lines.append(f"replay: {unmask}FERRY_SIM_SEED={self.seed} .venv/bin/pytest -q"
                         " tests/unit/test_ha_simulation.py -k random_schedules")
        lines.append("scenario: " + self.scenario.describe())
        trace = self.trace[-last:]
        if len(self.trace) > last:
            lines.append(f"... ({len(self.trace) - last} earlier trace lines)")
        lines += trace
        return "\n".join(lines)


class Violation(Exception):
    pass


# -- the simulated machines -------------------------------------------------------------

@dataclass
class Copy:
    """A running QEMU on a simulated host."""

    token: int
    pid: int
    since: float
    run: Run


class NodeStore:
    """One node's connection to the store: fails while the node is cut off; reports what
    the manager writes to the simulation's checks. Duck-types ClusterStore."""

    def __init__(self, sim: Simulation, node: SimNode, *, manager: bool = False) -> None:
        self.sim = sim
        self.node = node
        self.manager = manager

    def _reach(self) -> MemoryStore:
        if self.node.isolated:
            raise StoreError(f"{self.node.name}: cut off from the store (simulated)")
        return self.sim.store

    async def get(self, key: str) -> Entry | None:
        return await self._reach().get(key)

    async def get_prefix(self, prefix: str) -> tuple[list[Entry], int]:
        return await self._reach().get_prefix(prefix)

    async def put(self, key: str, value: str, *, lease: int = 0) -> int:
        return await self._reach().put(key, value, lease=lease)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        return await self._reach().delete(key, prefix=prefix)

    async def txn(self, compares: Sequence[Compare], success: Sequence[TxnOp],
                  failure: Sequence[TxnOp] = ()) -> TxnResult:
        store = self._reach()
        if not self.manager:
            res = await store.txn(compares, success, failure)
        else:
            before = self.sim.manager_txn_before(success)
            res = await store.txn(compares, success, failure)
            if res.succeeded and success:
                self.sim.manager_txn_after(self.node, compares, success, before)
        if self.sim.answer_lost(self.node, compares):
            raise StoreError(f"{self.node.name}: txn answer lost (the transaction may have"
                             " been applied)")
        return res

    async def grant_lease(self, ttl: int) -> int:
        return await self._reach().grant_lease(ttl)

    async def keepalive(self, lease: int) -> int:
        return await self._reach().keepalive(lease)

    async def revoke_lease(self, lease: int) -> None:
        await self._reach().revoke_lease(lease)


class SimNode:
    def __init__(self, sim: Simulation, name: str, index: int) -> None:
        self.sim = sim
        self.name = name
        self.index = index
        # the machine: survives agent restarts, not power-off
        self.powered = False
        self.machine_epoch = 0
        self.copies: dict[str, Copy] = {}
        self.markers: set[str] = set()  # HA markers in the run directory
        self.fed_at: float | None = None  # the watchdog: disarmed until the first feed
        self.tripped = False  # the watchdog fired and was not fed since
        # the agent: one incarnation per epoch
        self.agent_epoch = 0
        self.running = False  # the agent process exists (it may be frozen)
        self.booted = False  # registered, its background tasks run
        self.frozen = False
        self.deferred: list[tuple[str, float]] = []
        self.isolated = False
        self.timers: dict[str, float] = {}
        self.ops: dict[str, Callable[[], Awaitable[None]]] = {}  # vm -> its next step
        self.spawning: set[str] = set()  # VMs whose next step is QEMU appearing
        self.store = NodeStore(sim, self)
        self.guard = self._guard()
        self.manager = self._manager()
        self.view = StoreView(self.store, KEYS)  # type: ignore[arg-type]
        self.watch_ok = False
        self.tasks: set[str] = set()  # Agent.tasks: VMs with an operation in flight
        self.fenced_vms: list[str] = []
        self.lease = 0
        self.pid = 1000 + index
        self.last_manager = (ManagerState.STANDBY, 0)

    def _guard(self) -> LeaseGuard:
        t = self.sim.timing
        return LeaseGuard(ttl=t.ttl, margin=t.margin, clock=self.sim.clock)

    def _manager(self) -> Manager:
        return Manager(node=self.name, store=NodeStore(self.sim, self, manager=True),  # type: ignore[arg-type]
                       keys=KEYS, base_delay=self.sim.timing.fence_delay_s,
                       clock=self.sim.clock, wall=self.sim.wall)

    def new_agent(self) -> None:
        """A fresh agent process: nothing of the old one's memory survives."""
        self.agent_epoch += 1
        self.running = True
        self.booted = False
        self.frozen = False
        self.deferred = []
        self.timers = {}
        self.ops = {}
        self.spawning = set()
        self.tasks = set()
        self.fenced_vms = []
        self.lease = 0
        self.pid += 100
        self.guard = self._guard()
        self.manager = self._manager()
        self.view = StoreView(self.store, KEYS)  # type: ignore[arg-type]
        self.view.on_change = lambda: None
        self.watch_ok = False
        self.last_manager = (ManagerState.STANDBY, 0)

    def info(self) -> NodeInfo:
        t = self.sim.timing
        return NodeInfo(name=self.name, cluster_address=f"10.77.0.{self.index + 11}",
                        migration_addresses=(), bridge="vmswitch",
                        memory_mib=self.sim.scenario.node_memory_mib, cpus=2, accel="tcg",
                        version="sim", started_at=self.sim.wall(), lease_ttl=t.ttl,
                        watchdog_s=t.watchdog_s)


# -- the simulation ----------------------------------------------------------------------

Step = Callable[[], Awaitable[None]]


class Simulation:
    def __init__(self, scenario: Scenario, *, seed: int = 0, trace: bool = True,
                 label: int | None = None, masks: Masks = Masks()) -> None:
        self.scenario = scenario
        self.masks = masks
        self.timing = scenario.timing
        self.lat = scenario.latency
        self.rng = random.Random(seed * 1_000_003 + 7)
        self.clock = ManualClock(start=1000.0)
        self.t0 = self.clock()
        self.store = MemoryStore(clock=self.clock, auto_expire=False)
        self.user = ClusterClient(self.store, KEYS)
        self.nodes = {name: SimNode(self, name, i) for i, name in enumerate(scenario.nodes)}
        self.q: list[tuple[float, float, int, Step]] = []
        self.seq = itertools.count()
        self.tracing = trace
        self.result = Result(seed=label, scenario=scenario, unmasked=masks != Masks())
        self.etcd_down = False
        self.healed = False
        self.max_token: dict[str, int] = {}
        self.next_pid = itertools.count(4000)
        self._wall_last = 0.0
        self._seen_rev = 0
        self.stop_at = scenario.heal_at + self.timing.bound()
        self.done_at: float | None = None

    # -- time and tracing
    @property
    def now(self) -> float:
        return self.clock() - self.t0

    def wall(self) -> float:
        """Wall-clock time, strictly increasing (event keys are built from it)."""
        self._wall_last = max(self._wall_last + 1e-6, WALL0 + self.now)
        return self._wall_last

    def u(self, span: tuple[float, float]) -> float:
        return self.rng.uniform(*span)

    def trace(self, node: str, what: str) -> None:
        if self.tracing:
            self.result.trace.append(f"{self.now:8.3f} {node:>6} {what}")

    def answer_lost(self, n: SimNode, compares: Sequence[Compare]) -> bool:
        p = self.lat.unknown_outcome
        if p <= 0 or self.rng.random() >= p:
            return False
        self.trace(n.name, "a transaction's answer is lost")
        return True

    def violate(self, what: str) -> None:
        self.trace("!", f"VIOLATION {what}")
        self.result.violations.append(f"t={self.now:.3f} {what}")
        raise Violation(what)

    # -- the event queue
    def at(self, t: float, step: Step) -> None:
        heapq.heappush(self.q, (t, self.rng.random(), next(self.seq), step))

    def timer(self, n: SimNode, name: str, t: float) -> None:
        """(Re)arm one of the agent's tasks: it runs at ``t`` unless re-armed meanwhile."""
        n.timers[name] = t
        epoch = n.agent_epoch
        self.at(self.t0 + t, functools.partial(self._fire, n, name, t, epoch))

    def wake(self, n: SimNode, name: str, t: float) -> None:
        """Run that task at ``t`` or earlier."""
        if n.timers.get(name, float("inf")) > t:
            self.timer(n, name, t)

    def wake_cycle(self, n: SimNode) -> None:
        """Agent.wake.set(): a cycle soon."""
        if n.running and n.booted:
            self.wake(n, "cycle", self.now + self.u(self.lat.wake))

    async def _fire(self, n: SimNode, name: str, t: float, epoch: int) -> None:
        if epoch != n.agent_epoch or n.timers.get(name) != t or not n.running:
            return
        del n.timers[name]
        if n.frozen and not (self.masks.spawn_during_freeze and name.startswith("op:")
                             and name[3:] in n.spawning):
            n.deferred.append((name, t))
            return
        await self._dispatch(n, name)

    async def _dispatch(self, n: SimNode, name: str) -> None:
        if name == "boot":
            await self.agent_boot(n)
        elif name == "keepalive":
            await self.keepalive(n)
        elif name == "guard":
            self.guard_deadline(n)
        elif name == "feed":
            self.feed_watchdog(n)
        elif name == "manager":
            await self.manage(n)
        elif name == "cycle":
            await self.cycle(n)
        elif name == "sync":
            await self.follow(n)
        elif name.startswith("op:"):
            step = n.ops.pop(name[3:], None)
            if step is not None:
                await step()
        else:
            raise AssertionError(name)

    # -- running it
    async def run(self) -> Result:
        with quiet():
            try:
                await self._setup()
                await self._loop()
            except Violation:
                pass
        self.result.end = self.now
        if self.tracing:
            for key, e in sorted(self.store._kv.items()):
                if key.startswith(KEYS.events):
                    ev = codec.decode(Event, e.value)
                    self.result.events.append(f"{ev.kind.value}: {ev.message}")
        return self.result

    async def _loop(self) -> None:
        t_stop = self.t0 + self.stop_at
        while self.q:
            t = self.q[0][0]
            if self.done_at is not None and t > self.t0 + self.done_at:
                return
            if t > t_stop:
                break
            step = heapq.heappop(self.q)[3]
            if t > self.clock():
                self.clock.advance(t - self.clock())
                if not self.etcd_down:
                    self.store.expire_leases()
            await step()
            self.result.steps += 1
            self.after_step()
        if self.done_at is None:
            self.check_liveness(final=True)

    def after_step(self) -> None:
        rev = self.store.revision
        if rev != self._seen_rev:
            self._seen_rev = rev
            for n in self.nodes.values():
                if n.booted and n.watch_ok:
                    self.wake(n, "sync", self.now + self.u(self.lat.watch))
        # (1) at most one running copy of each VM
        seen: dict[str, str] = {}
        for n in self.nodes.values():
            for vm in n.copies:
                if vm in seen:
                    self.violate(f"{vm} runs twice: on {seen[vm]} and on {n.name}")
                seen[vm] = n.name

    def check_managers(self, n: SimNode) -> None:
        """(4) at most one manager whose term is the manager key's create revision; run
        after each manager step (the only place a Manager's state changes)."""
        mk = self.store._kv.get(MANAGER_KEY)  # a read without a round trip
        if mk is not None:
            active = [m.name for m in self.nodes.values() if m.running
                      and m.manager.state is ManagerState.ACTIVE
                      and m.manager.term == mk.create_revision]
            if len(active) > 1 or (active and active[0] != mk.value):
                self.violate(f"managers {active} match the manager key of {mk.value}")
        state = (n.manager.state, n.manager.term)
        if state != n.last_manager:
            n.last_manager = state
            self.trace(n.name, f"manager {state[0].value} term {state[1]}")

    async def _setup(self) -> None:
        sc = self.scenario
        await self.store.put(KEYS.cluster_config, codec.encode(ClusterConfig(name="sim")))
        await self.store.put(KEYS.volume("shared0"),
                             codec.encode(Volume(name="shared0", path="/sim/shared0")))
        for i, v in enumerate(sc.vms):
            uid = f"{i + 1:012x}"
            spec = VmSpec(
                name=v.name, uid=uid, memory_mib=v.memory_mib, vcpus=1, volume="shared0",
                config_path=f"/sim/shared0/vms/{v.name}/vm.json",
                disks=(DiskSpec(path=f"/sim/shared0/vms/{v.name}/disk0.qcow2",
                                size_bytes=1 << 30),),
                nics=(NicSpec(mac=mac_for(uid)),), ha=v.ha,
                start_action=StartAction.NONE if v.ha else StartAction.START)
            await self.store.put(KEYS.vm_spec(v.name), codec.encode(spec))
            await self.store.put(KEYS.vm_owner(v.name), codec.encode(
                Owner(node=v.node if v.power is Power.ON else None, power=v.power)))
        for n in self.nodes.values():
            self.power_on(n, self.rng.uniform(0.0, sc.boot_spread))
        for f in sc.faults:
            self.at(self.t0 + f.at, functools.partial(self.fault, f))
        self.at(self.t0 + sc.heal_at, self.heal)

    # -- the agent (mirrors agent/daemon.py Agent.run and agent/membership.py) ----------

    async def agent_boot(self, n: SimNode) -> None:
        """Agent.run: adopt the running QEMUs (they are in n.copies), register_until_done,
        view.load, then the background tasks and the first cycle."""
        try:
            await self.register(n)
            await n.view.load()
        except StoreError:
            self.timer(n, "boot", self.now + self.timing.register_retry_s)
            return
        n.booted = True
        n.watch_ok = True
        self.trace(n.name, f"agent up: lease {n.lease:x}, adopted {sorted(n.copies) or '-'}")
        now = self.now
        self.timer(n, "keepalive", now)
        self.timer(n, "guard", max(now + 0.02, n.guard.deadline - self.t0))
        self.timer(n, "feed", now)
        self.timer(n, "manager", now + self.timing.manager_s)
        self.timer(n, "cycle", now)

    async def register(self, n: SimNode) -> None:
        """Membership.register: grant a lease, publish the info, create alive; a fenced node
        first kills the QEMUs of VMs it no longer owns and clears fenced in the same txn."""
        sent = self.clock() - self.u(self.lat.keepalive_early)
        lease = await n.store.grant_lease(self.timing.ttl)
        while not await self._come_alive(n, lease):
            pass
        n.fenced_vms = []
        n.lease = lease
        n.guard.granted(lease, sent_at=sent)
        self.feed_now(n)  # Membership.register feeds the watchdog at once
        self.trace(n.name, f"registered lease {lease:x}, deadline"
                   f" {n.guard.deadline - self.t0:.2f}")
        if n.booted:
            self.timer(n, "guard", max(self.now + 0.02, n.guard.deadline - self.t0))
        self.wake_cycle(n)

    async def _come_alive(self, n: SimNode, lease: int) -> bool:
        """Membership._come_alive: alive + clearing fenced, guarded by fenced's revision."""
        key = KEYS.node_fenced(n.name)
        ops: list[TxnOp] = [Put(KEYS.node_info(n.name), codec.encode(n.info())),
                            Put(KEYS.node_alive(n.name), str(n.pid), lease=lease)]
        fenced = await n.store.get(key)
        if fenced is not None:
            killed = await self._kill_lost_vms(n)
            ops += [Delete(key), self._event(
                n, EventKind.NODE_REJOINED, f"{n.name} rejoined after being fenced; killed"
                f" {', '.join(killed) or 'no'} VMs it had lost")]
        if n.fenced_vms:
            ops.append(self._event(n, EventKind.SELF_FENCED, f"{n.name} lost its lease and"
                                   f" stopped its HA VMs: {', '.join(n.fenced_vms)}"))
        guard = Compare.unchanged(key, fenced.mod_revision if fenced else 0)
        return (await n.store.txn([guard], ops)).succeeded

    def _event(self, n: SimNode, kind: EventKind, message: str) -> Put:
        return event_put(KEYS, kind=kind, message=message, by=n.name, node=n.name,
                         at=self.wall())

    async def _kill_lost_vms(self, n: SimNode) -> list[str]:
        """Membership._kill_lost_vms."""
        killed = []
        for name in list(n.copies):
            entry = await n.store.get(KEYS.vm_owner(name))
            owner = codec.decode(Owner, entry.value) if entry else None
            if owner is None or owner.node != n.name:
                self.end_copy(n, name, "killed before rejoining")
                killed.append(name)
        return killed

    async def keepalive(self, n: SimNode) -> None:
        """One turn of Membership.keepalive's loop."""
        t = self.timing
        if n.guard.state is not LeaseState.VALID:
            try:  # register_until_done
                await self.register(n)
            except StoreError:
                self.timer(n, "keepalive", self.now + t.register_retry_s)
                return
        sent = self.clock() - self.u(self.lat.keepalive_early)
        try:
            await n.store.keepalive(n.guard.lease)
        except LeaseExpired:
            self.trace(n.name, "keepalive: lease expired; registering again")
            n.guard.valid()
            with contextlib.suppress(FerryError):
                await self.register(n)
            self.timer(n, "keepalive", self.now + 0.001)  # continue
            return
        except StoreError:
            self.timer(n, "keepalive", self.now + t.retry_s)
            return
        n.guard.renewed(sent_at=sent)
        self.timer(n, "keepalive", self.now + t.keepalive_s)

    def guard_deadline(self, n: SimNode) -> None:
        """Membership.guard_deadline: at the deadline, kill the HA QEMUs (self-fencing).
        While the lease is not valid the real loop polls every 0.1 s; here it is re-armed
        when a new lease is granted (register)."""
        if n.guard.state is not LeaseState.VALID:
            return
        remaining = n.guard.remaining()
        if remaining > 0:
            self.timer(n, "guard", self.now + max(0.02, remaining))
            return
        if not n.guard.valid():
            self.self_fence(n)

    def self_fence(self, n: SimNode) -> None:
        """Membership.self_fence: kill_ha_qemus on this node."""
        killed = [vm for vm in sorted(n.copies) if vm in n.markers]
        for vm in killed:
            self.end_copy(n, vm, "self-fenced")
        n.fenced_vms.extend(killed)
        self.trace(n.name, f"lease deadline passed: self-fenced, killed {killed or 'no HA VM'}")
        self.wake_cycle(n)

    def feed_watchdog(self, n: SimNode) -> None:
        """Membership.feed_watchdog: feed only while the lease is valid."""
        if n.guard.valid():
            self.feed_now(n)
        self.timer(n, "feed", self.now + self.timing.feed_s)

    def feed_now(self, n: SimNode) -> None:
        """Feeder.feed."""
        n.fed_at = self.now
        n.tripped = False
        fire = n.fed_at + self.timing.watchdog_s + self.rng.uniform(
            1e-6, self.timing.watchdog_tick_s)
        self.at(self.t0 + fire, functools.partial(self.watchdog, n, n.machine_epoch))

    async def watchdog(self, n: SimNode, epoch: int) -> None:
        """ha/watchdog.py run: no food for watchdog_s -> SIGKILL every HA-marked QEMU, and so
        on every tick until fed again (a QEMU that appears meanwhile goes too). A separate
        process: it runs on while the agent is frozen or dead. Its ticks are simulated only
        when something can happen: at the timeout, and when a marked QEMU appears."""
        if epoch != n.machine_epoch or not self.starved(n):
            return
        killed = [vm for vm in sorted(n.copies) if vm in n.markers]
        for vm in killed:
            self.end_copy(n, vm, "watchdog")
        if killed and n.running and n.booted and not n.frozen and n.guard.valid():
            # the agent is healthy and holds a valid lease: nothing for a watchdog to do
            self.result.spurious_kills += len(killed)
            self.trace(n.name, f"watchdog killed {killed} although the agent is healthy")
        if killed or not n.tripped:
            assert n.fed_at is not None
            self.trace(n.name, f"watchdog starved {self.now - n.fed_at:.2f}s: killed"
                       f" {killed or 'no HA QEMU'}")
        n.tripped = True
        if killed:
            self.wake_cycle(n)

    def starved(self, n: SimNode) -> bool:
        return n.fed_at is not None and self.now - n.fed_at > self.timing.watchdog_s

    def poke_watchdog(self, n: SimNode) -> None:
        """A marked QEMU appeared: a starved watchdog kills it at its next tick."""
        if self.starved(n):
            self.at(self.clock() + self.rng.uniform(1e-6, self.timing.watchdog_tick_s),
                    functools.partial(self.watchdog, n, n.machine_epoch))

    async def manage(self, n: SimNode) -> None:
        """Agent._manage: one manager step on the watch's copy, only while the lease is valid."""
        self.timer(n, "manager", self.now + self.timing.manager_s)
        if not n.guard.valid():
            return
        try:
            reason = await n.manager.step(n.view.entries, lease=n.guard.lease)
        except StoreError:
            return
        finally:
            self.check_managers(n)
        if n.manager.state is ManagerState.ACTIVE and "accounted" not in reason:
            self.trace(n.name, f"manager: {reason}")

    async def follow(self, n: SimNode) -> None:
        """StoreView.follow, coarsely: the view catches up with the store (a linearizable
        read stands for the watch's batches); a broken watch re-lists every second."""
        before = n.view.revision
        try:
            await n.view.load()
        except StoreError:
            n.watch_ok = False
            self.timer(n, "sync", self.now + self.timing.watch_retry_s)
            return
        n.watch_ok = True
        if n.view.revision != before:
            self.wake_cycle(n)

    def broken_watch(self, n: SimNode) -> None:
        if n.booted and n.watch_ok:
            n.watch_ok = False
            self.timer(n, "sync", self.now + self.timing.watch_retry_s)

    # -- the reconcile cycle (mirrors Agent.snapshot, Agent.cycle, Agent._act) ------------

    def snapshot(self, n: SimNode) -> rc.Snapshot:
        view = n.view
        vms: dict[str, rc.VmFacts] = {}
        for name in view.names(KEYS.vms):
            spec = view.spec(name)
            if spec is None:
                continue
            owner, rev = view.owner(name)
            vms[name] = rc.VmFacts(spec=spec, owner=owner, owner_rev=rev,
                                   status=view.status(name))
        local = {
            name: rc.LocalFacts(role=rc.LocalRole.PRIMARY, run_state="running",
                                token=c.token, migration=None, pid=c.pid, since=c.since,
                                ha=name in n.markers)
            for name, c in n.copies.items()
        }
        return rc.Snapshot(node=n.name, vms=vms, migrations={}, local=local,
                           busy=frozenset(n.tasks), held=frozenset(),
                           lease_valid=n.guard.valid())

    async def cycle(self, n: SimNode) -> None:
        plan = rc.decide(self.snapshot(n))
        for action in plan.actions:
            await self.act(n, action)
        if plan.actions:
            self.trace(n.name, f"cycle: {plan.reason}")
        if "cycle" not in n.timers:
            self.timer(n, "cycle", self.now + self.timing.resync_s)

    async def act(self, n: SimNode, action: rc.Action) -> None:
        """Agent._act. Operations run as tasks: the VM is busy until their last step."""
        match action:
            case rc.StartVm(vm=vm, token=token):
                self.spawn(n, vm, self.u(self.lat.rpc),
                           functools.partial(self.start_checked, n, vm, token))
            case rc.StopVm(vm=vm):
                self.spawn(n, vm, self.u(self.lat.stop),
                           functools.partial(self.op_end_copy, n, vm, "stopped"))
            case rc.KillVm(vm=vm, why=why):
                self.spawn(n, vm, self.u(self.lat.kill),
                           functools.partial(self.op_end_copy, n, vm, f"killed: {why}"))
            case rc.ReportStatus(vm=vm, status=status):
                with contextlib.suppress(StoreError):
                    await self.report_status(n, vm, status)
            case rc.ArmHa(vm=vm, owner_rev=rev, on=on):
                had_local = vm in n.copies
                if on and had_local:
                    n.markers.add(vm)
                    self.poke_watchdog(n)
                self.spawn(n, vm, self.u(self.lat.rpc),
                           functools.partial(self.arm_cas, n, vm, rev, on, had_local))
            case rc.ReleaseVm(vm=vm, owner_rev=rev):
                self.spawn(n, vm, self.u(self.lat.rpc),
                           functools.partial(self.release, n, vm, rev))
            case rc.SetMarker(vm=vm, on=on):
                if on:
                    n.markers.add(vm)
                    self.poke_watchdog(n)
                else:
                    n.markers.discard(vm)
            case _:
                raise AssertionError(f"not modelled: {action}")

    def spawn(self, n: SimNode, vm: str, delay: float, step: Step) -> None:
        """Agent._spawn: the VM is busy until the operation's last step."""
        n.tasks.add(vm)
        self.op_next(n, vm, delay, step)

    def op_next(self, n: SimNode, vm: str, delay: float, step: Step) -> None:
        n.ops[vm] = step
        self.timer(n, f"op:{vm}", self.now + delay)

    def op_done(self, n: SimNode, vm: str) -> None:
        n.tasks.discard(vm)
        self.wake_cycle(n)

    async def op_end_copy(self, n: SimNode, vm: str, why: str) -> None:
        if vm in n.copies:
            self.end_copy(n, vm, why)
        self.op_done(n, vm)

    async def start_checked(self, n: SimNode, vm: str, token: int) -> None:
        """Agent._start up to runtime.start: STARTING reported first (a stop that the owner
        read misses then finds it and reads "stopping"), the owner record read now, the
        lease valid; else the STARTING status is withdrawn."""
        spec = n.view.spec(vm)
        if spec is None:
            self.op_done(n, vm)
            return
        lease = n.guard.lease  # Agent._start: the start is valid under this lease only
        starting = VmStatus(node=n.name, state=VmState.STARTING, token=token,
                            since=self.wall())
        try:
            await self.report_status(n, vm, starting)
            entry = await n.store.get(KEYS.vm_owner(vm))
        except StoreError:  # the task fails
            self.op_done(n, vm)
            return
        owner = codec.decode(Owner, entry.value) if entry is not None else None
        if owner is None or entry is None or owner.node != n.name or (
                owner.power is not Power.ON) or owner.token(entry.mod_revision) != token or (
                not (n.guard.valid() and n.guard.lease == lease)):
            await self.withdraw_status(n, vm, starting)
            self.op_done(n, vm)
            return
        # Runtime.start: taps, the marker (ha=owner.ha) and meta before QEMU is spawned
        if owner.ha:
            n.markers.add(vm)
        else:
            n.markers.discard(vm)
        n.spawning.add(vm)
        self.op_next(n, vm, self.u(self.lat.start),
                     functools.partial(self.start_spawn, n, vm, token, starting, lease))

    async def start_spawn(self, n: SimNode, vm: str, token: int, starting: VmStatus,
                          lease: int) -> None:
        """Runtime.start's end: ``may_start`` (the lease guard) asked once more, then QEMU is
        spawned at once (no await in between); Unavailable -> the status is withdrawn."""
        n.spawning.discard(vm)
        if not (n.guard.valid() and n.guard.lease == lease):  # may_start
            self.trace(n.name, f"{vm}: not started: the lease is no longer valid")
            await self.withdraw_status(n, vm, starting)
            self.op_done(n, vm)
            return
        self.start_copy(n, vm, token)
        self.op_next(n, vm, self.u(self.lat.rpc),
                     functools.partial(self.start_reported, n, vm, token))

    async def start_reported(self, n: SimNode, vm: str, token: int) -> None:
        """Agent._start after runtime.start returned (QMP attached): report the status."""
        c = n.copies.get(vm)
        if c is not None:
            with contextlib.suppress(StoreError):
                await self.report_status(n, vm, VmStatus(
                    node=n.name, state=VmState.RUNNING, token=token, pid=c.pid,
                    since=c.since))
        self.op_done(n, vm)

    async def release(self, n: SimNode, vm: str, rev: int) -> None:
        """AgentContext.release: the owner record back to nobody, with this node's status."""
        key = KEYS.vm_owner(vm)
        ops: list[TxnOp] = [Put(key, codec.encode(Owner(node=None, power=Power.OFF)))]
        status = n.view.status(vm)
        if status is not None and status.node == n.name:
            ops.append(Delete(KEYS.vm_status(vm)))
        with contextlib.suppress(StoreError):
            await n.store.txn([Compare.unchanged(key, rev)], ops)
        self.op_done(n, vm)

    async def withdraw_status(self, n: SimNode, vm: str, status: VmStatus) -> None:
        """AgentContext.withdraw_status: remove ``status`` if it is still the one stored."""
        key = KEYS.vm_status(vm)
        with contextlib.suppress(StoreError):
            await n.store.txn([Compare.value_is(key, codec.encode(status))], [Delete(key)])

    async def arm_cas(self, n: SimNode, vm: str, rev: int, on: bool, had_local: bool) -> None:
        """Agent._arm after the marker: compare-and-swap owner.ha."""
        key = KEYS.vm_owner(vm)
        try:
            entry = await n.store.get(key)
            if entry is not None and entry.mod_revision == rev:
                owner = codec.decode(Owner, entry.value)
                res = await n.store.txn([Compare.unchanged(key, rev)],
                                        [Put(key, codec.encode(owner.amend(rev, ha=on)))])
                if res.succeeded:
                    self.trace(n.name, f"{vm}: HA {'armed' if on else 'disarmed'}")
                    if not on and had_local:
                        n.markers.discard(vm)
        except StoreError:
            pass
        self.op_done(n, vm)

    async def report_status(self, n: SimNode, vm: str, status: VmStatus | None) -> None:
        """AgentContext.report_status: on the node's lease; clearing compares the value."""
        key = KEYS.vm_status(vm)
        if status is not None:
            await n.store.put(key, codec.encode(status), lease=n.lease)
            return
        current = n.view.status(vm)
        if current is None or current.node != n.name:
            return
        raw = n.view.entries.get(key)
        if raw is None:
            return
        with contextlib.suppress(StoreError):
            await n.store.txn([Compare(key, Target.VALUE, Op.EQUAL, raw.value)], [Delete(key)])

    # -- QEMU on the simulated hosts --------------------------------------------------------

    def start_copy(self, n: SimNode, vm: str, token: int) -> None:
        assert vm not in n.copies, f"{vm} already runs on {n.name}"
        run = Run(vm=vm, node=n.name, token=token, started=self.now)
        self.result.runs.append(run)
        n.copies[vm] = Copy(token=token, pid=next(self.next_pid), since=self.wall(), run=run)
        marker = " (HA marker)" if vm in n.markers else ""
        self.trace(n.name, f"{vm}: QEMU runs, token {token}{marker}")
        if marker:
            self.poke_watchdog(n)
        # (2) the fencing token never goes back
        if token < self.max_token.get(vm, 0):
            self.violate(f"{vm} started on {n.name} under token {token}, lower than"
                         f" {self.max_token[vm]} that ran before")
        self.max_token[vm] = max(token, self.max_token.get(vm, 0))

    def end_copy(self, n: SimNode, vm: str, why: str) -> None:
        c = n.copies.pop(vm)
        n.markers.discard(vm)  # Runtime._forget removes the run directory
        c.run.ended = self.now
        c.run.why_ended = why
        self.trace(n.name, f"{vm}: QEMU gone ({why})")

    # -- checks on the manager's writes ---------------------------------------------------

    def manager_txn_before(self, ops: Sequence[TxnOp]) -> dict[str, Any]:
        before: dict[str, Any] = {"manager": self.store._kv.get(MANAGER_KEY)}
        for op in ops:
            if isinstance(op, Put) and op.key.endswith("/owner"):
                e = self.store._kv.get(op.key)
                before[op.key] = codec.decode(Owner, e.value) if e else None
        return before

    def manager_txn_after(self, node: SimNode, compares: Sequence[Compare],
                          ops: Sequence[TxnOp], before: dict[str, Any]) -> None:
        mk: Entry | None = before["manager"]
        campaign = [c for c in compares if c.key == MANAGER_KEY] == [
            Compare.absent(MANAGER_KEY)]
        if campaign:
            if mk is not None:
                self.violate(f"{node.name} took the manager key while {mk.value} held it")
        elif mk is None or mk.value != node.name or mk.create_revision != node.manager.term:
            holder = f"{mk.value} (term {mk.create_revision})" if mk else "nobody"
            self.violate(f"{node.name} (term {node.manager.term}) wrote as manager while"
                         f" {holder} is manager: {[op.key for op in ops]}")
        for op in ops:
            if not (isinstance(op, Put) and op.key.endswith("/owner")):
                continue
            vm = op.key[len(KEYS.vms):].split("/", 1)[0]
            old: Owner | None = before.get(op.key)
            new = codec.decode(Owner, op.value)
            if old is None or old.node == new.node:
                continue
            self.result.recoveries += 1
            self.trace(node.name, f"{vm}: recovered {old.node} -> {new.node}")
            # (3) the source's copy is dead before the recovery commits
            src = self.nodes.get(old.node or "")
            if src is not None and vm in src.copies:
                self.violate(f"{vm} recovered from {old.node} to {new.node} while it still"
                             f" runs on {old.node}")

    # -- faults ------------------------------------------------------------------------

    def power_on(self, n: SimNode, delay: float = 0.0) -> None:
        n.powered = True
        n.new_agent()
        self.timer(n, "boot", self.now + delay)

    def power_off(self, n: SimNode) -> None:
        for vm in sorted(n.copies):
            self.end_copy(n, vm, "power off")
        n.powered = False
        n.running = False
        n.booted = False
        n.frozen = False
        n.markers = set()
        n.fed_at = None
        n.tripped = False
        n.machine_epoch += 1
        n.agent_epoch += 1
        n.timers = {}

    def crash_agent(self, n: SimNode) -> None:
        n.running = False
        n.booted = False
        n.frozen = False
        n.agent_epoch += 1
        n.timers = {}

    async def thaw(self, n: SimNode) -> None:
        """SIGCONT: the deadline guard runs first (its timer is the oldest due), then the
        rest of what became due meanwhile, in their order."""
        if not n.frozen:
            return
        n.frozen = False
        deferred, n.deferred = n.deferred, []
        self.trace(n.name, f"agent thawed ({len(deferred)} tasks due)")
        if n.booted and n.guard.state is LeaseState.VALID and not n.guard.valid():
            self.self_fence(n)
        for i, (name, _) in enumerate(sorted(deferred, key=lambda d: d[1])):
            self.timer(n, name, self.now + 1e-4 * (i + 1))

    def resolve(self, target: str) -> SimNode:
        if target == "@manager":
            mk = self.store._kv.get(MANAGER_KEY)
            if mk is not None and mk.value in self.nodes:
                return self.nodes[mk.value]
            return self.nodes[self.rng.choice(sorted(self.nodes))]
        return self.nodes[target]

    async def fault(self, f: Fault) -> None:
        if self.healed:
            return
        self.result.faults += 1
        if f.kind == "etcd":
            if self.etcd_down:
                return
            self.trace("etcd", f"leader change: unreachable for {f.duration:.2f}s")
            self.etcd_down = True
            self.store.set_reachable(False)
            for n in self.nodes.values():
                self.broken_watch(n)
            self.at(self.clock() + f.duration, self.etcd_back)
            return
        if f.kind in ("stop", "start", "ha-add", "ha-remove"):
            await self.user_op(f)
            return
        n = self.resolve(f.target)
        if not n.powered or (f.kind == "isolate" and n.isolated) or (
                f.kind == "freeze" and (n.frozen or not n.running)) or (
                f.kind == "crash" and not n.running):  # kill -9 works on a frozen agent
            self.trace(n.name, f"fault {f.kind}: no effect now")
            return
        self.trace(n.name, f"FAULT {f.kind} {f.duration:.2f}s")
        if f.kind == "power-off":
            self.power_off(n)
            if f.duration > 0:
                self.at(self.clock() + f.duration, functools.partial(self.end_power_off, n,
                                                                     n.machine_epoch))
        elif f.kind == "isolate":
            n.isolated = True
            self.broken_watch(n)
            self.at(self.clock() + f.duration, functools.partial(self.end_isolation, n))
        elif f.kind == "freeze":
            n.frozen = True
            epoch = n.agent_epoch
            self.at(self.clock() + f.duration, functools.partial(self.end_freeze, n, epoch))
        elif f.kind == "crash":
            self.crash_agent(n)
            epoch = n.machine_epoch
            self.at(self.clock() + f.duration, functools.partial(self.end_crash, n, epoch))
        else:
            raise AssertionError(f.kind)

    async def end_power_off(self, n: SimNode, epoch: int) -> None:
        if not self.healed and not n.powered and n.machine_epoch == epoch:
            self.trace(n.name, "power on")
            self.power_on(n)

    async def end_isolation(self, n: SimNode) -> None:
        if n.isolated:
            self.trace(n.name, "reconnected")
            n.isolated = False

    async def end_freeze(self, n: SimNode, epoch: int) -> None:
        if n.agent_epoch == epoch:
            await self.thaw(n)

    async def end_crash(self, n: SimNode, epoch: int) -> None:
        if not self.healed and n.powered and not n.running and n.machine_epoch == epoch:
            self.trace(n.name, "agent restarts")
            n.new_agent()
            self.timer(n, "boot", self.now)

    async def etcd_back(self) -> None:
        """A new etcd leader: every lease renewed to its full TTL (etcd's Promote)."""
        if not self.etcd_down:
            return
        self.etcd_down = False
        # MemoryStore has no call for this (a keepalive would first expire what is due):
        # set the deadlines, as etcd's new leader does (lessor.Promote).
        for lease in self.store._leases.values():
            lease.deadline = self.clock() + lease.ttl
        self.store.set_reachable(True)
        self.trace("etcd", "leader elected: leases renewed")

    async def user_op(self, f: Fault) -> None:
        cl = self.user
        try:
            if f.kind == "stop":
                await vm_ctl.stop_vm(cl, f.target)
            elif f.kind == "start":
                if self.masks.start_while_stopping and await self._still_there(f.target):
                    self.trace("user", f"start {f.target}: skipped (bug 5 masked): its"
                               " previous node still runs it")
                    return
                await vm_ctl.start_vm(cl, f.target)
            elif f.kind == "ha-add":
                nodes = sorted(self.nodes)
                pref = tuple(self.rng.sample(nodes, self.rng.randint(0, 2)))
                prio = self.rng.choice(list(HaPriority))
                await ha_ctl.set_ha(cl, f.target, priority=prio, preferred_nodes=pref)
            elif f.kind == "ha-remove":
                await ha_ctl.remove_ha(cl, f.target)
        except FerryError as err:
            self.trace("user", f"{f.kind} {f.target}: refused: {err}")
            return
        self.trace("user", f"{f.kind} {f.target}")

    async def _still_there(self, vm: str) -> bool:
        """An oracle for the masked bug 5: the VM's previous owner runs or spawns a copy."""
        owner, _ = await self.user.owner(vm)
        prev = self.nodes.get(owner.node or "")
        return prev is not None and (vm in prev.copies or vm in prev.spawning)

    async def heal(self) -> None:
        """Every fault ends; nodes in dead_at_end are powered off for good."""
        self.trace("*", "HEAL: every fault ends")
        self.healed = True
        if self.etcd_down:
            await self.etcd_back()
        for n in self.nodes.values():
            if n.name in self.scenario.dead_at_end:
                if n.powered:
                    self.power_off(n)
                continue
            n.isolated = False
            if not n.powered:
                self.power_on(n)
            elif not n.running:
                n.new_agent()
                self.timer(n, "boot", self.now)
            elif n.frozen:
                await self.thaw(n)
        self.at(self.clock() + 0.5, self.liveness_tick)

    async def liveness_tick(self) -> None:
        if self.check_liveness(final=False):
            self.result.recovered_at = self.now - self.scenario.heal_at
            self.done_at = self.now + self.scenario.settle
            self.trace("*", f"every VM that should run runs ({self.result.recovered_at:.2f}s"
                       " after the heal)")
            return
        self.at(self.clock() + 0.5, self.liveness_tick)

    def check_liveness(self, *, final: bool) -> bool:
        """(5) every VM that should run runs: on its owner if that node is up, else (HA and
        armed) somewhere; an HA VM never armed on a dead node stays down by design."""
        missing = []
        up = {n for n in self.nodes if n not in self.scenario.dead_at_end}
        used = dict.fromkeys(sorted(up), 0)
        homeless: list[Homeless] = []
        for key, e in sorted(self.store._kv.items()):
            if not (key.startswith(KEYS.vms) and key.endswith("/owner")):
                continue
            vm = key[len(KEYS.vms):].split("/", 1)[0]
            owner = codec.decode(Owner, e.value)
            if owner.power is not Power.ON or owner.node is None:
                continue
            spec_e = self.store._kv.get(KEYS.vm_spec(vm))
            if spec_e is None:
                continue
            spec = codec.decode(VmSpec, spec_e.value)
            if owner.node in up:
                used[owner.node] += spec.memory_mib
                c = self.nodes[owner.node].copies.get(vm)
                if c is None or c.token != owner.token(e.mod_revision):
                    missing.append(f"{vm} (owner {owner.node})")
            elif spec.ha is not None and owner.ha:
                homeless.append(Homeless(vm=vm, memory_mib=spec.memory_mib, policy=spec.ha))
        # "given capacity": an armed HA VM of a dead node must have moved if it fits
        loads = [NodeLoad(name=n, up=True, memory_mib=self.scenario.node_memory_mib,
                          used_mib=used[n]) for n in sorted(up)]
        placed, _ = place_all(homeless, loads)
        missing += [f"{vm} (HA, armed, still on a dead node)" for vm in sorted(placed)]
        if missing and final:
            self.violate(f"not running {self.timing.bound():.1f}s after the heal: "
                         + ", ".join(missing))
        return not missing


_DECODE = codec.decode
_memo_decode = functools.lru_cache(maxsize=1 << 16)(_DECODE)


def _decode(cls: Any, text: Any) -> Any:
    return _memo_decode(cls, text)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Ferry's logging and memoize JSON decoding while simulating (decode is pure
    and its results are frozen dataclasses; decoding is where the simulation spends most of
    its time otherwise)."""
    logger = logging.getLogger("ferry")
    level = logger.level
    original = codec.decode
    logger.setLevel(logging.CRITICAL + 1)
    codec.decode = _decode
    try:
        yield
    finally:
        codec.decode = original
        logger.setLevel(level)


def simulate(scenario: Scenario, *, seed: int = 0, masks: Masks = Masks(),
             trace: bool = True) -> Result:
    return asyncio.run(Simulation(scenario, seed=seed, trace=trace, masks=masks).run())


# -- random schedules --------------------------------------------------------------------

@dataclass(frozen=True)
class Chaos:
    """What random schedules draw from."""

    nodes: tuple[int, int] = (3, 4)
    ha_vms: tuple[int, int] = (2, 4)
    plain_vms: tuple[int, int] = (1, 2)
    chaos: tuple[float, float] = (12.0, 25.0)  # the heal comes this long after the start
    faults: tuple[int, int] = (2, 7)
    kinds: tuple[str, ...] = FAULT_KINDS
    manager_bias: float = 0.3  # chance that a node fault hits the manager
    leave_dead: float = 0.3  # chance that one node stays dead after the heal
    timing: Timing = Timing()
    latency: Latency = Latency(unknown_outcome=0.01)
    masks: Masks = Masks()
    scale: float = 1.0  # times and durations of faults (e.g. T/4 for other lease TTLs)


def random_scenario(seed: int, chaos: Chaos = Chaos()) -> Scenario:
    r = random.Random(seed)
    nodes = tuple(f"n{i + 1}" for i in range(r.randint(*chaos.nodes)))
    vms: list[VmDef] = []
    for i in range(r.randint(*chaos.ha_vms)):
        pref = tuple(r.sample(nodes, r.randint(0, 2))) if r.random() < 0.5 else ()
        vms.append(VmDef(name=f"ha{i + 1}", memory_mib=r.choice((128, 256, 512)),
                         ha=HaPolicy(priority=r.choice(list(HaPriority)),
                                     preferred_nodes=pref),
                         node=r.choice(nodes)))
    for i in range(r.randint(*chaos.plain_vms)):
        vms.append(VmDef(name=f"vm{i + 1}", memory_mib=r.choice((128, 256)), ha=None,
                         node=r.choice(nodes)))
    k = chaos.scale
    heal = r.uniform(*chaos.chaos) * k
    faults: list[Fault] = []
    node_kinds = [k for k in ("power", "isolate", "freeze", "crash") if k in chaos.kinds]
    for _ in range(r.randint(*chaos.faults)):
        pick = r.choice(chaos.kinds)
        at = r.uniform(0.3, heal - 0.5)
        if pick == "etcd":
            faults.append(Fault(at, "etcd", "", r.uniform(0.5, 1.5)))  # not scaled
            continue
        if pick == "user":
            vm = r.choice(vms).name
            kind = r.choice(("stop", "stop", "start", "ha-add", "ha-remove"))
            faults.append(Fault(at, kind, vm))
            if kind == "stop" and r.random() < 0.7:  # and start it again, anywhere
                faults.append(Fault(min(heal - 0.1, at + r.uniform(0.5, 10.0) * k), "start",
                                    vm))
            continue
        if not node_kinds:
            continue
        target = "@manager" if r.random() < chaos.manager_bias else r.choice(nodes)
        if pick == "power":
            faults.append(Fault(at, "power-off", target,
                                0.0 if r.random() < 0.3 else r.uniform(1.0, 15.0) * k))
        elif pick == "isolate":
            faults.append(Fault(at, "isolate", target, r.uniform(0.5, 12.0) * k))
        elif pick == "freeze":
            faults.append(Fault(at, "freeze", target, r.uniform(0.5, 10.0) * k))
        elif pick == "crash":
            faults.append(Fault(at, "crash", target, r.uniform(0.1, 5.0) * k))
    dead = (r.choice(nodes),) if r.random() < chaos.leave_dead else ()
    return Scenario(nodes=nodes, vms=tuple(vms),
                    faults=tuple(sorted(faults, key=lambda f: f.at)), heal_at=heal,
                    dead_at_end=dead, timing=chaos.timing, latency=chaos.latency)


@dataclass
class Totals:
    schedules: int = 0
    steps: int = 0
    faults: int = 0
    recoveries: int = 0
    copies: int = 0
    worst_recovery_s: float = 0.0
    spurious_kills: int = 0
    failures: list[Result] = field(default_factory=list)

    def add(self, r: Result) -> None:
        self.schedules += 1
        self.spurious_kills += r.spurious_kills
        self.steps += r.steps
        self.faults += r.faults
        self.recoveries += r.recoveries
        self.copies += len(r.runs)
        if r.recovered_at is not None:
            self.worst_recovery_s = max(self.worst_recovery_s, r.recovered_at)
        if not r.ok:
            self.failures.append(r)

    def merge(self, other: Totals) -> None:
        self.schedules += other.schedules
        self.steps += other.steps
        self.faults += other.faults
        self.recoveries += other.recoveries
        self.copies += other.copies
        self.spurious_kills += other.spurious_kills
        self.worst_recovery_s = max(self.worst_recovery_s, other.worst_recovery_s)
        self.failures += other.failures
        self.failures.sort(key=lambda r: r.seed or 0)

    def __str__(self) -> str:
        return (f"{self.schedules} schedules, {self.steps} steps, {self.faults} faults,"
                f" {self.recoveries} recoveries, {self.copies} QEMU starts, worst time to"
                f" all-running after the heal {self.worst_recovery_s:.1f}s, {self.spurious_kills}"
                f" watchdog kills on healthy nodes, {len(self.failures)} failing")


def run_one(seed: int, chaos: Chaos = Chaos(), *, trace: bool = True) -> Result:
    sim = Simulation(random_scenario(seed, chaos), seed=seed, label=seed, trace=trace,
                     masks=chaos.masks)
    return asyncio.run(sim.run())


def _run_chunk(seeds: Sequence[int], chaos: Chaos, stop_after: int) -> Totals:
    totals = Totals()

    async def main() -> None:
        for seed in seeds:
            sim = Simulation(random_scenario(seed, chaos), seed=seed, label=seed,
                             trace=False, masks=chaos.masks)
            result = await sim.run()
            if not result.ok:  # again, with its trace
                result = await Simulation(random_scenario(seed, chaos), seed=seed,
                                          label=seed, masks=chaos.masks).run()
            totals.add(result)
            if stop_after and len(totals.failures) >= stop_after:
                return

    asyncio.run(main())
    return totals


def run_seeds(seeds: Sequence[int], chaos: Chaos = Chaos(), *, workers: int = 1,
              stop_after: int = 0) -> Totals:
    """Run each seed's random schedule, in ``workers`` processes (forked); a failing seed
    is run again with its trace. ``stop_after`` failures per worker (0: never stop)."""
    seeds = list(seeds)
    if workers <= 1 or len(seeds) < 2 * workers:
        return _run_chunk(seeds, chaos, stop_after)
    import multiprocessing

    chunks = [seeds[i::workers] for i in range(workers)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = pool.starmap(_run_chunk, [(c, chaos, stop_after) for c in chunks])
    totals = Totals()
    for part in parts:
        totals.merge(part)
    return totals

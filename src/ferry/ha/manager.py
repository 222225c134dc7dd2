"""The cluster manager: one agent, elected, restarts the HA VMs of dead nodes.

Election is Patroni's: create the manager key if absent, bound to the agent's own lease.
The key's create_revision is the manager's *term*; every write the manager makes is a
transaction that also compares the manager key's create_revision to its term, so a manager
that lost its lease (paused, cut off) cannot write anything once another has taken over.

Each ``step`` is level-triggered: read the cluster from one snapshot of the keys, decide
(``recovery.decide``, pure), carry the actions out, return a one-line reason. Then it admits
queued migrations (``migration.scheduler``, pure) within the cluster's migration limits.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from ferry.ha import recovery as rv
from ferry.ha.events import event_put
from ferry.migration import scheduler
from ferry.model import codec
from ferry.model.cluster import ClusterConfig
from ferry.model.errors import InvalidSpec, StoreError
from ferry.model.ha import EventKind, FenceRecord
from ferry.model.migration import MigrationPhase, MigrationRecord
from ferry.model.node import NodeInfo
from ferry.model.policy import MigrationLimits
from ferry.model.vm import Owner, Power, VmSpec
from ferry.store.base import ClusterStore, Compare, Delete, Entry, Op, Put, Target, TxnOp
from ferry.store.keys import Keys

log = logging.getLogger("ferry.ha.manager")

EVENTS_KEPT = 1000


class ManagerState(enum.Enum):
    STANDBY = "standby"
    ACTIVE = "active"


def read_facts(keys: Keys, entries: Mapping[str, Entry]) -> rv.ClusterFacts:
    """The cluster as the manager needs it, from a snapshot of its keys."""
    nodes: dict[str, rv.NodeFacts] = {}
    vms: dict[str, rv.OwnedVm] = {}
    migrations: dict[str, tuple[MigrationRecord, int]] = {}
    for key, e in entries.items():
        parsed = keys.parse(key)
        if parsed is None:
            continue
        kind, name, leaf = parsed
        try:
            if kind == "nodes" and leaf == "info":
                info = codec.decode(NodeInfo, e.value)
                nodes[name] = rv.NodeFacts(
                    info=info, alive=keys.node_alive(name) in entries,
                    fenced=keys.node_fenced(name) in entries,
                    paused=keys.node_paused(name) in entries)
            elif kind == "vms" and leaf == "spec":
                owner_e = entries.get(keys.vm_owner(name))
                if owner_e is not None:
                    vms[name] = rv.OwnedVm(spec=codec.decode(VmSpec, e.value),
                                           owner=codec.decode(Owner, owner_e.value),
                                           owner_rev=owner_e.mod_revision)
            elif kind == "migrations" and leaf == "record":
                migrations[name] = (codec.decode(MigrationRecord, e.value), e.mod_revision)
        except InvalidSpec as err:
            log.error("manager: ignoring malformed %s: %s", key, err)
    return rv.ClusterFacts(nodes=nodes, vms=vms, migrations=migrations)


class Manager:
    def __init__(self, *, node: str, store: ClusterStore, keys: Keys, base_delay: float,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.node = node
        self.store = store
        self.keys = keys
        self.base_delay = base_delay
        self.clock = clock
        self.wall = wall
        self.state = ManagerState.STANDBY
        self.term = 0
        self.down_since: dict[str, float] = {}
        self._said: dict[str, str] = {}  # vm -> the last "not recovered" reason told
        self._pruned_at = 0.0
        self._taking: dict[str, tuple[str, ...]] = {}  # this step: dead node -> VMs moved
        self._waits: dict[str, str] = {}  # queued migration -> why it waited at the last step

    def _become(self, new: ManagerState, why: str) -> None:
        if new is not self.state:
            log.info("manager %s: %s -> %s (%s)", self.node, self.state.value, new.value, why)
            self.state = new
        if new is ManagerState.STANDBY:
            # The fence delay starts again under a new manager (design/ha.md).
            self.down_since.clear()
            self._said.clear()

    def _guard(self) -> Compare:
        return Compare(self.keys.manager, Target.CREATE, Op.EQUAL, self.term)

    def event(self, kind: EventKind, message: str, *, node: str = "", vm: str = "") -> Put:
        return event_put(self.keys, kind=kind, message=message, by=self.node, node=node, vm=vm,
                         at=self.wall())

    async def _write(self, ops: Sequence[TxnOp], compares: Sequence[Compare] = ()) -> bool:
        res = await self.store.txn([self._guard(), *compares], ops)
        return res.succeeded

    async def step(self, entries: Mapping[str, Entry], *, lease: int) -> str:
        """One cycle on a snapshot of the cluster's keys; returns why it did what it did."""
        if not await self._lead(entries, lease):
            holder = entries.get(self.keys.manager)
            return f"standby (manager: {holder.value if holder else 'none'})"
        facts = read_facts(self.keys, entries)
        plan = rv.decide(facts, now=self.clock(), down_since=self.down_since,
                         base_delay=self.base_delay)
        self._taking = {}
        for a in plan.actions:
            if isinstance(a, rv.Recover):
                self._taking[a.source] = (*self._taking.get(a.source, ()), a.vm)
        for action in plan.actions:
            await self._act(action, entries)
        admitted = await self._admit(facts, entries)
        await self._prune(entries)
        return "; ".join([plan.reason, *admitted])

    async def _lead(self, entries: Mapping[str, Entry], lease: int) -> bool:
        current = entries.get(self.keys.manager)
        if current is not None:
            if current.value == self.node and current.create_revision == self.term:
                self._become(ManagerState.ACTIVE, "holds the manager key")
                return True
            if current.value == self.node and lease and await self._adopt(lease):
                return True
            self._become(ManagerState.STANDBY, f"{current.value} is manager")
            return False
        if lease == 0:
            return False
        try:
            res = await self.store.txn(
                [Compare.absent(self.keys.manager)],
                [Put(self.keys.manager, self.node, lease=lease)])
        except StoreError as err:
            log.warning("manager %s: campaign failed: %s", self.node, err)
            return False
        if not res.succeeded:
            return False
        self.term = res.revision
        self._become(ManagerState.ACTIVE, f"elected, term {self.term}")
        self.down_since.clear()
        await self._write([self.event(EventKind.MANAGER, f"{self.node} is the manager",
                                      node=self.node)])
        return True

    async def _adopt(self, lease: int) -> bool:
        """Our name on the key, but not our term: a campaign whose answer was lost (applied,
        then the reply timed out), or a key of an earlier run of this agent. It is ours if
        it is bound to our current lease (read from the store: the watch copy has no lease)."""
        try:
            entry = await self.store.get(self.keys.manager)
        except StoreError:
            return False
        if entry is None or entry.value != self.node or entry.lease != lease:
            return False
        self.term = entry.create_revision
        self._become(ManagerState.ACTIVE, f"adopted its own key, term {self.term}")
        self.down_since.clear()
        return True

    async def _act(self, action: rv.ManagerAction, entries: Mapping[str, Entry]) -> None:
        match action:
            case rv.NoteDown(node=node):
                self.down_since[node] = self.clock()
                await self._write([self.event(EventKind.NODE_DOWN,
                                              f"{node} is down: its lease is gone", node=node)])
            case rv.NoteUp(node=node):
                self.down_since.pop(node, None)
                await self._write([self.event(EventKind.NODE_UP, f"{node} is up", node=node)])
            case rv.Fence(node=node):
                await self._fence(node)
            case rv.Stranded(vm=vm, node=node, why=why):
                if self._said.get(vm) != why:
                    self._said[vm] = why
                    log.warning("manager: %s not recovered: %s", vm, why)
                    await self._write([self.event(EventKind.NOT_RECOVERED,
                                                  f"{vm} not recovered: {why}", node=node, vm=vm)])
            case rv.Recover():
                await self._recover(action, entries)

    async def _fence(self, node: str, vms: tuple[str, ...] = ()) -> None:
        rec = FenceRecord(at=self.wall(), by=self.node, vms=vms)
        ok = await self._write(
            [Put(self.keys.node_fenced(node), codec.encode(rec)),
             self.event(EventKind.NODE_FENCED, f"{node} fenced: down past its fence delay",
                        node=node)],
            [Compare.absent(self.keys.node_alive(node))])
        if ok:
            log.warning("manager: %s fenced", node)

    async def _recover(self, a: rv.Recover, entries: Mapping[str, Entry]) -> None:
        """One transaction: the dead node is still dead, the VM's owner record is the one we
        decided on, the target is up, we are still manager; then the VM has a new owner."""
        keys = self.keys
        ops: list[TxnOp] = [
            Put(keys.vm_owner(a.vm), codec.encode(Owner(node=a.target, power=Power.ON, ha=True))),
            Put(keys.node_fenced(a.source), codec.encode(FenceRecord(
                at=self.wall(), by=self.node, vms=self._taking.get(a.source, (a.vm,))))),
            self.event(EventKind.RECOVERED, f"{a.vm} restarts on {a.target}: {a.source} is"
                       " down and fenced", node=a.target, vm=a.vm),
        ]
        compares = [Compare.absent(keys.node_alive(a.source)),
                    Compare.unchanged(keys.vm_owner(a.vm), a.owner_rev),
                    Compare.exists(keys.node_alive(a.target))]
        ended = self._end_migration(a, entries)
        if ended is not None:
            ops.append(ended[0])
            compares.append(ended[1])
        if await self._write(ops, compares):
            log.warning("manager: %s recovered %s -> %s", a.vm, a.source, a.target)
            self._said.pop(a.vm, None)
        else:
            log.info("manager: recovery of %s skipped: the cluster changed", a.vm)

    def _end_migration(self, a: rv.Recover, entries: Mapping[str, Entry]
                       ) -> tuple[Put, Compare] | None:
        if a.migration is None:
            return None
        key = self.keys.migration_record(a.migration)
        e = entries.get(key)
        if e is None:
            return None
        rec = codec.decode(MigrationRecord, e.value)
        if rec.phase.terminal or rec.committed:
            return None
        why = f"source {a.source} died; {a.vm} restarted on {a.target}"
        rec = rec.advance(MigrationPhase.FAILED, at=self.wall(), node=self.node, note=why)
        failed = dataclasses.replace(rec, error=why)
        return Put(key, codec.encode(failed)), Compare.unchanged(key, e.mod_revision)

    # -- migration admission

    async def _admit(self, facts: rv.ClusterFacts, entries: Mapping[str, Entry]) -> list[str]:
        """Admit the queued migrations the scheduler lets start; returns what it admitted.

        The snapshot is the watch's copy and may not show yet what the last step admitted:
        only when it suggests admitting something are the records read again from the store
        and the decision made on those, so that the limits hold exactly."""
        limits = _limits(entries.get(self.keys.cluster_config))
        down = {n for n, f in facts.nodes.items() if not f.alive}
        recs = {mid: rec for mid, (rec, _) in facts.migrations.items()}
        plan = scheduler.schedule(recs.values(), limits, down=down)
        before, self._waits = self._waits, {mid: w.why for mid, w in plan.waiting.items()}
        for mid, why in self._waits.items():
            if before.get(mid) != why:
                log.info("manager: migration %s waits: %s", mid, why)
        if not plan.admit:
            return []
        fresh = await self._read_migrations()
        plan = scheduler.schedule((rec for rec, _ in fresh.values()), limits, down=down)
        done = []
        for rec in plan.admit:
            if await self._admit_one(rec, fresh[rec.id][1], waited_for=before.get(rec.id)):
                done.append(f"admitted migration {rec.id} ({rec.vm} {rec.source} ->"
                            f" {rec.target})")
        return done

    async def _read_migrations(self) -> dict[str, tuple[MigrationRecord, int]]:
        entries, _ = await self.store.get_prefix(self.keys.migrations)
        out: dict[str, tuple[MigrationRecord, int]] = {}
        for e in entries:
            parsed = self.keys.parse(e.key)
            if parsed is None or parsed[2] != "record":
                continue
            try:
                out[parsed[1]] = (codec.decode(MigrationRecord, e.value), e.mod_revision)
            except InvalidSpec as err:
                log.error("manager: ignoring malformed %s: %s", e.key, err)
        return out

    async def _admit_one(self, rec: MigrationRecord, rev: int, *, waited_for: str | None
                         ) -> bool:
        """One transaction: still manager, the record unchanged (not cancelled meanwhile).
        The timeline says how long it queued and, if it had to wait, why."""
        now = self.wall()
        waited = f"admitted after {max(0.0, now - rec.created_at):.1f} s in the queue"
        note = f"{waited} (it waited: {waited_for})" if waited_for else waited
        admitted = dataclasses.replace(rec.note(at=now, node=self.node, note=note),
                                       admitted_at=now)
        key = self.keys.migration_record(rec.id)
        if not await self._write([Put(key, codec.encode(admitted))],
                                 [Compare.unchanged(key, rev)]):
            log.info("manager: admission of migration %s skipped: it changed", rec.id)
            return False
        log.info("manager: migration %s (%s %s -> %s) %s", rec.id, rec.vm, rec.source,
                 rec.target, note)
        return True

    async def _prune(self, entries: Mapping[str, Entry]) -> None:
        now = self.clock()
        if now - self._pruned_at < 60:
            return
        self._pruned_at = now
        events = sorted(k for k in entries if k.startswith(self.keys.events))
        for key in events[:-EVENTS_KEPT]:
            await self.store.txn([self._guard()], [Delete(key)])


def _limits(entry: Entry | None) -> MigrationLimits:
    if entry is None:
        return MigrationLimits()
    try:
        return codec.decode(ClusterConfig, entry.value).migration_limits
    except InvalidSpec as err:
        log.error("manager: malformed cluster configuration, default migration limits: %s",
                  err)
        return MigrationLimits()

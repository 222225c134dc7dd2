"""The manager against a MemoryStore: election, fencing of deposed managers, recovery.

The store's ManualClock (``c.clock``) runs the leases and is never advanced here; the
manager gets a clock of its own for its fence delays, so that waiting past a delay never
expires a lease by accident.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.control.migrations import request_migration
from ferry.control.vms import create_vm, start_vm, stop_vm
from ferry.ha import manager as manager_mod
from ferry.ha.events import event_put
from ferry.ha.manager import Manager, ManagerState, read_facts
from ferry.model import codec
from ferry.model.ha import Event, EventKind, FenceRecord, HaPolicy
from ferry.model.migration import MigrationPhase, MigrationRecord
from ferry.model.vm import Owner, Power
from ferry.store.base import Entry
from ferry.store.memory import ManualClock
from tests.unit.control_harness import Cluster, make_cluster

BASE = 4.0  # the harness's nodes publish watchdog_s=0: their fence delay is BASE
MiB = 1024**2


class Wall:
    """A wall clock for event times: one second further at every call, so that no two
    events share a key."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
async def c(tmp_path: Path) -> Cluster:
    c = await make_cluster(tmp_path)
    for n in ("node1", "node2", "node3"):
        await c.add_node(n)
    return c


@pytest.fixture
def mclock() -> ManualClock:
    return ManualClock(start=5000.0)


def manager(c: Cluster, node: str, clock: ManualClock) -> Manager:
    return Manager(node=node, store=c.store, keys=c.keys, base_delay=BASE, clock=clock,
                   wall=Wall())


def state(m: Manager) -> ManagerState:
    return m.state


async def snapshot(c: Cluster) -> dict[str, Entry]:
    entries, _ = await c.store.get_prefix(c.keys.root)
    return {e.key: e for e in entries}


async def step(m: Manager, c: Cluster, lease: int | None = None) -> str:
    return await m.step(await snapshot(c), lease=c.leases[m.node] if lease is None else lease)


async def events(c: Cluster) -> list[tuple[Event, Entry]]:
    entries, _ = await c.store.get_prefix(c.keys.events)
    return [(codec.decode(Event, e.value), e) for e in entries]


async def kinds(c: Cluster) -> list[EventKind]:
    return [ev.kind for ev, _ in await events(c)]


async def ha_vm(c: Cluster, name: str, node: str, *, armed: bool = True,
                policy: HaPolicy | None = None, memory_mib: int = 256) -> int:
    """An HA VM running on ``node`` (armed there, as its agent does); its owner revision."""
    await create_vm(c.cl, name, memory_mib=memory_mib, disk_size=MiB,
                    ha=policy or HaPolicy())
    rev = await start_vm(c.cl, name, node=node)
    await c.report(name, node, token=rev)
    if not armed:
        return rev
    owner = await c.owner(name)
    return await c.set_owner(name, owner.amend(rev, ha=True))


async def owner_entry(c: Cluster, vm: str) -> Entry:
    e = await c.store.get(c.keys.vm_owner(vm))
    assert e is not None
    return e


async def elected(c: Cluster, node: str, clock: ManualClock) -> Manager:
    m = manager(c, node, clock)
    await step(m, c)
    assert state(m) is ManagerState.ACTIVE
    return m


async def down_past_delay(c: Cluster, m: Manager, clock: ManualClock, node: str) -> None:
    """``node`` goes down, the manager notes it, and its fence delay passes."""
    await c.node_down(node)
    assert f"{node} is down" in await step(m, c)
    clock.advance(BASE)


# --- election --------------------------------------------------------------------------


async def test_the_first_campaign_wins(c: Cluster, mclock: ManualClock) -> None:
    m = manager(c, "node1", mclock)
    assert state(m) is ManagerState.STANDBY
    await step(m, c)
    assert state(m) is ManagerState.ACTIVE
    key = await c.store.get(c.keys.manager)
    assert key is not None
    assert key.value == "node1"
    assert key.lease == c.leases["node1"]
    assert m.term == key.create_revision
    ((ev, _),) = await events(c)
    assert ev.kind is EventKind.MANAGER
    assert ev.by == "node1"
    assert "node1 is the manager" in ev.message


async def test_a_second_candidate_stays_standby(c: Cluster, mclock: ManualClock) -> None:
    m1 = await elected(c, "node1", mclock)
    m2 = manager(c, "node2", mclock)
    before = c.revision
    reason = await step(m2, c)
    assert state(m2) is ManagerState.STANDBY
    assert reason == "standby (manager: node1)"
    assert c.revision == before
    assert state(m1) is ManagerState.ACTIVE
    assert (await step(m1, c)).startswith("all 3 nodes")


async def test_two_candidates_on_the_same_snapshot_one_wins(c: Cluster,
                                                            mclock: ManualClock) -> None:
    m1, m2 = manager(c, "node1", mclock), manager(c, "node2", mclock)
    entries = await snapshot(c)
    await m1.step(entries, lease=c.leases["node1"])
    reason = await m2.step(entries, lease=c.leases["node2"])
    assert state(m1) is ManagerState.ACTIVE
    assert state(m2) is ManagerState.STANDBY
    assert reason.startswith("standby")
    key = await c.store.get(c.keys.manager)
    assert key is not None and key.value == "node1"
    assert await kinds(c) == [EventKind.MANAGER]


async def test_no_campaign_without_a_lease(c: Cluster, mclock: ManualClock) -> None:
    m = manager(c, "node1", mclock)
    before = c.revision
    assert (await step(m, c, lease=0)).startswith("standby")
    assert state(m) is ManagerState.STANDBY
    assert c.revision == before


async def test_a_campaign_on_a_dead_lease_fails_quietly(c: Cluster, mclock: ManualClock
                                                        ) -> None:
    m = manager(c, "node1", mclock)
    entries = await snapshot(c)
    await c.node_down("node1")
    before = c.revision
    assert (await m.step(entries, lease=c.leases["node1"])).startswith("standby")
    assert state(m) is ManagerState.STANDBY
    assert c.revision == before


async def test_after_the_managers_lease_ends_another_takes_over_with_a_new_term(
        c: Cluster, mclock: ManualClock) -> None:
    m1 = await elected(c, "node1", mclock)
    m2 = manager(c, "node2", mclock)
    await step(m2, c)
    assert state(m2) is ManagerState.STANDBY
    await c.node_down("node1")  # its lease held the manager key
    assert await c.store.get(c.keys.manager) is None
    await step(m2, c)
    assert state(m2) is ManagerState.ACTIVE
    assert m2.term > m1.term
    key = await c.store.get(c.keys.manager)
    assert key is not None and key.value == "node2" and key.create_revision == m2.term
    # The old manager, once it sees the store, knows it is deposed.
    assert await step(m1, c) == "standby (manager: node2)"
    assert state(m1) is ManagerState.STANDBY


async def test_a_deposed_manager_writes_nothing(c: Cluster, mclock: ManualClock) -> None:
    m1 = await elected(c, "node1", mclock)
    await ha_vm(c, "vm1", "node3")
    await down_past_delay(c, m1, mclock, "node3")
    stale = await snapshot(c)  # m1 is manager in this snapshot, and vm1 is due
    await c.store.delete(c.keys.manager)  # m1's lease ended (e.g. paused past its TTL)
    m2 = await elected(c, "node2", mclock)
    assert m2.term > m1.term
    await step(m2, c)
    owner_before = await owner_entry(c, "vm1")
    before = c.revision
    await m1.step(stale, lease=c.leases["node1"])  # it still believes it leads
    assert c.revision == before  # neither the recovery nor its event
    assert await owner_entry(c, "vm1") == owner_before
    assert await c.store.get(c.keys.node_fenced("node3")) is None


async def test_a_deposed_manager_cannot_write_even_with_the_key_absent(
        c: Cluster, mclock: ManualClock) -> None:
    m1 = await elected(c, "node1", mclock)
    stale = await snapshot(c)
    await c.store.delete(c.keys.manager)
    await c.node_down("node3")
    before = c.revision
    await m1.step(stale | await snapshot(c) | {c.keys.manager: stale[c.keys.manager]},
                  lease=c.leases["node1"])
    assert c.revision == before  # its NODE_DOWN event was refused


async def test_a_new_term_starts_the_fence_delay_again(c: Cluster, mclock: ManualClock
                                                       ) -> None:
    m = await elected(c, "node1", mclock)
    await ha_vm(c, "vm1", "node3")
    await down_past_delay(c, m, mclock, "node3")
    await c.store.delete(c.keys.manager)  # lost the key; wins it back at once
    reason = await step(m, c)
    assert state(m) is ManagerState.ACTIVE
    assert "node3 is down" in reason  # noted again, not recovered
    assert (await c.owner("vm1")).node == "node3"


# --- recovery --------------------------------------------------------------------------


async def test_full_recovery_flow(c: Cluster, mclock: ManualClock) -> None:
    m = await elected(c, "node2", mclock)
    await ha_vm(c, "vm1", "node1")
    plain = await start_vm(c.cl, (await create_vm(c.cl, "plain", disk_size=MiB)).name,
                           node="node1")
    await c.node_down("node1")
    assert "node1 is down" in await step(m, c)
    assert (await kinds(c))[-1] is EventKind.NODE_DOWN
    mclock.advance(BASE - 0.1)
    before = c.revision
    reason = await step(m, c)
    assert "before fencing" in reason
    assert c.revision == before
    mclock.advance(0.1)
    reason = await step(m, c)
    assert "vm1: node1 -> " in reason
    owner_e = await owner_entry(c, "vm1")
    owner = codec.decode(Owner, owner_e.value)
    assert owner.node in ("node2", "node3")
    assert owner == Owner(node=owner.node, power=Power.ON, ha=True)
    assert owner.token(owner_e.mod_revision) == owner_e.mod_revision  # a new grant
    fenced_e = await c.store.get(c.keys.node_fenced("node1"))
    assert fenced_e is not None
    fence = codec.decode(FenceRecord, fenced_e.value)
    assert fence.by == "node2"
    assert fence.vms == ("vm1",)
    ev, ev_e = (await events(c))[-1]
    assert ev.kind is EventKind.RECOVERED
    assert ev.vm == "vm1"
    assert ev.node == owner.node
    assert ev.by == "node2"
    assert owner_e.mod_revision == fenced_e.mod_revision == ev_e.mod_revision
    # The non-HA VM stays where it was, powered on.
    plain_e = await owner_entry(c, "plain")
    assert plain_e.mod_revision == plain
    # Done: another step changes nothing.
    before = c.revision
    await step(m, c)
    assert c.revision == before


async def test_recovery_honours_preferred_nodes(c: Cluster, mclock: ManualClock) -> None:
    m = await elected(c, "node2", mclock)
    await ha_vm(c, "vm1", "node1", policy=HaPolicy(preferred_nodes=("node3",)))
    await down_past_delay(c, m, mclock, "node1")
    await step(m, c)
    assert (await c.owner("vm1")).node == "node3"


async def test_recovery_fails_if_the_dead_node_came_back(c: Cluster, mclock: ManualClock
                                                         ) -> None:
    m = await elected(c, "node2", mclock)
    await ha_vm(c, "vm1", "node1")
    await down_past_delay(c, m, mclock, "node1")
    stale = await snapshot(c)
    lease = await c.store.grant_lease(10)  # node1's agent registers again
    await c.store.put(c.keys.node_alive("node1"), "999", lease=lease)
    owner_before = await owner_entry(c, "vm1")
    before = c.revision
    await m.step(stale, lease=c.leases["node2"])
    assert c.revision == before
    assert await owner_entry(c, "vm1") == owner_before
    assert await c.store.get(c.keys.node_fenced("node1")) is None
    assert EventKind.RECOVERED not in await kinds(c)


async def test_recovery_fails_if_the_owner_changed_meanwhile(c: Cluster, mclock: ManualClock
                                                             ) -> None:
    m = await elected(c, "node2", mclock)
    await ha_vm(c, "vm1", "node1")
    await down_past_delay(c, m, mclock, "node1")
    stale = await snapshot(c)
    await stop_vm(c.cl, "vm1")
    changed = await owner_entry(c, "vm1")
    before = c.revision
    await m.step(stale, lease=c.leases["node2"])
    assert c.revision == before
    assert await owner_entry(c, "vm1") == changed
    assert EventKind.RECOVERED not in await kinds(c)


async def test_recovery_fails_if_the_target_went_down_meanwhile(c: Cluster,
                                                                mclock: ManualClock) -> None:
    m = await elected(c, "node2", mclock)
    await ha_vm(c, "vm1", "node1", policy=HaPolicy(preferred_nodes=("node3",)))
    await down_past_delay(c, m, mclock, "node1")
    stale = await snapshot(c)
    await c.node_down("node3")
    before = c.revision
    await m.step(stale, lease=c.leases["node2"])
    assert c.revision == before
    assert (await c.owner("vm1")).node == "node1"


async def test_an_unarmed_ha_vm_is_reported_once_and_its_node_fenced(
        c: Cluster, mclock: ManualClock) -> None:
    m = await elected(c, "node2", mclock)
    await ha_vm(c, "vm1", "node1", armed=False)
    await down_past_delay(c, m, mclock, "node1")
    await step(m, c)
    assert (await c.owner("vm1")).node == "node1"
    evs = [ev for ev, _ in await events(c)]
    (stranded,) = [ev for ev in evs if ev.kind is EventKind.NOT_RECOVERED]
    assert stranded.vm == "vm1"
    assert "not yet armed" in stranded.message
    assert [ev.node for ev in evs if ev.kind is EventKind.NODE_FENCED] == ["node1"]
    assert await c.store.get(c.keys.node_fenced("node1")) is not None
    before = c.revision
    await step(m, c)
    assert c.revision == before  # the same reason is not told twice


async def test_a_vm_that_fits_nowhere_is_reported(c: Cluster, mclock: ManualClock) -> None:
    m = await elected(c, "node2", mclock)
    await c.add_node("big", memory_mib=16384)
    await ha_vm(c, "huge", "big", memory_mib=8000)
    await down_past_delay(c, m, mclock, "big")
    await step(m, c)
    assert (await c.owner("huge")).node == "big"
    (ev,) = [ev for ev, _ in await events(c) if ev.kind is EventKind.NOT_RECOVERED]
    assert "no node has 8000 MiB free" in ev.message


async def test_a_dead_node_without_vms_is_fenced_once(c: Cluster, mclock: ManualClock) -> None:
    m = await elected(c, "node2", mclock)
    await down_past_delay(c, m, mclock, "node1")
    await step(m, c)
    fenced = await c.store.get(c.keys.node_fenced("node1"))
    assert fenced is not None
    assert codec.decode(FenceRecord, fenced.value).vms == ()
    ev, ev_e = (await events(c))[-1]
    assert ev.kind is EventKind.NODE_FENCED
    assert ev_e.mod_revision == fenced.mod_revision
    before = c.revision
    await step(m, c)
    assert c.revision == before


async def test_no_fence_if_the_node_came_back(c: Cluster, mclock: ManualClock) -> None:
    m = await elected(c, "node2", mclock)
    await down_past_delay(c, m, mclock, "node1")
    stale = await snapshot(c)
    lease = await c.store.grant_lease(10)
    await c.store.put(c.keys.node_alive("node1"), "999", lease=lease)
    before = c.revision
    await m.step(stale, lease=c.leases["node2"])
    assert c.revision == before
    assert await c.store.get(c.keys.node_fenced("node1")) is None


async def test_a_node_up_again_is_told(c: Cluster, mclock: ManualClock) -> None:
    m = await elected(c, "node2", mclock)
    await c.node_down("node1")
    await step(m, c)
    await c.add_node("node1")
    assert "node1 is up again" in await step(m, c)
    assert (await kinds(c))[-1] is EventKind.NODE_UP
    mclock.advance(100)
    await step(m, c)
    assert await c.store.get(c.keys.node_fenced("node1")) is None


async def test_a_standby_manager_does_nothing_about_dead_nodes(c: Cluster,
                                                               mclock: ManualClock) -> None:
    await elected(c, "node1", mclock)
    m2 = manager(c, "node2", mclock)
    await ha_vm(c, "vm1", "node3")
    await c.node_down("node3")
    before = c.revision
    for _ in range(3):
        await step(m2, c)
        mclock.advance(BASE)
    assert c.revision == before
    assert (await c.owner("vm1")).node == "node3"


# --- migrations of recovered VMs --------------------------------------------------------


async def migrating_from(c: Cluster, vm: str, source: str, to: str,
                         phase: MigrationPhase = MigrationPhase.COPYING_MEMORY
                         ) -> MigrationRecord:
    await ha_vm(c, vm, source)
    rec = await request_migration(c.cl, vm, to=to)
    rec = rec.advance(phase, at=2.0, node=source)
    await c.put_record(rec)
    return rec


async def test_a_vm_recovered_from_a_dead_source_fails_its_migration(
        c: Cluster, mclock: ManualClock) -> None:
    m = await elected(c, "node2", mclock)
    rec = await migrating_from(c, "vm1", "node1", "node3")
    assert (await c.owner("vm1")).migration == rec.id
    await down_past_delay(c, m, mclock, "node1")
    await step(m, c)
    owner_e = await owner_entry(c, "vm1")
    owner = codec.decode(Owner, owner_e.value)
    assert owner.node in ("node2", "node3")
    assert owner.migration is None and owner.target is None and owner.ha
    rec_e = await c.store.get(c.keys.migration_record(rec.id))
    assert rec_e is not None
    failed = codec.decode(MigrationRecord, rec_e.value)
    assert failed.phase is MigrationPhase.FAILED
    assert "node1 died" in failed.error
    assert failed.finished_at is not None
    assert failed.timeline[-1].node == "node2"
    assert rec_e.mod_revision == owner_e.mod_revision


async def test_recovery_fails_if_the_migration_record_changed_meanwhile(
        c: Cluster, mclock: ManualClock) -> None:
    m = await elected(c, "node2", mclock)
    rec = await migrating_from(c, "vm1", "node1", "node3")
    await down_past_delay(c, m, mclock, "node1")
    stale = await snapshot(c)
    await c.put_record(rec.note(at=3.0, node="node3", note="target still waiting"))
    before = c.revision
    await m.step(stale, lease=c.leases["node2"])
    assert c.revision == before
    assert (await c.owner("vm1")).node == "node1"


async def test_a_terminal_migration_record_is_left_as_it_is(c: Cluster, mclock: ManualClock
                                                            ) -> None:
    m = await elected(c, "node2", mclock)
    rec = await migrating_from(c, "vm1", "node1", "node3")
    ended = rec.advance(MigrationPhase.CANCELLED, at=3.0, node="node1")
    rec_rev = await c.put_record(ended)
    await down_past_delay(c, m, mclock, "node1")
    await step(m, c)
    assert (await c.owner("vm1")).node in ("node2", "node3")
    rec_e = await c.store.get(c.keys.migration_record(rec.id))
    assert rec_e is not None and rec_e.mod_revision == rec_rev


# --- events --------------------------------------------------------------------------


async def test_events_beyond_the_limit_are_pruned(c: Cluster, mclock: ManualClock,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager_mod, "EVENTS_KEPT", 3)
    for i in range(6):
        put = event_put(c.keys, kind=EventKind.NODE_UP, message=f"old {i}", by="x",
                        at=float(i + 1))
        await c.store.put(put.key, put.value)
    m = await elected(c, "node1", mclock)  # prunes on its first active step
    left = [ev.message for ev, _ in await events(c)]
    assert left == ["old 3", "old 4", "old 5", "node1 is the manager"]
    for i in range(6, 9):
        put = event_put(c.keys, kind=EventKind.NODE_UP, message=f"old {i}", by="x",
                        at=float(i + 1))
        await c.store.put(put.key, put.value)
    await step(m, c)
    assert len(await events(c)) == 7  # at most once a minute
    mclock.advance(60)
    await step(m, c)
    assert [ev.message for ev, _ in await events(c)] == ["old 7", "old 8",
                                                         "node1 is the manager"]


async def test_events_are_not_pruned_by_a_deposed_manager(
        c: Cluster, mclock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager_mod, "EVENTS_KEPT", 1)
    m = await elected(c, "node1", mclock)
    for i in range(3):
        put = event_put(c.keys, kind=EventKind.NODE_UP, message=f"e{i}", by="x",
                        at=float(i + 1))
        await c.store.put(put.key, put.value)
    stale = await snapshot(c)
    await c.store.delete(c.keys.manager)
    await elected(c, "node2", mclock)
    count = len(await events(c))
    mclock.advance(60)
    await m.step(stale, lease=c.leases["node1"])
    assert len(await events(c)) == count


# --- reading the cluster -------------------------------------------------------------


async def test_read_facts(c: Cluster) -> None:
    await ha_vm(c, "vm1", "node1")
    await c.node_down("node3")
    await c.store.put(c.keys.node_paused("node2"), "1")
    await c.store.put(c.keys.node_fenced("node3"), codec.encode(FenceRecord(at=1.0, by="x")))
    await c.store.put(c.keys.vm_spec("broken"), "{not json")
    await c.store.put(c.keys.vm_owner("broken"), "{}")
    facts = read_facts(c.keys, await snapshot(c))
    assert {n: (f.alive, f.paused, f.fenced) for n, f in facts.nodes.items()} == {
        "node1": (True, False, False), "node2": (True, True, False),
        "node3": (False, False, True)}
    assert set(facts.vms) == {"vm1"}
    owner_e = await owner_entry(c, "vm1")
    assert facts.vms["vm1"].owner_rev == owner_e.mod_revision
    assert facts.vms["vm1"].owner.ha


async def test_read_facts_skips_a_spec_without_owner(c: Cluster) -> None:
    await create_vm(c.cl, "vm1", disk_size=MiB)
    await c.store.delete(c.keys.vm_owner("vm1"))
    facts = read_facts(c.keys, await snapshot(c))
    assert facts.vms == {}


async def test_the_fence_record_lists_every_vm_taken_away(c: Cluster, mclock: ManualClock
                                                          ) -> None:
    m = await elected(c, "node2", mclock)
    await ha_vm(c, "vm1", "node1")
    await ha_vm(c, "vm2", "node1")
    await down_past_delay(c, m, mclock, "node1")
    await step(m, c)
    fenced = await c.store.get(c.keys.node_fenced("node1"))
    assert fenced is not None
    assert codec.decode(FenceRecord, fenced.value).vms == ("vm1", "vm2")

"""The switch to post-copy: the guest stops, ownership moves to the target in one guarded
transaction with the decision and ``postcopy_at``, then QEMU switches. A MemoryStore and a
fake QEMU monitor; nothing sleeps."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from ferry.agent.config import AgentConfig
from ferry.agent.context import AgentContext
from ferry.agent.postcopy import FALLBACK_DOWNTIME_MS, start_postcopy
from ferry.agent.runtime import Runtime
from ferry.agent.view import StoreView
from ferry.model import codec
from ferry.model.errors import QemuError
from ferry.model.migration import MigrationPhase, MigrationRecord
from ferry.model.node import NetAddress
from ferry.model.vm import Owner, Power
from ferry.qemu.argv import Hardware
from ferry.store.keys import Keys
from ferry.store.memory import MemoryStore

KEYS = Keys("test")
DECISION = "policy: switch to post-copy: because"


class FakeMonitor:
    def __init__(self, *, refuse: bool = False) -> None:
        self.calls: list[str] = []
        self.refuse = refuse

    async def stop(self) -> None:
        self.calls.append("stop")

    async def cont(self) -> None:
        self.calls.append("cont")

    async def migrate_start_postcopy(self) -> None:
        self.calls.append("migrate-start-postcopy")
        if self.refuse:
            raise QemuError("postcopy not possible")

    async def set_parameters(self, params: dict[str, object]) -> None:
        self.calls.append(f"set {params}")


async def setup_store(tmp_path: Path, *, migration: str | None = "m1"
                      ) -> tuple[MemoryStore, AgentContext]:
    store = MemoryStore()
    owner = Owner(node="node1", power=Power.ON, migration=migration,
                  target="node2" if migration else None, granted=5, ha=True)
    await store.put(KEYS.vm_owner("vm1"), codec.encode(owner))
    rec = MigrationRecord(id="m1", vm="vm1", source="node1", target="node2",
                          phase=MigrationPhase.COPYING_MEMORY, created_at=0.0)
    await store.put(KEYS.migration_record("m1"), codec.encode(rec))
    config = AgentConfig(node="node1", cluster="test", endpoints=("http://x",),
                         cluster_address="10.77.0.11",
                         migration_networks=(NetAddress("migration", "10.78.0.11"),))
    ctx = AgentContext(config=config, store=store, keys=KEYS, view=StoreView(store, KEYS),
                       runtime=Runtime(tmp_path, bridge="vmswitch", qemu_binary="qemu",
                                       on_change=lambda: None),
                       hardware=Hardware(accel="tcg", cpu_model="qemu64"))
    await ctx.view.load()
    return store, ctx


def local(mon: FakeMonitor) -> Any:
    return cast(Any, SimpleNamespace(monitor=mon))


async def owner_of(store: MemoryStore) -> Owner:
    entry = await store.get(KEYS.vm_owner("vm1"))
    assert entry is not None
    return codec.decode(Owner, entry.value)


async def test_switch_commits_to_the_target_while_nothing_runs(tmp_path: Path) -> None:
    store, ctx = await setup_store(tmp_path)
    mon = FakeMonitor()
    assert await start_postcopy(ctx, "m1", local(mon), decision=DECISION,
                                left="64 MiB left") is None
    assert mon.calls == ["stop", "migrate-start-postcopy"]
    owner = await owner_of(store)
    assert (owner.node, owner.power, owner.migration, owner.ha) == ("node2", Power.ON, None,
                                                                    True)
    rec, _ = await ctx.read_record("m1")
    assert rec.postcopy_at is not None and rec.committed_at == rec.postcopy_at
    assert rec.committed and rec.phase is MigrationPhase.COPYING_MEMORY
    notes = [e.note for e in rec.timeline]
    assert notes[0] == DECISION
    assert notes[1].startswith("post-copy: ownership moved to node2 (point of no return)")
    assert "64 MiB left" in notes[1]


async def test_a_cancel_requested_first_keeps_the_vm_here(tmp_path: Path) -> None:
    store, ctx = await setup_store(tmp_path)
    await store.put(KEYS.migration_cancel("m1"), "1")
    mon = FakeMonitor()
    why = await start_postcopy(ctx, "m1", local(mon), decision=DECISION, left="x")
    assert why == "a cancel was requested"
    assert mon.calls == ["stop", "cont"]
    assert (await owner_of(store)).node == "node1"
    rec, _ = await ctx.read_record("m1")
    assert rec.postcopy_at is None and not rec.committed
    assert rec.timeline[-1].note == f"{DECISION} — not started: a cancel was requested"


async def test_a_migration_that_ended_is_not_switched(tmp_path: Path) -> None:
    store, ctx = await setup_store(tmp_path, migration=None)
    mon = FakeMonitor()
    why = await start_postcopy(ctx, "m1", local(mon), decision=DECISION, left="x")
    assert why == "the migration is no longer in progress"
    assert mon.calls == ["stop", "cont"]
    assert (await owner_of(store)).node == "node1"


async def test_a_stale_view_costs_a_retry_not_a_wrong_commit(tmp_path: Path) -> None:
    store, ctx = await setup_store(tmp_path)
    # The target noted something after the view was loaded: the cached revision is stale.
    rec, _ = await ctx.read_record("m1")
    await store.put(KEYS.migration_record("m1"),
                    codec.encode(rec.note(at=1.0, node="node2", note="target says hi")))
    assert await start_postcopy(ctx, "m1", local(FakeMonitor()), decision=DECISION,
                                left="x") is None
    rec, _ = await ctx.read_record("m1")
    assert [e.note for e in rec.timeline][0] == "target says hi"
    assert (await owner_of(store)).node == "node2"


async def test_qemu_refusing_the_switch_finishes_the_stopped_guest_in_pre_copy(
        tmp_path: Path) -> None:
    store, ctx = await setup_store(tmp_path)
    mon = FakeMonitor(refuse=True)
    assert await start_postcopy(ctx, "m1", local(mon), decision=DECISION, left="x") is None
    assert mon.calls == ["stop", "migrate-start-postcopy",
                         f"set {{'downtime-limit': {FALLBACK_DOWNTIME_MS}}}"]
    assert (await owner_of(store)).node == "node2", "committed: the target gets the VM"
    rec, _ = await ctx.read_record("m1")
    assert rec.timeline[-1].note.startswith("QEMU refused post-copy")

"""The elected manager admits queued migrations within the limits (MemoryStore, fake clocks)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from ferry.control.migrations import (
    cancel_migration,
    request_migrations,
    set_migration_limits,
)
from ferry.model import codec
from ferry.model.migration import MigrationPhase, MigrationRecord
from ferry.store.memory import ManualClock
from tests.unit.control_harness import Cluster, cluster_with_vms
from tests.unit.test_ha_manager import elected, manager, snapshot, step


@pytest.fixture
async def c(tmp_path: Path) -> Cluster:
    return await cluster_with_vms(tmp_path, ("a", "b", "c"))


@pytest.fixture
def mclock() -> ManualClock:
    return ManualClock(start=5000.0)


async def record_of(c: Cluster, mid: str) -> MigrationRecord:
    e = await c.store.get(c.keys.migration_record(mid))
    assert e is not None
    return codec.decode(MigrationRecord, e.value)


async def admitted(c: Cluster, recs: list[MigrationRecord]) -> list[str]:
    return [r.vm for r in recs if (await record_of(c, r.id)).admitted_at is not None]


async def finish(c: Cluster, rec: MigrationRecord) -> None:
    """The source drives it to its end (what the agents would do)."""
    r = await record_of(c, rec.id)
    await c.put_record(r.advance(MigrationPhase.COMPLETED, at=r.created_at + 9, node="node1"))


async def test_three_from_one_source_are_admitted_one_after_another(
        c: Cluster, mclock: ManualClock) -> None:
    m = await elected(c, "node1", mclock)
    recs = await request_migrations(c.cl, ["a", "b", "c"], to="node2")
    reason = await step(m, c)
    assert f"admitted migration {recs[0].id} (a node1 -> node2)" in reason
    assert await admitted(c, recs) == ["a"]
    first = await record_of(c, recs[0].id)
    assert first.phase is MigrationPhase.QUEUED
    assert first.admitted_at is not None
    assert first.timeline[-1].node == "node1"
    assert first.timeline[-1].note.startswith("admitted after")
    rev = c.revision
    assert "admitted" not in await step(m, c)
    assert c.revision == rev  # the others wait: the outbound limit of node1 is 1
    await finish(c, recs[0])
    await step(m, c)
    assert await admitted(c, recs) == ["a", "b"]
    note = (await record_of(c, recs[1].id)).timeline[-1].note
    assert note.endswith("(it waited: node1 has 1 outbound migration running (limit 1): a)")
    await finish(c, recs[1])
    await step(m, c)
    assert await admitted(c, recs) == ["a", "b", "c"]


async def test_the_cluster_limits_are_read_from_the_config(c: Cluster,
                                                           mclock: ManualClock) -> None:
    await set_migration_limits(c.cl, per_source=2)
    m = await elected(c, "node1", mclock)
    recs = await request_migrations(c.cl, ["a", "b", "c"], to="node3")
    await step(m, c)
    assert await admitted(c, recs) == ["a", "b"]


async def test_a_stale_snapshot_never_admits_beyond_the_limit(c: Cluster,
                                                              mclock: ManualClock) -> None:
    """The watch's copy may lag behind the manager's own last admission: it decides again
    on the records read from the store."""
    m = await elected(c, "node1", mclock)
    recs = await request_migrations(c.cl, ["a", "b"], to="node2")
    stale = await snapshot(c)
    await m.step(stale, lease=c.leases["node1"])
    await m.step(stale, lease=c.leases["node1"])
    assert await admitted(c, recs) == ["a"]


async def test_a_migration_cancelled_meanwhile_is_not_admitted(c: Cluster,
                                                               mclock: ManualClock) -> None:
    m = await elected(c, "node1", mclock)
    (rec,) = await request_migrations(c.cl, ["a"], to="node2")
    stale = await snapshot(c)
    await cancel_migration(c.cl, rec.id)
    await m.step(stale, lease=c.leases["node1"])
    got = await record_of(c, rec.id)
    assert got.phase is MigrationPhase.CANCELLED and got.admitted_at is None


async def test_a_standby_or_deposed_manager_admits_nothing(c: Cluster,
                                                           mclock: ManualClock) -> None:
    m1 = await elected(c, "node1", mclock)
    m2 = manager(c, "node2", mclock)
    (rec,) = await request_migrations(c.cl, ["a"], to="node2")
    await step(m2, c)
    assert await admitted(c, [rec]) == []
    stale = await snapshot(c)
    await c.store.delete(c.keys.manager)  # node1 lost its key; node2 takes over
    await step(m2, c)
    m2_admitted = await record_of(c, rec.id)
    await c.put_record(replace(m2_admitted, admitted_at=None))  # as if not yet admitted
    before = c.revision
    await m1.step(stale, lease=c.leases["node1"])
    assert c.revision == before


async def test_legacy_records_past_queued_count_against_the_limit(
        c: Cluster, mclock: ManualClock) -> None:
    """A migration requested and started before the scheduler existed has no admitted_at."""
    m = await elected(c, "node1", mclock)
    a, b = await request_migrations(c.cl, ["a", "b"], to="node2")
    await c.put_record(a.advance(MigrationPhase.COPYING_MEMORY, at=1.0, node="node1"))
    await step(m, c)
    assert await admitted(c, [a, b]) == []
    assert (await record_of(c, a.id)).phase is MigrationPhase.COPYING_MEMORY


async def test_migrations_of_a_down_source_wait(c: Cluster, mclock: ManualClock) -> None:
    m = await elected(c, "node2", mclock)
    (rec,) = await request_migrations(c.cl, ["a"], to="node3")
    await c.node_down("node1")
    await step(m, c)
    assert await admitted(c, [rec]) == []

"""The migration scheduler end to end: many migrations requested at once queue and start on
their own within the limits; a queued one can be cancelled; a node drain empties a node."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ferry.control import migrations as migs
from ferry.control import vms as vms_ctl
from ferry.control.client import ClusterClient
from ferry.control.nodes import list_nodes
from ferry.lab import lab as labmod
from ferry.model.migration import MigrationPhase as P
from ferry.model.migration import MigrationRecord
from ferry.model.vm import VmState
from tests.lab.conftest import all_qemu_pids, eventually, ferry, qemu_pids

pytestmark = pytest.mark.lab


@pytest.fixture
async def one_out(cl: ClusterClient) -> AsyncIterator[None]:
    """Outbound limit 1 (set as a user does); the limits before are restored afterwards."""
    before = await migs.migration_limits(cl)
    res = await asyncio.to_thread(ferry, "migration", "limits", "--per-source", "1",
                                  "--per-target", "2", "--per-cluster", "4")
    assert res.code == 0, res.err
    assert res.out.strip() == "per source 1, per target 2, per cluster 4"
    yield
    await migs.set_migration_limits(cl, per_source=before.per_source,
                                    per_target=before.per_target,
                                    per_cluster=before.per_cluster)


async def _latest(cl: ClusterClient, vm: str) -> MigrationRecord:
    recs = [r for r in await migs.list_migrations(cl) if r.vm == vm]
    assert recs, f"no migration of {vm}"
    return recs[-1]


def _started(rec: MigrationRecord) -> float:
    """Admitted, or its source's first step, whichever the timeline shows first."""
    assert rec.admitted_at is not None
    steps = [e.at for e in rec.timeline if e.phase is not P.QUEUED]
    return min([rec.admitted_at, *steps])


def _ended(rec: MigrationRecord) -> float:
    assert rec.finished_at is not None
    return max([rec.finished_at, *(e.at for e in rec.timeline)])


def _mid(out: str) -> str:
    return out.split()[1].rstrip(":")


async def test_three_requested_at_once_run_one_after_another(
        lab: labmod.LabState, cl: ClusterClient, make_vm: Any, one_out: None) -> None:
    vms = [await make_vm(f"sched-{i}", node="node1") for i in range(3)]
    names = [v.name for v in vms]
    boots = {v.name: (await v.get("/cgi-bin/status"))["boot_id"] for v in vms}
    known = len(await migs.list_migrations(cl))

    # Bad input: one line, nothing requested.
    for args, says in ((["ghost", names[0]], "'ghost' does not exist"),
                       ([names[0], names[1]], "already runs on node1")):
        to = "node1" if says.startswith("already") else "node2"
        res = await asyncio.to_thread(ferry, "vm", "migrate", *args, "--to", to)
        assert res.code != 0 and says in res.err, res
        assert len(res.err.strip().splitlines()) == 1, res.err
    assert len(await migs.list_migrations(cl)) == known

    res = await asyncio.to_thread(ferry, "vm", "migrate", *names, "--to", "node2",
                                  timeout=300)
    assert res.code == 0, res.err + res.out
    for name in names:
        assert f"{name}: node1 -> node2 in" in res.out, res.out
    assert "queued #1: node1 has 1 outbound migration running (limit 1)" in res.out, res.out

    recs = [await _latest(cl, n) for n in names]
    assert all(r.phase is P.COMPLETED for r in recs), [(r.vm, r.error) for r in recs]
    spans = sorted((_started(r), _ended(r), r.vm) for r in recs)
    for (_, end, first), (start, _, then) in zip(spans, spans[1:], strict=False):
        assert start >= end, f"{then} started before {first} ended"
    assert [s[2] for s in spans] == names  # in the order requested
    for r in recs[1:]:
        assert "it waited: node1 has 1 outbound migration running" in " ".join(
            e.note for e in r.timeline)
    for v in vms:
        view = await vms_ctl.show_vm(cl, v.name)
        assert (view.node, view.state) == ("node2", VmState.RUNNING)
        assert all_qemu_pids(lab, v.name)["node1"] == []
        assert (await v.get("/cgi-bin/status"))["boot_id"] == boots[v.name]


async def test_a_queued_migration_is_cancelled_and_the_vm_stays(
        lab: labmod.LabState, cl: ClusterClient, make_vm: Any, one_out: None) -> None:
    first = await make_vm("schedc-run", node="node1")
    waiting = await make_vm("schedc-wait", node="node1")
    pid = qemu_pids(lab, "node1", waiting.name)
    boot = (await waiting.get("/cgi-bin/status"))["boot_id"]
    res = await asyncio.to_thread(ferry, "vm", "migrate", first.name, "--to", "node2",
                                  "--bandwidth", "20M", "--no-wait")
    assert res.code == 0, res.err
    running = _mid(res.out)

    async def started() -> bool:
        rec, _ = await cl.migration(running)
        return rec.admitted_at is not None
    await eventually(started, timeout=10, what="the first migration to be admitted")

    res = await asyncio.to_thread(ferry, "vm", "migrate", waiting.name, "--to", "node3",
                                  "--no-wait")
    assert res.code == 0, res.err
    queued = _mid(res.out)
    assert f"queued #1: node1 has 1 outbound migration running (limit 1): {first.name}" \
        in res.out, res.out
    listed = await asyncio.to_thread(ferry, "migration", "list")
    (row,) = [line for line in listed.out.splitlines() if line.startswith(queued)]
    assert "queued #1" in row and "outbound migration running" in row, row
    show = await asyncio.to_thread(ferry, "migration", "show", queued)
    assert "#1 in the queue: node1 has 1 outbound" in show.out, show.out

    res = await asyncio.to_thread(ferry, "migration", "cancel", queued)
    assert res.code == 0, res.err
    assert "cancelled" in res.out and "keeps running on node1" in res.out, res.out
    rec, _ = await cl.migration(queued)
    assert rec.phase is P.CANCELLED and rec.admitted_at is None and rec.settled
    assert [e.phase for e in rec.timeline] == [P.CANCELLED]
    view = await vms_ctl.show_vm(cl, waiting.name)
    assert (view.node, view.state, view.migration) == ("node1", VmState.RUNNING, None)
    assert qemu_pids(lab, "node1", waiting.name) == pid
    assert all_qemu_pids(lab, waiting.name)["node3"] == []
    assert (await waiting.get("/cgi-bin/status"))["boot_id"] == boot

    res = await asyncio.to_thread(ferry, "migration", "cancel", running)
    assert res.code == 0 or "already ended" in res.err, res


async def test_node_drain_empties_the_node(lab: labmod.LabState, cl: ClusterClient,
                                           make_vm: Any) -> None:
    vms = [await make_vm(f"drain-{i}", node="node3") for i in range(2)]
    boots = {v.name: (await v.get("/cgi-bin/status"))["boot_id"] for v in vms}
    try:
        res = await asyncio.to_thread(ferry, "node", "drain", "node3", timeout=300)
        assert res.code == 0, res.err + res.out
        assert "node3 is paused" in res.out and "node3 is drained" in res.out, res.out
        nodes = {n.info.name: n for n in await list_nodes(cl)}
        assert nodes["node3"].state.value == "paused"
        assert not any(v in nodes["node3"].vms for v in boots)
        for v in vms:
            view = await vms_ctl.show_vm(cl, v.name)
            assert view.state is VmState.RUNNING and view.node in ("node1", "node2")
            assert all_qemu_pids(lab, v.name)["node3"] == []
            assert (await v.get("/cgi-bin/status"))["boot_id"] == boots[v.name]
        res = await asyncio.to_thread(ferry, "node", "drain", "node3")
        assert res.code == 0 and "no VM to move off node3" in res.out, res
        res = await asyncio.to_thread(ferry, "node", "drain", "node9")
        assert res.code != 0 and "node9" in res.err
    finally:
        await asyncio.to_thread(ferry, "node", "resume", "node3")

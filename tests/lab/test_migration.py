"""Live migration end to end: real QEMU guests, real etcd, agents in network namespaces."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest

from ferry.control import migrations as migs
from ferry.control import vms as vms_ctl
from ferry.control.client import ClusterClient
from ferry.lab import lab as labmod
from ferry.lab.prober import outage
from ferry.model.migration import MigrationPhase as P
from ferry.model.vm import VmState
from ferry.qemu.argv import console_log
from tests.lab.conftest import all_qemu_pids, eventually, ferry, qemu_pids

pytestmark = pytest.mark.lab

SEVEN_STEPS = [P.CONNECTING, P.SENDING_CONFIG, P.CREATING_TARGET, P.COPYING_MEMORY,
               P.HANDING_OVER_DISKS, P.BRINGING_ONLINE, P.ANNOUNCING, P.COMPLETED]


async def _slow_migration(vm: str, to: str) -> str:
    """Request a migration capped at 20 MiB/s (seconds long: time to act in the middle of
    the copy) and return its id."""
    res = await asyncio.to_thread(ferry, "vm", "migrate", vm, "--to", to,
                                  "--bandwidth", "20M", "--no-wait")
    assert res.code == 0, res.err
    return res.out.split()[1].rstrip(":")


async def _copy_under_way(cl: ClusterClient, mid: str) -> None:
    async def copying() -> bool:
        v = await migs.show_migration(cl, mid)
        return v.record.phase is P.COPYING_MEMORY and v.progress is not None \
            and v.progress.percent > 5
    await eventually(copying, timeout=60, what="the memory copy to be under way")


async def _migration_end(cl: ClusterClient, mid: str) -> Any:
    async def ended() -> Any:
        rec, _ = await cl.migration(mid)
        return rec if rec.phase.terminal else None
    return await eventually(ended, timeout=60, what="the migration to end")


async def _latest_migration(cl: ClusterClient, vm: str) -> Any:
    recs = [r for r in await migs.list_migrations(cl) if r.vm == vm]
    return recs[-1] if recs else None


async def test_live_migration_keeps_the_guest_and_its_client(
        lab: labmod.LabState, cl: ClusterClient, make_vm: Any, prober: Any) -> None:
    vm = await make_vm("mig-live", node="node1")
    await vm.get("/cgi-bin/diskwriter?op=start&rate=50&tag=live")
    # A guest that writes memory while it moves: a lost write crashes its kernel.
    await vm.get("/cgi-bin/memdirty?op=start&mib=32&rate=50")
    log = prober(vm.ip)
    await asyncio.sleep(1.5)
    before = await vm.get("/cgi-bin/status")

    t0 = time.monotonic()
    res = await asyncio.to_thread(ferry, "vm", "migrate", vm.name, "--to", "node2")
    t1 = time.monotonic()
    assert res.code == 0, res.err
    assert f"{vm.name}: node1 -> node2 in" in res.out
    await asyncio.sleep(1.0)
    res = await asyncio.to_thread(ferry, "vm", "migrate", vm.name, "--to", "node3")
    assert res.code == 0, res.err
    await asyncio.sleep(1.0)

    view = await vms_ctl.show_vm(cl, vm.name)
    assert (view.node, view.state) == ("node3", VmState.RUNNING)
    assert all_qemu_pids(lab, vm.name) == {"node1": [], "node2": [], "node3": [view.pid]}
    after = await vm.get("/cgi-bin/status")
    assert after["boot_id"] == before["boot_id"], "the guest rebooted"
    assert after["uptime"] > before["uptime"]
    assert after["memdirty"]["running"]
    assert after["memdirty"]["passes"] > before["memdirty"]["passes"]
    assert after["diskwriter"]["running"]
    assert after["diskwriter"]["last_seq"] > before["diskwriter"]["last_seq"]
    console = console_log(await cl.spec(vm.name)).read_text()
    assert "Kernel panic" not in console and "BUG" not in console, console[-2000:]
    verify = await vm.get("/cgi-bin/verify")
    assert verify["continuous"] and verify["bad_crc"] == 0, verify

    seen = outage(log, t0, t1)
    assert seen.tcp_survived, "the client's TCP connection broke"
    assert seen.icmp_gap_ms < 1000, f"client outage {seen.icmp_gap_ms:.0f} ms"

    rec = await _latest_migration(cl, vm.name)
    phases = [e.phase for e in rec.timeline if e.phase in SEVEN_STEPS]
    assert sorted(set(phases), key=SEVEN_STEPS.index) == SEVEN_STEPS
    assert rec.committed_at is not None and rec.summary is not None
    assert rec.summary.bytes_sent > 0 and rec.summary.qemu_total_ms > 0


async def test_cancel_during_memory_copy_leaves_the_vm_on_its_source(
        lab: labmod.LabState, cl: ClusterClient, make_vm: Any) -> None:
    vm = await make_vm("mig-cancel", node="node1")
    pid_before = qemu_pids(lab, "node1", vm.name)
    boot = (await vm.get("/cgi-bin/status"))["boot_id"]
    mid = await _slow_migration(vm.name, "node2")

    await _copy_under_way(cl, mid)
    assert qemu_pids(lab, "node2", vm.name), "the target QEMU should exist while copying"

    res = await asyncio.to_thread(ferry, "migration", "cancel", mid)
    assert res.code == 0, res.err
    assert "cancelled" in res.out
    rec, _ = await cl.migration(mid)
    assert rec.phase is P.CANCELLED and rec.settled
    view = await vms_ctl.show_vm(cl, vm.name)
    assert (view.node, view.state, view.migration) == ("node1", VmState.RUNNING, None)
    await eventually(lambda: not qemu_pids(lab, "node2", vm.name), timeout=15,
                     what="the target QEMU to be gone")
    assert qemu_pids(lab, "node1", vm.name) == pid_before
    assert (await vm.get("/cgi-bin/status"))["boot_id"] == boot


async def test_killing_the_target_qemu_fails_the_migration_cleanly(
        lab: labmod.LabState, cl: ClusterClient, make_vm: Any) -> None:
    vm = await make_vm("mig-kill", node="node1")
    boot = (await vm.get("/cgi-bin/status"))["boot_id"]
    mid = await _slow_migration(vm.name, "node3")

    async def target_copying() -> list[int]:
        v = await migs.show_migration(cl, mid)
        if v.record.phase is P.COPYING_MEMORY and v.progress and v.progress.percent > 5:
            return qemu_pids(lab, "node3", vm.name)
        return []
    (target,) = await eventually(target_copying, timeout=60, what="the copy to node3")
    os.kill(target, signal.SIGKILL)

    rec = await _migration_end(cl, mid)
    assert rec.phase is P.FAILED
    assert rec.error, "a failed migration must say why"
    view = await vms_ctl.show_vm(cl, vm.name)
    assert (view.node, view.state, view.migration) == ("node1", VmState.RUNNING, None)
    assert all_qemu_pids(lab, vm.name)["node3"] == []
    assert (await vm.get("/cgi-bin/status"))["boot_id"] == boot
    show = await asyncio.to_thread(ferry, "migration", "show", mid)
    assert "failed" in show.out and "error:" in show.out


async def test_source_agent_killed_mid_copy_and_restarted_finishes_the_migration(
        lab: labmod.LabState, cl: ClusterClient, make_vm: Any) -> None:
    vm = await make_vm("mig-restart", node="node2")
    boot = (await vm.get("/cgi-bin/status"))["boot_id"]
    mid = await _slow_migration(vm.name, "node1")

    await _copy_under_way(cl, mid)
    state = labmod.load_state(lab.name)
    assert state is not None
    os.kill(state.agent_pids["node2"], signal.SIGKILL)  # QEMU goes on copying without it
    await asyncio.sleep(1.0)
    await asyncio.to_thread(labmod.up, lab.layout, say=lambda m: None)

    rec = await _migration_end(cl, mid)
    assert rec.phase is P.COMPLETED, rec.error
    view = await vms_ctl.show_vm(cl, vm.name)
    assert (view.node, view.state) == ("node1", VmState.RUNNING)
    assert all_qemu_pids(lab, vm.name) == {"node1": [view.pid], "node2": [], "node3": []}
    assert (await vm.get("/cgi-bin/status"))["boot_id"] == boot

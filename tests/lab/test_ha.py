"""High availability end to end: real QEMU guests writing to their disks, real etcd (three
members), agents and their watchdogs in node namespaces, faults as `ferry lab fault` makes
them. Lab timings: lease TTL T=4 s, watchdog W=2.67 s, fence delay D=4 s.

The proof that a VM never ran twice comes from two independent witnesses:
- the host: a sampler lists every node's QEMU processes of the VM every 20 ms and records
  any moment where two nodes have one;
- the disk: the guest's disk writer stamps every fsynced record with ``node:token`` (the
  fencing token its agent started it under). Two writers would interleave their records; a
  correct failover shows one segment per owner, tokens increasing, sequence unbroken, and
  every record acknowledged before the failure still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ferry.control import ha as ha_ctl
from ferry.control import vms as vms_ctl
from ferry.control.client import ClusterClient
from ferry.lab import faults, procs
from ferry.lab import lab as labmod
from ferry.lab.diskrecords import check_records, read_records
from ferry.model.errors import FerryError
from ferry.model.ha import EventKind, HaPolicy, HaPriority
from tests.lab.conftest import Vm, all_qemu_pids, eventually, ferry

pytestmark = pytest.mark.lab

RECOVERY_S = 60  # generous: T + D + boot is ~12 s here, but the machine has 2 busy cores


@dataclass
class TwoCopyWatch:
    """Samples every node's QEMU processes of one VM; remembers any overlap."""

    lab: labmod.LabState
    vm: str
    overlaps: list[dict[str, list[int]]] = field(default_factory=list)
    samples: int = 0

    async def run(self) -> None:
        while True:
            running = {n: p for n, p in
                       (await asyncio.to_thread(all_qemu_pids, self.lab, self.vm)).items() if p}
            self.samples += 1
            if len(running) > 1 or any(len(p) > 1 for p in running.values()):
                self.overlaps.append(running)
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def watching(lab: labmod.LabState, vm: str) -> AsyncIterator[TwoCopyWatch]:
    watch = TwoCopyWatch(lab, vm)
    task = asyncio.create_task(watch.run())
    try:
        yield watch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert watch.samples > 10
    assert not watch.overlaps, f"two QEMUs of {vm} ran at once: {watch.overlaps[:3]}"


@pytest.fixture
def ha_vm(make_vm: Callable[..., Any], cl: ClusterClient) -> Callable[..., Any]:
    """An HA VM whose guest writes fsynced, tagged records to its disk from boot on."""
    async def make(name: str, *, node: str, priority: HaPriority = HaPriority.MEDIUM) -> Vm:
        vm: Vm = await make_vm(name, node=node, ha=HaPolicy(priority=priority),
                               kernel_args="ferry.diskwriter=20")
        assert (await vms_ctl.show_vm(cl, name)).ha_armed  # armed before it started
        return vm

    return make


@pytest.fixture
def restore(lab: labmod.LabState) -> Iterator[list[Callable[[], object]]]:
    """Undo actions run at teardown (power on, heal, thaw), so the session lab stays whole."""
    undo: list[Callable[[], object]] = []
    yield undo
    for fn in reversed(undo):
        try:
            fn()
        except FerryError as err:
            print(f"restore: {err}")
    for node in lab.layout.node_names():  # every node up again before the next test
        asyncio.run(_wait_alive(lab, node))


async def _wait_alive(lab: labmod.LabState, node: str) -> None:
    from ferry.store.etcd import EtcdStore
    from ferry.store.keys import Keys

    store = EtcdStore(lab.endpoints)
    try:
        async def alive() -> bool:
            return await store.get(Keys(lab.cluster).node_alive(node)) is not None
        await eventually(alive, timeout=30, what=f"{node} to be up")
    finally:
        await store.close()


async def _writer(vm: Vm) -> dict[str, Any]:
    status = await vm.get("/cgi-bin/status")
    writer: dict[str, Any] = status["diskwriter"]
    assert writer["running"] and writer["errors"] == 0, writer
    return writer


async def _answers_from_other_node(vm: Vm, old: str) -> dict[str, Any] | None:
    try:
        writer = await _writer(vm)
    except (FerryError, AssertionError, KeyError):
        return None
    return writer if not writer["tag"].startswith(f"{old}:") else None


def _disk(lab: labmod.LabState, vm: str) -> Path:
    return lab.layout.volume_dir / "vms" / vm / "disk0.qcow2"


def _check_disk(lab: labmod.LabState, vm: str, *, acked: int, old_tag: str) -> list[str]:
    """The disk's records: unbroken, every acknowledged one from before the failure there,
    one segment per owner in increasing token order. Returns the segments' tags."""
    check = check_records(read_records(_disk(lab, vm), force_share=True))
    assert check.continuous, check
    segments = check.segments
    tags = [s.tag for s in segments]
    assert len(set(tags)) == len(tags), f"an owner wrote twice, interleaved: {segments}"
    tokens = [int(t.rsplit(":", 1)[1]) for t in tags]
    assert tokens == sorted(tokens), f"fencing tokens went backwards: {tags}"
    before = [s for s in segments if s.tag == old_tag]
    assert before and before[0].last >= acked, (
        f"records acknowledged by {old_tag} up to {acked} are not all there: {segments}")
    return tags


async def _events(cl: ClusterClient, vm: str) -> list[EventKind]:
    evs, _ = await ha_ctl.list_events(cl, limit=0, vm=vm)
    return [e.kind for e in evs]


async def _fail_over(lab: labmod.LabState, cl: ClusterClient, vm: Vm, *, node: str,
                     fault: Callable[[], object]) -> tuple[dict[str, Any], float]:
    """Inject ``fault`` on ``node`` (which runs ``vm``) and wait until the guest answers from
    another node; returns the writer's state there and the seconds it took."""
    before = await _writer(vm)
    assert before["tag"].startswith(f"{node}:")
    t0 = time.monotonic()
    await asyncio.to_thread(fault)
    after = await eventually(lambda: _answers_from_other_node(vm, node), timeout=RECOVERY_S,
                             what=f"{vm.name} to answer from another node", step=0.5)
    took = time.monotonic() - t0
    print(f"{vm.name}: {before['tag']} -> {after['tag']} in {took:.1f}s")
    acked = (await _writer_at_failure(before, after))
    _check_disk(lab, vm.name, acked=acked, old_tag=before["tag"])
    return after, took


async def _writer_at_failure(before: dict[str, Any], after: dict[str, Any]) -> int:
    # The new boot continues the sequence where the disk ended; everything the old writer
    # had acknowledged when we asked must be below that.
    assert after["first_seq"] > before["last_seq"], (before, after)
    return int(before["last_seq"])


async def test_power_off_restarts_ha_vm_elsewhere_and_the_node_rejoins_clean(
        lab: labmod.LabState, cl: ClusterClient, ha_vm: Any,
        restore: list[Callable[[], object]]) -> None:
    vm = await ha_vm("ha-power", node="node1", priority=HaPriority.HIGH)
    async with watching(lab, vm.name):
        restore.append(lambda: faults.power_on(labmod.load_state() or lab, "node1"))
        after, took = await _fail_over(lab, cl, vm, node="node1",
                                       fault=lambda: faults.power_off(lab, "node1"))
        assert took < 30
        res = await asyncio.to_thread(ferry, "node", "list")
        assert "node1  fenced" in res.out, res.out
        await asyncio.to_thread(faults.power_on, labmod.load_state() or lab, "node1")
        await _wait_alive(lab, "node1")
        await asyncio.sleep(2)  # it must not take its old VM back
        assert all_qemu_pids(lab, vm.name)["node1"] == []
        assert (await _writer(vm))["tag"] == after["tag"]
    kinds = await _events(cl, vm.name)
    assert EventKind.RECOVERED in kinds
    node_events, _ = await ha_ctl.list_events(cl, limit=0, node="node1")
    assert {EventKind.NODE_DOWN, EventKind.NODE_REJOINED} <= {e.kind for e in node_events}
    res = await asyncio.to_thread(ferry, "events", "--vm", vm.name)
    assert res.code == 0 and "recovered" in res.out and "node1 is down" in res.out, res.out


async def test_isolated_node_stops_its_vm_before_it_starts_elsewhere(
        lab: labmod.LabState, cl: ClusterClient, ha_vm: Any,
        restore: list[Callable[[], object]]) -> None:
    vm = await ha_vm("ha-isolate", node="node2")
    async with watching(lab, vm.name):
        restore.append(lambda: faults.heal(lab, "node2"))
        await _fail_over(lab, cl, vm, node="node2", fault=lambda: faults.isolate(lab, "node2"))
        await asyncio.to_thread(faults.heal, lab, "node2")
        await _wait_alive(lab, "node2")
    node_events, _ = await ha_ctl.list_events(cl, limit=0, node="node2")
    fenced = [e for e in node_events if e.kind is EventKind.SELF_FENCED]
    assert fenced and vm.name in fenced[-1].message, node_events


async def test_frozen_agent_is_fenced_by_its_watchdog(
        lab: labmod.LabState, cl: ClusterClient, ha_vm: Any,
        restore: list[Callable[[], object]]) -> None:
    vm = await ha_vm("ha-freeze", node="node3")
    async with watching(lab, vm.name):
        restore.append(lambda: faults.thaw_agent(lab, "node3"))
        await _fail_over(lab, cl, vm, node="node3",
                         fault=lambda: faults.freeze_agent(lab, "node3"))
        log = (lab.layout.run_dir("node3") / "watchdog.log").read_text()
        assert f"killed {vm.name}" in log, log
        await asyncio.to_thread(faults.thaw_agent, lab, "node3")
        await _wait_alive(lab, "node3")
        await asyncio.sleep(1)
        assert all_qemu_pids(lab, vm.name)["node3"] == []


async def test_agent_killed_and_restarted_quickly_keeps_its_vms(
        lab: labmod.LabState, cl: ClusterClient, ha_vm: Any) -> None:
    vm = await ha_vm("ha-restart", node="node1")
    pid = all_qemu_pids(lab, vm.name)["node1"]
    tag = (await _writer(vm))["tag"]
    state = labmod.load_state() or lab
    agent, marker = state.agent_pids["node1"], labmod.agent_marker(lab.layout, "node1")
    procs.kill(agent, marker, sig=signal.SIGKILL)
    await eventually(lambda: not procs.is_running(agent, marker), timeout=5,
                     what="the agent to die")
    await asyncio.to_thread(faults.power_on, state, "node1")  # starts the agent again
    await asyncio.sleep(12)  # past T + D: a recovery would have happened by now
    assert all_qemu_pids(lab, vm.name)["node1"] == pid
    assert (await _writer(vm))["tag"] == tag
    assert EventKind.RECOVERED not in await _events(cl, vm.name)


async def test_killing_the_etcd_leader_restarts_no_vm(
        lab: labmod.LabState, cl: ClusterClient, ha_vm: Any,
        restore: list[Callable[[], object]]) -> None:
    vms = [await ha_vm("ha-etcd1", node="node2"), await ha_vm("ha-etcd2", node="node3")]
    pids = {v.name: all_qemu_pids(lab, v.name) for v in vms}
    t0 = time.time()
    restore.append(lambda: faults.start_etcd(labmod.load_state() or lab))
    await asyncio.to_thread(faults.kill_etcd_leader, lab)
    await asyncio.sleep(12)  # past T + D
    evs, _ = await ha_ctl.list_events(cl, limit=0)
    bad = [e for e in evs if e.at >= t0 and e.kind in (
        EventKind.NODE_DOWN, EventKind.RECOVERED, EventKind.SELF_FENCED)]
    assert not bad, (bad, _agent_log_tail(lab))
    for v in vms:
        assert all_qemu_pids(lab, v.name) == pids[v.name], _agent_log_tail(lab)
        await _writer(v)


def _agent_log_tail(lab: labmod.LabState) -> str:
    out = []
    for node in lab.layout.node_names():
        lines = lab.layout.log_path(node).read_text().splitlines()
        out += [f"{node}: {line}" for line in lines[-15:]]
    return "\n".join(out)


async def test_ha_settings_refuse_bad_input_and_change_nothing(
        lab: labmod.LabState, cl: ClusterClient) -> None:
    await vms_ctl.create_vm(cl, "ha-cli")
    try:
        res = await asyncio.to_thread(ferry, "vm", "ha", "add", "ha-cli",
                                      "--preferred-nodes", "node9")
        assert res.code != 0 and "node9" in res.err and "Traceback" not in res.err
        assert (await cl.spec("ha-cli")).ha is None
        res = await asyncio.to_thread(ferry, "vm", "ha", "add", "nosuchvm")
        assert res.code != 0 and "nosuchvm" in res.err
        res = await asyncio.to_thread(ferry, "vm", "ha", "add", "ha-cli", "--priority", "high",
                                      "--preferred-nodes", "node2,node3")
        assert res.code == 0, res.err
        spec = await cl.spec("ha-cli")
        assert spec.ha == HaPolicy(priority=HaPriority.HIGH, preferred_nodes=("node2", "node3"))
        res = await asyncio.to_thread(ferry, "vm", "set", "ha-cli", "--start-action", "start")
        assert res.code != 0 and "highly available" in res.err
        assert await cl.spec("ha-cli") == spec
        res = await asyncio.to_thread(ferry, "vm", "show", "ha-cli")
        assert "high priority, prefers node2,node3" in res.out, res.out
        res = await asyncio.to_thread(ferry, "vm", "ha", "remove", "ha-cli")
        assert res.code == 0 and (await cl.spec("ha-cli")).ha is None
    finally:
        await vms_ctl.delete_vm(cl, "ha-cli")


async def test_a_paused_node_gets_no_vm_placed_by_the_cluster(
        lab: labmod.LabState, cl: ClusterClient) -> None:
    for node in ("node1", "node2"):
        res = await asyncio.to_thread(ferry, "node", "pause", node)
        assert res.code == 0, res.err
    try:
        res = await asyncio.to_thread(ferry, "node", "list")
        assert "node1  paused" in res.out and "node3  up" in res.out, res.out
        res = await asyncio.to_thread(ferry, "node", "pause", "node1")
        assert res.code != 0 and "already paused" in res.err
        await vms_ctl.create_vm(cl, "ha-paused")
        res = await asyncio.to_thread(ferry, "vm", "start", "ha-paused")
        assert res.code == 0 and "running on node3" in res.out, (res.out, res.err)
    finally:
        for node in ("node1", "node2"):
            await asyncio.to_thread(ferry, "node", "resume", node)
        with contextlib.suppress(FerryError):
            await vms_ctl.destroy_vm(cl, "ha-paused")
    res = await asyncio.to_thread(ferry, "node", "list")
    assert "paused" not in res.out

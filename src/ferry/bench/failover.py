"""`ferry bench failover`: from pulling a node's plug to its HA VM answering elsewhere.

Each run powers off the node running the HA VM (every process of it, as `ferry lab fault
NODE power-off`) and times, from that moment:
- lease gone:  the node's ``alive`` key disappears (etcd expired its lease);
- decided:     the manager moved the VM's ownership to another node (after the fence delay);
- qemu up:     the new node reports the VM running;
- answers:     the guest answers HTTP from the client namespace (it has booted).
Then the node is powered on again, rejoins, and the next run fails over the other way.

The baseline, run in the same command, is a cold start of the same VM (start to answering):
what a restart costs at the least. The difference is what detection and fencing add.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ferry.control import vms as vms_ctl
from ferry.control.client import ClusterClient
from ferry.lab import faults
from ferry.lab import lab as labmod
from ferry.lab.guestctl import guest_get, wait_guest
from ferry.lab.lab import Say
from ferry.model.errors import FerryError, NotFound, Timeout
from ferry.model.ha import HaPolicy
from ferry.model.node import NodeInfo
from ferry.model.vm import VmState
from ferry.store.etcd import EtcdStore
from ferry.store.keys import Keys

VM = "bench-ha"
POLL_S = 0.1
GIVE_UP_S = 120.0


@dataclass(frozen=True)
class FailoverRun:
    index: int
    source: str
    target: str
    lease_gone_s: float
    decided_s: float
    qemu_up_s: float
    answers_s: float


@dataclass(frozen=True)
class FailoverReport:
    runs: list[FailoverRun]
    cold_starts: list[float]
    lease_ttl: int
    watchdog_s: float
    fence_delay_s: float

    def median(self, field: str) -> float:
        return float(statistics.median(float(getattr(r, field)) for r in self.runs))

    @property
    def cold_start_s(self) -> float:
        return statistics.median(self.cold_starts)


async def _until(probe: Callable[[], Awaitable[object]], what: str) -> float:
    deadline = time.monotonic() + GIVE_UP_S
    while time.monotonic() < deadline:
        try:
            if await probe():
                return time.monotonic()
        except FerryError as err:  # a failed read is not an answer: ask again, say so
            print(f"  (store read failed, retrying: {err})", flush=True)
        await asyncio.sleep(POLL_S)
    raise Timeout(f"failover bench: no {what} within {GIVE_UP_S:.0f}s")


async def _answers(ns: str, ip: str) -> bool:
    try:
        await guest_get(ns, ip, "/cgi-bin/status", timeout=1.0)
    except FerryError:
        return False
    return True


async def _one_failover(state: labmod.LabState, cl: ClusterClient, ip: str, *,
                        index: int, say: Say) -> FailoverRun:
    owner, _ = await cl.owner(VM)
    source = owner.node
    assert source is not None
    t0 = time.monotonic()
    await asyncio.to_thread(faults.power_off, state, source)
    say(f"run {index}: {source} powered off")

    async def lease_gone() -> bool:
        return not await cl.node_up(source)

    async def decided() -> bool:
        return (await cl.owner(VM))[0].node != source

    async def qemu_up() -> bool:
        return (await vms_ctl.show_vm(cl, VM)).state is VmState.RUNNING

    t_gone = await _until(lease_gone, "lease expiry")
    say(f"run {index}: lease gone after {t_gone - t0:.1f}s")
    t_decided = await _until(decided, "recovery decision")
    target = (await cl.owner(VM))[0].node or "?"
    say(f"run {index}: manager restarts it on {target} after {t_decided - t0:.1f}s")
    t_qemu = await _until(qemu_up, "QEMU on the new node")
    t_answer = await _until(lambda: _answers(state.layout.client_ns, ip), "answer")
    say(f"run {index}: answers from {target} after {t_answer - t0:.1f}s")
    await asyncio.to_thread(faults.power_on, labmod.load_state(state.name) or state, source)
    await _until(lambda: cl.node_up(source), f"{source} back up")
    return FailoverRun(index=index, source=source, target=target,
                       lease_gone_s=t_gone - t0, decided_s=t_decided - t0,
                       qemu_up_s=t_qemu - t0, answers_s=t_answer - t0)


async def _cold_start(cl: ClusterClient, state: labmod.LabState, ip: str, node: str) -> float:
    t0 = time.monotonic()
    token = await vms_ctl.start_vm(cl, VM, node=node)
    await vms_ctl.wait_started(cl, VM, token=token)
    await wait_guest(state.layout.client_ns, ip, timeout=GIVE_UP_S)
    return time.monotonic() - t0


async def bench_failover(*, runs: int, memory_mib: int, say: Say, out: Path) -> FailoverReport:
    state = await asyncio.to_thread(labmod.up, labmod.current_layout(), say=say)
    store = EtcdStore(state.endpoints)
    cl = ClusterClient(store=store, keys=Keys(state.cluster))
    try:
        try:
            await vms_ctl.destroy_vm(cl, VM)
        except NotFound:
            pass
        spec = await vms_ctl.create_vm(cl, VM, memory_mib=memory_mib, ha=HaPolicy())
        ip = spec.nics[0].ip or ""
        cold: list[float] = []
        nodes = state.layout.node_names()
        for i in range(runs):
            cold.append(await _cold_start(cl, state, ip, nodes[i % len(nodes)]))
            say(f"baseline {i + 1}/{runs}: cold start to answering {cold[-1]:.1f}s")
            await vms_ctl.stop_vm(cl, VM, force=True)
            await vms_ctl.wait_stopped(cl, VM)
        await _cold_start(cl, state, ip, nodes[0])
        results = []
        for i in range(1, runs + 1):
            results.append(await _one_failover(state, cl, ip, index=i, say=say))
            await asyncio.sleep(1.0)
        info = await cl.node(nodes[0])
        report = _report(results, cold, info)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(asdict(report), indent=1))
        await vms_ctl.destroy_vm(cl, VM)
        return report
    finally:
        await store.close()


def _report(runs: list[FailoverRun], cold: list[float], info: NodeInfo) -> FailoverReport:
    return FailoverReport(runs=runs, cold_starts=cold, lease_ttl=info.lease_ttl,
                          watchdog_s=info.watchdog_s, fence_delay_s=info.fence_delay_s)

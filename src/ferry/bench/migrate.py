"""`ferry bench migrate`: Ferry's live migration against the same migration without Ferry.

Three modes, interleaved run by run so that both see the same machine:
- ferry:          `ferry vm migrate` through the store and the agents;
- direct:         two QEMU processes driven directly, with Ferry's migration parameters
                  (the ratio ferry/direct is Ferry's overhead);
- qemu-defaults:  the same direct migration with QEMU's default parameters (the baseline
                  the mission measured: 128 MiB/s, 300 ms downtime limit, 50 ms to announce).
Each VM has its own prober in the client namespace; "outage" is the longest gap between
ICMP answers during the migration.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ferry.agent.daemon import default_cpu_model
from ferry.agent.migrate_source import UNLIMITED_BANDWIDTH
from ferry.agent.migrate_target import ANNOUNCE
from ferry.bench import direct
from ferry.control import migrations as migs
from ferry.control import vms as vms_ctl
from ferry.control.client import ClusterClient
from ferry.lab import lab as labmod
from ferry.lab.guestctl import wait_guest
from ferry.lab.lab import Say
from ferry.lab.prober import outage
from ferry.model.errors import FerryError, NotFound
from ferry.model.migration import MigrationOptions, MigrationPhase
from ferry.qemu.argv import Hardware, RunPaths
from ferry.store.etcd import EtcdStore
from ferry.store.keys import Keys

FERRY_VM = "bench-ferry"
DIRECT_VM = "bench-direct"
MODES = ("ferry", "direct", "qemu-defaults")
QEMU_DEFAULTS = {"max-bandwidth": 128 * 2**20, "downtime-limit": 300}

@dataclass(frozen=True)
class Run:
    mode: str
    index: int
    hop: str
    ok: bool
    total_s: float
    qemu_total_ms: int
    downtime_ms: int
    switchover_ms: float
    bytes_sent: int
    outage_ms: float
    tcp_gap_ms: float
    tcp_survived: bool
    error: str = ""


async def _fresh_vm(cl: ClusterClient, name: str, memory_mib: int) -> None:
    try:
        await vms_ctl.destroy_vm(cl, name)
    except NotFound:
        pass
    await vms_ctl.create_vm(cl, name, memory_mib=memory_mib)


async def _ferry_hop(cl: ClusterClient, *, to: str, log: Path, index: int,
                     downtime_ms: int, bandwidth: int) -> Run:
    t0 = time.monotonic()
    options = MigrationOptions(downtime_limit_ms=downtime_ms, max_bandwidth=bandwidth)
    rec = await migs.request_migration(cl, FERRY_VM, to=to, options=options)
    final = rec
    async for view in migs.follow(cl, rec.id):
        final = view.record
    t1 = time.monotonic()
    await asyncio.sleep(1.0)
    o = outage(log, t0, t1)
    s = final.summary
    ok = final.phase is MigrationPhase.COMPLETED and s is not None
    # From the request to the source's exit, by the record's clock (not this poller's).
    total = (final.finished_at or time.time()) - final.created_at
    return Run(mode="ferry", index=index, hop=f"{final.source}->{final.target}", ok=ok,
               total_s=total, qemu_total_ms=s.qemu_total_ms if s else 0,
               downtime_ms=s.downtime_ms if s else 0,
               switchover_ms=(s.switchover_ms or 0.0) if s else 0.0,
               bytes_sent=s.bytes_sent if s else 0, outage_ms=o.icmp_gap_ms,
               tcp_gap_ms=o.tcp_gap_ms, tcp_survived=o.tcp_survived, error=final.error)


@dataclass
class DirectSide:
    vm: direct.DirectVm
    node: str


async def _direct_hop(state: labmod.LabState, side: DirectSide, spec_cl: ClusterClient, *,
                      mode: str, to: str, log: Path, index: int, downtime_ms: int,
                      bandwidth: int) -> Run:
    layout = state.layout
    spec = await spec_cl.spec(DIRECT_VM)
    hw = Hardware(accel="tcg", cpu_model=default_cpu_model("tcg"))
    if mode == "direct":
        params = {"max-bandwidth": bandwidth or UNLIMITED_BANDWIDTH,
                  "downtime-limit": downtime_ms}
        announce: dict[str, int] | None = dict(ANNOUNCE)
    else:
        params, announce = dict(QEMU_DEFAULTS), None
    t0 = time.monotonic()
    dst_addr = layout.migration_networks[0].node_address(layout.node_index(to))
    paths = RunPaths(layout.dir / "bench" / f"{to}-{index}-{mode}")
    new, res = await direct.migrate(
        side.vm, spec, dst_ns=layout.node_ns(to), dst_address=dst_addr, hw=hw, paths=paths,
        bridge="vmswitch", params=params, announce=announce)
    t1 = time.monotonic()
    hop = f"{side.node}->{to}"
    side.vm, side.node = new, to
    await asyncio.sleep(1.0)
    o = outage(log, t0, t1)
    return Run(mode=mode, index=index, hop=hop, ok=True, total_s=res.total_s,
               qemu_total_ms=res.qemu_total_ms, downtime_ms=res.downtime_ms,
               switchover_ms=res.switchover_ms, bytes_sent=res.bytes_sent,
               outage_ms=o.icmp_gap_ms, tcp_gap_ms=o.tcp_gap_ms, tcp_survived=o.tcp_survived)


async def bench_migrate(*, runs: int, memory_mib: int, downtime_ms: int, bandwidth: int,
                        say: Say, out: Path | None) -> list[Run]:
    """Ferry's runs, then the direct and QEMU-default runs (those two interleaved). Only the
    VM being measured runs, with only its own prober: on two cores a second guest and prober
    would take CPU from whichever migration is being measured."""
    state = await asyncio.to_thread(labmod.up, labmod.current_layout(),
                                    say=say)
    store = EtcdStore(state.endpoints)
    cl = ClusterClient(store=store, keys=Keys(state.cluster))
    results: list[Run] = []
    try:
        for name in (FERRY_VM, DIRECT_VM):
            await _fresh_vm(cl, name, memory_mib)
        results += await _ferry_block(state, cl, runs=runs, downtime_ms=downtime_ms,
                                      bandwidth=bandwidth, say=say)
        results += await _direct_block(state, cl, runs=runs, downtime_ms=downtime_ms,
                                       bandwidth=bandwidth, say=say)
    finally:
        await _remove_vms(cl)
        await store.close()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return results


def _say_run(say: Say, r: Run, runs: int) -> None:
    say(f"run {r.index + 1}/{runs} {r.mode:<13} {r.hop}: {r.total_s:.3f} s, downtime"
        f" {r.downtime_ms} ms, switchover {r.switchover_ms:.0f} ms, client outage"
        f" {r.outage_ms:.0f} ms{'' if r.ok else ' FAILED: ' + r.error}")


async def _ferry_block(state: labmod.LabState, cl: ClusterClient, *, runs: int,
                       downtime_ms: int, bandwidth: int, say: Say) -> list[Run]:
    token = await vms_ctl.start_vm(cl, FERRY_VM, node="node1")
    view = await vms_ctl.wait_started(cl, FERRY_VM, token=token)
    assert view.ip is not None
    await wait_guest(state.layout.client_ns, view.ip)
    pid, log = await asyncio.to_thread(labmod.start_prober, state, view.ip, tag="bench")
    say(f"{FERRY_VM} ({view.ip}) answers; prober started")
    results = []
    try:
        await asyncio.sleep(1.5)
        node = "node1"
        for i in range(runs):
            node = _other(node)
            r = await _ferry_hop(cl, to=node, log=log, index=i, downtime_ms=downtime_ms,
                                 bandwidth=bandwidth)
            _say_run(say, r, runs)
            results.append(r)
    finally:
        await asyncio.to_thread(labmod.stop_prober, state, pid)
        await vms_ctl.stop_vm(cl, FERRY_VM, force=True)
        await vms_ctl.wait_stopped(cl, FERRY_VM)
    return results


async def _direct_block(state: labmod.LabState, cl: ClusterClient, *, runs: int,
                        downtime_ms: int, bandwidth: int, say: Say) -> list[Run]:
    spec = await cl.spec(DIRECT_VM)
    ip = spec.nics[0].ip
    assert ip is not None
    vm = await direct.launch(spec, ns=state.layout.node_ns("node1"),
                             hw=Hardware(accel="tcg", cpu_model=default_cpu_model("tcg")),
                             paths=RunPaths(state.layout.dir / "bench" / "node1-start"),
                             bridge="vmswitch", incoming=False)
    side = DirectSide(vm=vm, node="node1")
    pid = 0
    results = []
    try:
        await wait_guest(state.layout.client_ns, ip)
        pid, log = await asyncio.to_thread(labmod.start_prober, state, ip, tag="bench")
        say(f"{DIRECT_VM} ({ip}) answers; prober started")
        await asyncio.sleep(1.5)
        for i in range(runs):
            for mode in MODES[1:]:
                r = await _direct_hop(state, side, cl, mode=mode, to=_other(side.node),
                                      log=log, index=i, downtime_ms=downtime_ms,
                                      bandwidth=bandwidth)
                _say_run(say, r, runs)
                results.append(r)
    finally:
        if pid:
            await asyncio.to_thread(labmod.stop_prober, state, pid)
        try:
            await direct.stop(side.vm, spec)
        except FerryError:
            side.vm.proc.kill()
    return results


def _other(node: str) -> str:
    return "node2" if node == "node1" else "node1"


async def _remove_vms(cl: ClusterClient) -> None:
    for name in (FERRY_VM, DIRECT_VM):
        try:
            await vms_ctl.destroy_vm(cl, name)
        except FerryError:
            pass


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass(frozen=True)
class ModeSummary:
    mode: str
    runs: int
    ok: int
    total_s: float
    downtime_ms: float
    switchover_ms: float
    outage_ms: float
    tcp_gap_ms: float
    tcp_survived: int


def summarize(results: list[Run]) -> list[ModeSummary]:
    out = []
    for mode in MODES:
        rs = [r for r in results if r.mode == mode]
        ok = [r for r in rs if r.ok]
        out.append(ModeSummary(
            mode=mode, runs=len(rs), ok=len(ok), total_s=median([r.total_s for r in ok]),
            downtime_ms=median([float(r.downtime_ms) for r in ok]),
            switchover_ms=median([r.switchover_ms for r in ok]),
            outage_ms=median([r.outage_ms for r in ok]),
            tcp_gap_ms=median([r.tcp_gap_ms for r in ok]),
            tcp_survived=sum(1 for r in ok if r.tcp_survived)))
    return out

"""The demo: what the README's first command shows."""

from __future__ import annotations

import asyncio
import functools
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click

from ferry.cli.connect import with_cluster
from ferry.cli.output import table
from ferry.cli.progress import summary_line, watch
from ferry.control import ha as ha_ctl
from ferry.control import migrations as migs
from ferry.control import vms as vms_ctl
from ferry.control.client import ClusterClient
from ferry.lab import faults
from ferry.lab import lab as labmod
from ferry.lab.guestctl import guest_get, wait_guest
from ferry.lab.prober import outage
from ferry.model.errors import FerryError, NotFound, Timeout
from ferry.model.ha import HaPolicy
from ferry.model.migration import MigrationPhase
from ferry.model.vm import VmState, parse_size


def _step(text: str) -> None:
    click.echo(click.style(f"==> {text}", bold=True))


async def _ensure_vm_on(cl: ClusterClient, name: str, *, memory: str, node: str) -> str:
    try:
        view = await vms_ctl.show_vm(cl, name)
    except NotFound:
        # HA, and its disk writer starts at every boot, stamping records with node:token.
        await vms_ctl.create_vm(cl, name, memory_mib=parse_size(memory) // 2**20,
                                ha=HaPolicy(), kernel_args="ferry.diskwriter=20")
        view = await vms_ctl.show_vm(cl, name)
        click.echo(f"  created {name} (highly available): disk {view.disk}")
    if view.state is VmState.RUNNING and view.node != node:
        await vms_ctl.stop_vm(cl, name, force=True)
        await vms_ctl.wait_stopped(cl, name)
        view = await vms_ctl.show_vm(cl, name)
    if view.state is not VmState.RUNNING:
        token = await vms_ctl.start_vm(cl, name, node=node)
        view = await vms_ctl.wait_started(cl, name, token=token)
    click.echo(f"  {name} runs on {view.node} (pid {view.pid}), address {view.ip}")
    assert view.ip is not None
    return view.ip


async def run_demo(*, vm_name: str, memory: str) -> None:
    _step("lab up: 3 nodes, a 3-member etcd, a client namespace")
    state = await asyncio.to_thread(
        labmod.up, labmod.current_layout(),
        say=lambda m: click.echo(f"  {m}"))
    ns = state.layout.client_ns
    _step(f"VM {vm_name} on the shared volume, started on node1")
    ip = await with_cluster(lambda cl: _ensure_vm_on(cl, vm_name, memory=memory, node="node1"))
    status = await wait_guest(ns, ip)
    click.echo(f"  guest answers: up {status['uptime']:.1f} s, boot id {status['boot_id'][:8]}")
    if not status["diskwriter"]["running"]:
        await guest_get(ns, ip, "/cgi-bin/diskwriter?op=start&rate=20&tag=demo")
    click.echo("  disk writer: appending checksummed records to the VM's disk, 20/s")
    pid, log = await asyncio.to_thread(labmod.start_prober, state, ip)
    click.echo(f"  prober in {ns}: ICMP and one TCP connection to {ip}:7, every 5 ms")
    await asyncio.sleep(1.5)
    rows = []
    try:
        for src, dst in (("node1", "node2"), ("node2", "node3"), ("node3", "node1")):
            _step(f"live migration {src} -> {dst}")
            rows.append(await with_cluster(functools.partial(_hop, vm=vm_name, dst=dst, log=log)))
            await asyncio.sleep(1.5)
    finally:
        await asyncio.to_thread(labmod.stop_prober, state, pid)
    await _closing(ns, ip, status, rows)
    await _failover(state, vm_name, ip)
    _look_around(ip)


async def _hop(cl: ClusterClient, *, vm: str, dst: str, log: Path) -> list[object]:
    t0 = time.monotonic()
    rec = await migs.request_migration(cl, vm, to=dst)
    final = await watch(cl, rec.id)
    t1 = time.monotonic()
    await asyncio.sleep(1.0)  # answers after the switch show whether TCP survived
    o = outage(log, t0, t1)
    click.echo("  " + summary_line(final))
    click.echo(f"  client: longest gap {o.icmp_gap_ms:.0f} ms (ICMP), {o.tcp_gap_ms:.0f} ms"
               f" (TCP); TCP connection {'survived' if o.tcp_survived else 'BROKE'}")
    s = final.summary
    ok = final.phase is MigrationPhase.COMPLETED and s is not None
    return [rec.id, f"{final.source}->{final.target}", final.phase.value,
            f"{s.total_s:.2f}" if ok and s else "-", f"{s.downtime_ms}" if ok and s else "-",
            f"{s.bytes_sent / 2**20:.0f}" if ok and s else "-", f"{o.icmp_gap_ms:.0f}",
            f"{o.tcp_gap_ms:.0f}", "yes" if o.tcp_survived else "NO"]


async def _closing(ns: str, ip: str, before: dict[str, object], rows: list[list[object]]) -> None:
    _step("summary")
    table(["MIGRATION", "HOP", "RESULT", "TOTAL S", "DOWNTIME MS", "SENT MIB",
           "CLIENT GAP MS", "TCP GAP MS", "TCP OK"], rows)
    after = await guest_get(ns, ip, "/cgi-bin/status")
    verify = await guest_get(ns, ip, "/cgi-bin/verify")
    same_boot = after["boot_id"] == before["boot_id"]
    click.echo(f"  guest uptime {after['uptime']:.1f} s, same boot: {'yes' if same_boot else 'NO'};"
               f" disk records 1..{verify['last']}, continuous:"
               f" {'yes' if verify['continuous'] else 'NO'}")


async def _failover(state: labmod.LabState, vm: str, ip: str) -> None:
    ns = state.layout.client_ns
    view = await with_cluster(lambda cl: vms_ctl.show_vm(cl, vm))
    node = view.node or "node1"
    _step(f"failover: pull the plug of {node} (every process of it dies: agent, QEMU)")
    t0 = time.monotonic()
    await asyncio.to_thread(faults.power_off, state, node)
    after = await _answering_elsewhere(ns, ip, node)
    took = time.monotonic() - t0
    evs, _ = await with_cluster(lambda cl: ha_ctl.list_events(cl, limit=5))
    for ev in evs:
        click.echo(f"  event {ev.kind.value}: {ev.message}")
    click.echo(f"  {vm} answers again after {took:.1f} s, on {after['diskwriter']['tag']}"
               " (node:fencing token), rebooted")
    await asyncio.to_thread(faults.power_on, labmod.load_state(state.name) or state, node)
    click.echo(f"  {node} powered on: it rejoins, and does not take {vm} back")
    await asyncio.sleep(3)
    verify = await guest_get(ns, ip, "/cgi-bin/verify")
    owners = " -> ".join(s["tag"] for s in verify.get("segments", []))
    click.echo(f"  disk records 1..{verify['last']}, continuous:"
               f" {'yes' if verify['continuous'] else 'NO'}; writers in order: {owners}")


async def _answering_elsewhere(ns: str, ip: str, node: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            status: dict[str, Any] = await guest_get(ns, ip, "/cgi-bin/status", timeout=1)
            if not status["diskwriter"].get("tag", "").startswith(f"{node}:"):
                return status
        except FerryError:
            pass
        await asyncio.sleep(0.25)
    raise Timeout("the VM did not answer from another node within 120 s")


def _look_around(ip: str) -> None:
    _step("look around")
    here = Path(sys.executable).parent
    if shutil.which("ferry") != str(here / "ferry"):
        click.echo(f"  (ferry is {here / 'ferry'}: export PATH={here}:$PATH)")
    click.echo("  ferry vm list            ferry vm show demo --json")
    click.echo("  ferry migration list     ferry migration show <ID>")
    click.echo("  ferry node list          ferry lab status          ferry events")
    click.echo("  ferry lab fault node2 isolate           (and heal; see ferry lab fault --help)")
    click.echo("  ferry vm migrate demo --to node2        (again, by hand)")
    click.echo("  ferry lab exec client -- ping -c3 " + ip)
    click.echo("  tear down: ferry lab down")

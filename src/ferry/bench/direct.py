"""The baseline: the same live migration driven directly between two QEMU processes, with no
Ferry around them (no store, no agents), in the same lab namespaces and on the same networks.

The timed span matches Ferry's: from creating the target QEMU to the source QEMU's exit.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from ferry.model.vm import VmSpec
from ferry.qemu.argv import Hardware, RunPaths, build_argv
from ferry.qemu.monitor import Monitor
from ferry.qemu.process import QemuProcess, cleanup, spawn
from ferry.shell import run


@dataclass(frozen=True)
class DirectResult:
    total_s: float
    qemu_total_ms: int
    downtime_ms: int
    switchover_ms: float
    bytes_sent: int


@dataclass
class DirectVm:
    """One running copy of the baseline VM: which namespace, its process and monitor."""

    ns: str
    proc: QemuProcess
    monitor: Monitor
    paths: RunPaths


async def _tap(ns: str, spec: VmSpec, bridge: str) -> None:
    tap = spec.tap_name(0)
    await run("ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap", check=False)
    await run("ip", "-n", ns, "link", "set", "dev", tap, "master", bridge, "up")


async def _drop_tap(ns: str, spec: VmSpec) -> None:
    await run("ip", "-n", ns, "link", "delete", "dev", spec.tap_name(0), check=False)


async def launch(spec: VmSpec, *, ns: str, hw: Hardware, paths: RunPaths, bridge: str,
                 incoming: bool) -> DirectVm:
    await _tap(ns, spec, bridge)
    argv = ["ip", "netns", "exec", ns, *build_argv(spec, hw=hw, paths=paths, incoming=incoming)]
    proc = await spawn(argv, paths=paths)
    monitor = Monitor(f"{spec.name}@{ns}")
    await monitor.connect(paths.qmp)
    return DirectVm(ns=ns, proc=proc, monitor=monitor, paths=paths)


async def stop(vm: DirectVm, spec: VmSpec) -> None:
    await vm.monitor.quit()
    await vm.monitor.close()
    if not await vm.proc.wait(timeout=5):
        vm.proc.kill()
        await vm.proc.wait(timeout=5)
    vm.proc.close()
    cleanup(vm.paths)
    await _drop_tap(vm.ns, spec)


async def migrate(src: DirectVm, spec: VmSpec, *, dst_ns: str, dst_address: str, hw: Hardware,
                  paths: RunPaths, bridge: str, params: Mapping[str, int],
                  announce: Mapping[str, int] | None) -> tuple[DirectVm, DirectResult]:
    """Migrate ``src`` to a new QEMU in ``dst_ns``; returns the new copy and the figures.
    ``announce``: announce parameters for the target (None: QEMU's defaults)."""
    t0 = time.monotonic()
    dst = await launch(spec, ns=dst_ns, hw=hw, paths=paths, bridge=bridge, incoming=True)
    await dst.monitor.set_capabilities({"events": True})
    if announce:
        await dst.monitor.set_parameters(announce)
    await src.monitor.set_capabilities({"events": True})
    await src.monitor.set_parameters(params)
    with dst.monitor.events("MIGRATION", "RESUME") as dst_events, \
            src.monitor.events("STOP") as src_events:
        await dst.monitor.migrate_incoming(f"tcp:{dst_address}:0")
        port = await dst.monitor.incoming_port()
        await src.monitor.migrate(f"tcp:{dst_address}:{port}")
        await dst_events.wait_for("MIGRATION", statuses=("completed", "failed"), timeout=600)
        await dst.monitor.cont()
        resumed = await dst_events.wait_for("RESUME", timeout=10)
        stopped = await src_events.wait_for("STOP", timeout=10)
    info = await src.monitor.completed_migrate_info()
    await stop(src, spec)
    total = time.monotonic() - t0
    return dst, DirectResult(total_s=total, qemu_total_ms=info.total_time_ms,
                             downtime_ms=info.downtime_ms,
                             switchover_ms=(resumed.timestamp - stopped.timestamp) * 1000,
                             bytes_sent=info.ram_transferred)

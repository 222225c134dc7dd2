"""The VMs this node runs: their QEMU processes, monitors and run directories.

Everything needed to re-adopt a VM after an agent restart is on disk in its run directory:
the pidfile, the QMP socket and meta.json (spec, role, token, migration).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ferry.model import codec
from ferry.model.errors import FerryError, QemuError, Unavailable
from ferry.model.vm import VmSpec
from ferry.network.tap import delete_tap, ensure_tap
from ferry.qemu.argv import Hardware, RunPaths, build_argv
from ferry.qemu.machines import resolve_machine
from ferry.qemu.monitor import Monitor
from ferry.qemu.process import QemuProcess, adopt, cleanup, spawn

log = logging.getLogger(__name__)


class Role(enum.Enum):
    PRIMARY = "primary"  # the VM's running copy
    INCOMING = "incoming"  # the target of a migration, not yet owner


@dataclass(frozen=True)
class LocalMeta:
    vm: str
    spec: VmSpec
    role: Role
    token: int
    accel: str
    cpu_model: str
    migration: str | None = None
    started_at: float = 0.0


@dataclass
class LocalVm:
    meta: LocalMeta
    proc: QemuProcess
    monitor: Monitor
    paths: RunPaths
    run_state: str = "unknown"
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.meta.vm

    @property
    def hardware(self) -> Hardware:
        return Hardware(accel=self.meta.accel, cpu_model=self.meta.cpu_model)


class Runtime:
    """The node's local QEMU processes, by VM name."""

    def __init__(self, run_dir: Path, *, bridge: str, qemu_binary: str,
                 on_change: Callable[[], None]) -> None:
        self.vms_dir = run_dir / "vms"
        self.bridge = bridge
        self.qemu_binary = qemu_binary
        self._on_change = on_change
        self.vms: dict[str, LocalVm] = {}

    def paths(self, vm: str) -> RunPaths:
        return RunPaths(self.vms_dir / vm)

    async def adopt_all(self) -> list[str]:
        """Re-attach to every QEMU that survived an agent restart; clear the rest."""
        adopted: list[str] = []
        if not self.vms_dir.exists():
            return adopted
        for d in sorted(self.vms_dir.iterdir()):
            paths = RunPaths(d)
            proc = adopt(paths)
            if proc is None:
                cleanup(paths)
                continue
            try:
                meta = codec.decode(LocalMeta, paths.meta.read_text())
                await self._attach(meta, proc, paths)
                adopted.append(meta.vm)
            except (OSError, FerryError) as err:
                log.error("cannot adopt QEMU pid %d in %s: %s; killing it", proc.pid, d, err)
                proc.kill()
                await proc.wait(timeout=5)
                cleanup(paths)
        return adopted

    async def start(self, spec: VmSpec, *, hw: Hardware, token: int, role: Role = Role.PRIMARY,
                    migration: str | None = None, ha: bool = False, tag: str = "",
                    may_start: Callable[[], bool] = lambda: True) -> LocalVm:
        """Create the taps, spawn QEMU (paused for an incoming migration), attach QMP.

        ``ha``: the HA marker exists before QEMU does, so no armed VM ever runs unguarded.
        ``tag``: told to a direct-boot guest as ``ferry.tag=`` (who runs it, under which token).
        ``may_start``: asked once more just before QEMU is spawned (the preparation takes
        time, during which the node may have lost its lease); Unavailable if it says no.
        """
        if spec.name in self.vms:
            raise QemuError(f"VM {spec.name} already has a QEMU on this node")
        paths = self.paths(spec.name)
        if role is Role.PRIMARY:  # a migration target gets the source's concrete type
            machine = await asyncio.to_thread(resolve_machine, self.qemu_binary, spec.machine)
            spec = replace(spec, machine=machine)
            if tag and spec.boot is not None:
                spec = replace(spec, boot=replace(
                    spec.boot, cmdline=f"{spec.boot.cmdline} ferry.tag={tag}".strip()))
        meta = LocalMeta(vm=spec.name, spec=spec, role=role, token=token, accel=hw.accel,
                         cpu_model=hw.cpu_model, migration=migration, started_at=time.time())
        for i, nic in enumerate(spec.nics):
            await ensure_tap(spec.tap_name(i), bridge=nic.bridge or self.bridge)
        paths.dir.mkdir(parents=True, exist_ok=True)
        self.set_marker(spec.name, on=ha)
        paths.meta.write_text(codec.encode(meta))
        argv = build_argv(spec, hw=hw, paths=paths, binary=self.qemu_binary,
                          incoming=role is Role.INCOMING)
        if not may_start():
            await self._remove_taps(spec)
            raise Unavailable(f"VM {spec.name}: not started, this node may no longer run it")
        try:
            proc = await spawn(argv, paths=paths)
        except QemuError:
            await self._remove_taps(spec)
            raise
        try:
            return await self._attach(meta, proc, paths)
        except BaseException:
            proc.kill()
            await proc.wait(timeout=5)
            await self._forget(spec.name, paths, spec)
            raise

    async def _attach(self, meta: LocalMeta, proc: QemuProcess, paths: RunPaths) -> LocalVm:
        monitor = Monitor(f"{meta.vm}@qmp")
        await monitor.connect(paths.qmp, timeout=10)
        vm = LocalVm(meta=meta, proc=proc, monitor=monitor, paths=paths)
        vm.run_state = await monitor.run_state()
        self.vms[meta.vm] = vm
        vm.tasks.append(asyncio.create_task(self._watch_exit(vm), name=f"exit:{meta.vm}"))
        vm.tasks.append(asyncio.create_task(self._watch_state(vm), name=f"state:{meta.vm}"))
        log.info("VM %s: attached to QEMU pid %d (%s, %s)", meta.vm, proc.pid,
                 meta.role.value, vm.run_state)
        return vm

    async def _watch_state(self, vm: LocalVm) -> None:
        with vm.monitor.events("STOP", "RESUME", "SHUTDOWN", "MIGRATION") as events:
            while True:
                ev = await events.get()
                with contextlib.suppress(QemuError):
                    vm.run_state = await vm.monitor.run_state()
                log.debug("VM %s: %s %s -> %s", vm.name, ev.name, ev.status, vm.run_state)
                self._on_change()

    async def _watch_exit(self, vm: LocalVm) -> None:
        await vm.proc.wait()
        log.info("VM %s: QEMU pid %d exited", vm.name, vm.proc.pid)
        for t in vm.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        await vm.monitor.close()
        vm.proc.close()
        if self.vms.get(vm.name) is vm:
            await self._forget(vm.name, vm.paths, vm.meta.spec)
        vm.exited.set()
        self._on_change()

    async def _forget(self, name: str, paths: RunPaths, spec: VmSpec) -> None:
        self.vms.pop(name, None)
        cleanup(paths)
        await self._remove_taps(spec)
        shutil.rmtree(paths.dir, ignore_errors=True)

    async def _remove_taps(self, spec: VmSpec) -> None:
        for i in range(len(spec.nics)):
            with contextlib.suppress(FerryError):
                await delete_tap(spec.tap_name(i))

    def set_marker(self, vm: str, *, on: bool) -> None:
        marker = self.paths(vm).ha_marker
        if on:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    def has_marker(self, vm: str) -> bool:
        return self.paths(vm).ha_marker.exists()

    def set_meta(self, vm: LocalVm, meta: LocalMeta) -> None:
        vm.meta = meta
        vm.paths.meta.write_text(codec.encode(meta))

    def promote(self, vm: LocalVm, *, token: int) -> None:
        """An incoming VM became the owner's running copy."""
        self.set_meta(vm, replace(vm.meta, role=Role.PRIMARY, token=token, migration=None))

    async def stop(self, vm: LocalVm, *, force: bool, timeout: float) -> None:
        """Stop the guest (ACPI power-off unless ``force``), then QEMU; kill after ``timeout``."""
        if not force and vm.run_state == "running":
            try:
                await vm.monitor.powerdown()
                if await _wait_event(vm.exited, timeout):
                    return
                log.warning("VM %s: guest did not power off in %.0fs; forcing", vm.name, timeout)
            except QemuError as err:
                log.warning("VM %s: powerdown failed (%s); forcing", vm.name, err)
        await self.kill(vm)

    async def kill(self, vm: LocalVm) -> None:
        """QMP quit, then SIGKILL; returns once the process is gone and cleaned up."""
        with contextlib.suppress(QemuError, TimeoutError):
            await asyncio.wait_for(vm.monitor.quit(), 5)
        if not await _wait_event(vm.exited, 5):
            vm.proc.kill()
            await _wait_event(vm.exited, 10)


async def _wait_event(ev: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(ev.wait(), timeout)
    except TimeoutError:
        return False
    return True

"""The node watchdog: a small process apart from the agent that kills the node's HA QEMUs
when the agent stops feeding it in time (the agent hangs, dies, or lost its lease).

The agent feeds it only while its lease is valid, so a hung agent and a cut-off agent look
the same to the watchdog: no food for ``timeout`` seconds -> every QEMU in the run directory
whose VM carries the HA marker gets SIGKILL. The fence delay the manager waits is longer than
this timeout (recovery.fence_delay), so those QEMUs are gone before their VMs start elsewhere.

Feeding is a datagram on a unix socket in the run directory: no connection to hang on. On
hosts with /dev/watchdog the process also keeps the hardware watchdog fed while it runs, so
a hung watchdog resets the host.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ferry.qemu.argv import RunPaths
from ferry.qemu.process import adopt

log = logging.getLogger("ferry.ha.watchdog")

TICK_S = 0.1
HW_DEVICE = Path("/dev/watchdog")


@dataclass(frozen=True)
class WatchdogPaths:
    run_dir: Path

    @property
    def socket(self) -> Path:
        return self.run_dir / "watchdog.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "watchdog.pid"

    @property
    def lock(self) -> Path:
        return self.run_dir / "watchdog.lock"

    @property
    def vms(self) -> Path:
        return self.run_dir / "vms"


def kill_ha_qemus(vms_dir: Path) -> list[tuple[str, int]]:
    """SIGKILL every QEMU under ``vms_dir`` that carries the HA marker; (vm, pid) killed."""
    killed: list[tuple[str, int]] = []
    if not vms_dir.is_dir():
        return killed
    for d in sorted(vms_dir.iterdir()):
        paths = RunPaths(d)
        if not paths.ha_marker.exists():
            continue
        proc = adopt(paths)  # checks the pid is still that QEMU, holds a pidfd
        if proc is None:
            continue
        try:
            proc.kill()
            killed.append((d.name, proc.pid))
        finally:
            proc.close()
    return killed


def run(run_dir: Path, *, timeout: float, hw_device: Path | None = None) -> None:
    """The watchdog process's main loop (``ferry watchdog``)."""
    paths = WatchdogPaths(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # One watchdog per run directory: the lock is held for the process's life, and taken
    # before the socket is touched, so a second one exits without stealing it.
    lock = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("watchdog: another one runs for %s; exiting", run_dir)
        os.close(lock)
        return
    paths.pidfile.write_text(str(os.getpid()))
    paths.socket.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(paths.socket))
    sock.settimeout(TICK_S)
    hw = _open_hw(hw_device)
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    fed_at: float | None = None  # disarmed until the first feed
    starved = False
    log.info("watchdog: pid %d, timeout %.1fs, %s", os.getpid(), timeout,
             f"hardware watchdog {hw_device}" if hw is not None else "no hardware watchdog")
    try:
        while not stop:
            with contextlib.suppress(TimeoutError, BlockingIOError):
                if sock.recv(64).startswith(b"feed"):
                    fed_at = time.monotonic()
            if hw is not None:
                os.write(hw, b"\0")
            if fed_at is not None and time.monotonic() - fed_at > timeout:
                # Until fed again, every HA QEMU that appears goes too: a start the agent
                # began before it hung may spawn one late.
                killed = kill_ha_qemus(paths.vms)
                if killed or not starved:
                    log.error("watchdog: agent silent for %.1fs: killed %s",
                              time.monotonic() - fed_at, ", ".join(
                                  f"{vm} (pid {pid})" for vm, pid in killed) or "no HA QEMU")
                starved = True
            else:
                starved = False
    finally:
        if hw is not None:
            os.write(hw, b"V")  # magic close: a clean stop does not reset the host
            os.close(hw)
        sock.close()
        paths.socket.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            if paths.pidfile.read_text().strip() == str(os.getpid()):
                paths.pidfile.unlink()
        os.close(lock)


def _open_hw(device: Path | None) -> int | None:
    if device is None or not device.exists():
        return None
    try:
        return os.open(device, os.O_WRONLY)
    except OSError as err:
        log.warning("watchdog: cannot open %s: %s; software watchdog only", device, err)
        return None


def running_pid(paths: WatchdogPaths) -> int | None:
    """The pid of this run directory's watchdog, if one runs."""
    try:
        pid = int(paths.pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    text = [a.decode(errors="replace") for a in cmdline]
    if "watchdog" in text and str(paths.run_dir) in text:
        return pid
    return None


class Feeder:
    """The agent's end: start the watchdog if none runs, and feed it."""

    def __init__(self, run_dir: Path, *, timeout: float, hw_device: Path | None = None) -> None:
        self.paths = WatchdogPaths(run_dir)
        self.timeout = timeout
        self.hw_device = hw_device
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def ensure_running(self) -> int:
        pid = running_pid(self.paths)
        if pid is not None:
            return pid
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "ferry", "watchdog", "--run-dir", str(self.paths.run_dir),
                "--timeout", str(self.timeout)]
        if self.hw_device is not None:
            argv += ["--device", str(self.hw_device)]
        log_file = open(self.paths.run_dir / "watchdog.log", "ab")  # noqa: SIM115
        with log_file:
            # Its own session: it outlives the agent and no signal to the agent reaches it.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=log_file, start_new_session=True)
        for _ in range(100):  # until the one that holds the lock has its socket
            pid = running_pid(self.paths)
            if pid is not None and self.paths.socket.exists():
                log.info("watchdog runs (pid %d, timeout %.1fs)", pid, self.timeout)
                return pid
            time.sleep(0.02)
        log.warning("watchdog (pid %d) did not come up within 2 s", proc.pid)
        return proc.pid

    def feed(self) -> bool:
        try:
            self._sock.sendto(b"feed", str(self.paths.socket))
        except OSError as err:
            log.warning("cannot feed the watchdog: %s", err)
            return False
        return True

    def close(self) -> None:
        self._sock.close()

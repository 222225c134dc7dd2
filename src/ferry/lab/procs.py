"""Processes the lab starts (etcd, agents, the prober): start detached, find, and kill by PID.

A PID is only signalled after /proc/PID/cmdline shows the marker the lab started it with,
so a PID reused by someone else's process is never touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def start_detached(argv: list[str], *, log: Path, env: dict[str, str] | None = None) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, env=env,
        )
    return proc.pid


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def stat_state(stat: str) -> str:
    """The state letter of a /proc/PID/stat line (R, S, T stopped, Z zombie, ...). The command
    name before it is in parentheses and may itself hold spaces and parentheses."""
    return stat.rsplit(")", 1)[1].split()[0]


def proc_state(pid: int) -> str | None:
    try:
        return stat_state(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, IndexError):
        return None


def is_running(pid: int | None, marker: str) -> bool:
    """True for a live process (also a stopped one) whose command line holds ``marker``."""
    if not pid:
        return False
    line = cmdline(pid)
    if not line or marker not in line:
        return False
    state = proc_state(pid)
    return state is not None and state != "Z"


def is_stopped(pid: int | None, marker: str) -> bool:
    """Stopped by SIGSTOP (what the lab's freeze does)."""
    return is_running(pid, marker) and pid is not None and proc_state(pid) == "T"


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop(pid: int | None, marker: str, *, timeout: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL after ``timeout``; True if a process was stopped."""
    if pid is None or not is_running(pid, marker):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)  # a frozen process acts on SIGTERM only once continued
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not is_running(pid, marker):
            return True
        time.sleep(0.05)
    kill(pid, marker)
    return True


def kill(pid: int | None, marker: str, *, sig: int = signal.SIGKILL) -> bool:
    if pid is None or not is_running(pid, marker):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    for _ in range(100):
        _reap(pid)
        if sig != signal.SIGKILL or not is_running(pid, marker):
            break
        time.sleep(0.02)
    return True


def kill_all(pids: list[int]) -> list[int]:
    """SIGKILL each PID, without a marker check: for the processes of a namespace, which are
    all the lab's by construction. Returns those that were signalled."""
    killed = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(pid)
    for pid in killed:
        _reap(pid)  # our own children (agents the lab started here) would stay zombies
    return killed


def qemu_pids(run_dir: Path) -> list[int]:
    """QEMU processes whose pidfile is under a node's run directory (and still match)."""
    pids = []
    for pidfile in sorted(run_dir.glob("vms/*/qemu.pid")):
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        if is_running(pid, str(pidfile.parent)):
            pids.append(pid)
    return pids

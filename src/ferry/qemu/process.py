"""QEMU processes: spawn (daemonized, so they outlive the agent), adopt after an agent restart,
wait for exit, and stop.

QEMU runs with ``-daemonize``: when the spawning command returns 0, the process is set up,
its QMP socket listens and its pidfile is written; errors before that come back on stderr.
A spawned process is therefore found exactly like an adopted one: by its pidfile, checked
against /proc/PID/cmdline, and held by a pidfd so that a reused PID is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from ferry.model.errors import QemuError
from ferry.qemu.argv import RunPaths


@dataclass
class QemuProcess:
    pid: int
    paths: RunPaths
    pidfd: int

    def alive(self) -> bool:
        try:
            signal.pidfd_send_signal(self.pidfd, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, sig)

    async def wait(self, *, timeout: float | None = None) -> bool:
        """Wait until the process has exited; False on timeout."""
        if not self.alive():
            return True
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(self.pidfd, ready)
        try:
            await asyncio.wait_for(done, timeout)
            return True
        except TimeoutError:
            return not self.alive()
        finally:
            loop.remove_reader(self.pidfd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.pidfd)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def adopt(paths: RunPaths) -> QemuProcess | None:
    """The QEMU whose pidfile is in ``paths``, if it still runs with that QMP socket."""
    try:
        pid = int(paths.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    argv = _cmdline(pid)
    if not argv or not any(str(paths.qmp) in a for a in argv):
        return None  # gone, or the PID now belongs to someone else
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    proc = QemuProcess(pid=pid, paths=paths, pidfd=pidfd)
    # The PID could have been reused between the check and pidfd_open: check again.
    if not any(str(paths.qmp) in a for a in _cmdline(pid)):
        proc.close()
        return None
    return proc


def _normal_priority() -> None:
    # The agent may run at a raised priority; its guests must not inherit it.
    os.setpriority(os.PRIO_PROCESS, 0, 0)


async def spawn(argv: list[str], *, paths: RunPaths, timeout: float = 30.0) -> QemuProcess:
    """Start QEMU daemonized; return once it is set up. QemuError with QEMU's message."""
    paths.dir.mkdir(parents=True, exist_ok=True)
    for stale in (paths.pidfile, paths.qmp, paths.qmp_aux):
        stale.unlink(missing_ok=True)
    log = open(paths.log, "ab")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, "-daemonize",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.PIPE,
            preexec_fn=_normal_priority,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError as exc:
            proc.kill()
            raise QemuError(f"QEMU did not finish starting within {timeout:.0f}s") from exc
    finally:
        log.close()
    if proc.returncode != 0:
        msg = err.decode(errors="replace").strip().splitlines()
        detail = msg[-1] if msg else f"exit code {proc.returncode}"
        with open(paths.log, "ab") as f:
            f.write(err)
        raise QemuError(f"QEMU failed to start: {detail}")
    adopted = adopt(paths)
    if adopted is None:
        raise QemuError("QEMU started but exited at once (see its log)")
    return adopted


def cleanup(paths: RunPaths) -> None:
    """Remove what a QEMU that has exited leaves behind (not its logs)."""
    for f in (paths.pidfile, paths.qmp, paths.qmp_aux):
        f.unlink(missing_ok=True)

"""The node watchdog, with harmless stand-ins for QEMU: sleeping Python processes whose
command line names their run directory's QMP socket, as a real QEMU's does.

Every process a test starts is killed and reaped in a ``finally`` (the ``procs`` fixture),
whether or not the watchdog got to it first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ferry.ha.watchdog import Feeder, WatchdogPaths, kill_ha_qemus, running_pid
from ferry.qemu.argv import RunPaths

TIMEOUT = 0.5


class Procs:
    """The processes a test started, so that none outlives it."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[bytes]] = []
        self.pids: list[int] = []  # started by someone else, killed by pid

    def fake_qemu(self, vms_dir: Path, name: str, *, marked: bool,
                  socket_of: str | None = None) -> subprocess.Popen[bytes]:
        """A sleeping process with ``<run dir>/qmp.sock`` on its command line (or the
        socket of another VM's dir, ``socket_of``), its pidfile, and maybe the HA marker."""
        paths = RunPaths(vms_dir / name)
        paths.dir.mkdir(parents=True)
        qmp = RunPaths(vms_dir / socket_of).qmp if socket_of else paths.qmp
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(qmp)],
                                stdin=subprocess.DEVNULL)
        self.popens.append(proc)
        # Popen returns as soon as exec began; the new command line shows a moment later
        # (a real QEMU writes its pidfile long after that).
        assert wait_for(lambda: str(qmp).encode() in cmdline(proc.pid))
        paths.pidfile.write_text(f"{proc.pid}\n")
        if marked:
            paths.ha_marker.touch()
        return proc

    def popen(self, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(argv, **kw)  # type: ignore[call-overload]
        self.popens.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.popens:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.cleanup()


def wait_for(cond: Callable[[], bool], *, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


# --- kill_ha_qemus -----------------------------------------------------------------


def test_only_marked_qemus_are_killed(tmp_path: Path, procs: Procs) -> None:
    vms = tmp_path / "vms"
    ha1 = procs.fake_qemu(vms, "ha1", marked=True)
    ha2 = procs.fake_qemu(vms, "ha2", marked=True)
    plain = procs.fake_qemu(vms, "plain", marked=False)
    killed = kill_ha_qemus(vms)
    assert killed == [("ha1", ha1.pid), ("ha2", ha2.pid)]
    assert ha1.wait(timeout=2) == -signal.SIGKILL
    assert ha2.wait(timeout=2) == -signal.SIGKILL
    assert alive(plain)


def test_a_pid_that_is_not_that_dirs_qemu_is_spared(tmp_path: Path, procs: Procs) -> None:
    vms = tmp_path / "vms"
    plain = procs.fake_qemu(vms, "plain", marked=False)
    # A marked dir whose pidfile names a process of another run dir (a reused PID).
    impostor = RunPaths(vms / "impostor")
    impostor.dir.mkdir()
    impostor.ha_marker.touch()
    impostor.pidfile.write_text(str(plain.pid))
    # A marked dir whose process names another dir's socket.
    other = procs.fake_qemu(vms, "other", marked=True, socket_of="plain")
    assert kill_ha_qemus(vms) == []
    assert alive(plain)
    assert alive(other)


def test_a_process_without_any_socket_on_its_command_line_is_spared(
        tmp_path: Path, procs: Procs) -> None:
    paths = RunPaths(tmp_path / "vms" / "vm1")
    paths.dir.mkdir(parents=True)
    sleeper = procs.popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert wait_for(lambda: b"time.sleep" in cmdline(sleeper.pid))
    paths.pidfile.write_text(str(sleeper.pid))
    paths.ha_marker.touch()
    assert kill_ha_qemus(tmp_path / "vms") == []
    assert alive(sleeper)


def test_stale_missing_and_garbled_pidfiles_are_skipped(tmp_path: Path, procs: Procs) -> None:
    vms = tmp_path / "vms"
    gone = procs.fake_qemu(vms, "gone", marked=True)
    gone.kill()
    gone.wait()
    nopid = RunPaths(vms / "nopid")
    nopid.dir.mkdir()
    nopid.ha_marker.touch()
    garbled = RunPaths(vms / "garbled")
    garbled.dir.mkdir()
    garbled.ha_marker.touch()
    garbled.pidfile.write_text("not a pid")
    (vms / "stray-file").write_text("x")
    live = procs.fake_qemu(vms, "live", marked=True)
    assert kill_ha_qemus(vms) == [("live", live.pid)]


def test_no_vms_dir_kills_nothing(tmp_path: Path) -> None:
    assert kill_ha_qemus(tmp_path / "missing") == []


# --- finding a running watchdog ------------------------------------------------------


def test_running_pid_without_a_pidfile(tmp_path: Path) -> None:
    assert running_pid(WatchdogPaths(tmp_path)) is None


@pytest.mark.parametrize("content", ["garbage", "", "999999999"])
def test_running_pid_with_a_bad_pidfile(tmp_path: Path, content: str) -> None:
    paths = WatchdogPaths(tmp_path)
    paths.pidfile.write_text(content)
    assert running_pid(paths) is None


def test_running_pid_ignores_a_process_that_is_not_this_dirs_watchdog(tmp_path: Path) -> None:
    paths = WatchdogPaths(tmp_path)
    paths.pidfile.write_text(str(os.getpid()))  # pytest: no "watchdog", not this dir
    assert running_pid(paths) is None


def test_feeding_without_a_watchdog_fails_softly(tmp_path: Path) -> None:
    feeder = Feeder(tmp_path, timeout=TIMEOUT)
    try:
        assert feeder.feed() is False
    finally:
        feeder.close()


# --- the real process -----------------------------------------------------------------


def test_the_watchdog_process_fires_only_after_a_feed_and_silence(
        tmp_path: Path, procs: Procs) -> None:
    run_dir = tmp_path / "run"
    vms = run_dir / "vms"
    ha = procs.fake_qemu(vms, "ha1", marked=True)
    plain = procs.fake_qemu(vms, "plain", marked=False)
    paths = WatchdogPaths(run_dir)
    log = tmp_path / "watchdog.log"
    with open(log, "wb") as out:
        wd = procs.popen([sys.executable, "-m", "ferry", "watchdog", "--run-dir", str(run_dir),
                          "--timeout", str(TIMEOUT)],
                         stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    feeder = Feeder(run_dir, timeout=TIMEOUT)
    try:
        assert wait_for(paths.socket.exists), log.read_text()
        assert wait_for(lambda: running_pid(paths) == wd.pid)

        time.sleep(TIMEOUT + 0.2)  # silence before any feed: not armed
        assert alive(ha) and alive(plain) and alive(wd)

        assert feeder.feed()
        time.sleep(0.3)
        assert feeder.feed()  # fed in time: the countdown starts again
        last_feed = time.monotonic()
        time.sleep(0.3)
        assert alive(ha), "killed although fed within the timeout"

        assert wait_for(lambda: not alive(ha), timeout=2.0)
        starved = time.monotonic() - last_feed
        assert starved >= TIMEOUT - 0.05
        assert ha.returncode == -signal.SIGKILL
        assert alive(plain)
        assert alive(wd)  # it goes on, disarmed, after firing
        assert wait_for(lambda: "killed ha1" in log.read_text(), timeout=1.0)

        wd.send_signal(signal.SIGTERM)
        assert wd.wait(timeout=2) == 0
        assert not paths.socket.exists()
        assert not paths.pidfile.exists()
    finally:
        feeder.close()


def test_feeder_starts_one_watchdog_and_reuses_it(tmp_path: Path, procs: Procs) -> None:
    run_dir = tmp_path / "run"
    feeder = Feeder(run_dir, timeout=TIMEOUT)
    pid = None
    try:
        pid = feeder.ensure_running()
        procs.pids.append(pid)
        paths = WatchdogPaths(run_dir)
        assert paths.socket.exists()
        assert wait_for(lambda: running_pid(paths) == pid)
        assert feeder.ensure_running() == pid  # no second one
        assert feeder.feed()
        assert (run_dir / "watchdog.log").exists()
    finally:
        feeder.close()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def test_a_second_watchdog_for_the_same_run_dir_exits_and_leaves_the_first_fed(
        tmp_path: Path, procs: Procs) -> None:
    run_dir = tmp_path / "run"
    feeder = Feeder(run_dir, timeout=TIMEOUT)
    try:
        first = feeder.ensure_running()
        procs.pids.append(first)
        # Started behind the feeder's back, as a racing agent would: it finds the lock held.
        second = subprocess.run(
            [sys.executable, "-m", "ferry", "watchdog", "--run-dir", str(run_dir),
             "--timeout", str(TIMEOUT)], capture_output=True, timeout=10)
        assert second.returncode == 0
        assert running_pid(WatchdogPaths(run_dir)) == first
        assert feeder.feed()  # the first one's socket is still there
        assert feeder.ensure_running() == first
    finally:
        feeder.close()

"""The lab guest, booted for real: network services, HTTP endpoints, tools, power-off.

One guest boots (TCG, 256 MB) in a network namespace of its own, with a bridge that has
an address the test talks from, and a tap for the guest. The tests run in file order
against it; the last powers it off over QMP, reads its disk from the host and boots a
second guest on the same disk to show that the record sequence goes on across boots.
Every QEMU is killed by PID and the namespace deleted when the module ends, pass or fail.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ferry.lab.diskrecords import check_records, read_records
from ferry.lab.guest import GuestImage, build_guest_image, guest_cmdline

pytestmark = pytest.mark.lab

GUEST_IP = "10.79.0.10"
HOST_IP = "10.79.0.1"
MAC = "52:54:00:12:34:56"
BOOT_TAG = "boot-node:1"
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # If pytest itself is killed, take QEMU along instead of leaving it running.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=timeout)


def eventually(probe: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = probe()
            if result:
                return result
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as err:
            last = err
        time.sleep(step)
    raise AssertionError(f"{what}: not within {timeout} s (last error: {last})")


def wait_for(net: Net, path: str, ok: Callable[[dict[str, Any]], bool], timeout: float,
             what: str) -> dict[str, Any]:
    """Polls a guest endpoint until its JSON satisfies ``ok``; returns that JSON."""
    def probe() -> dict[str, Any] | None:
        status = net.get(path)
        return status if ok(status) else None

    result: dict[str, Any] = eventually(probe, timeout, what)
    return result


@dataclass
class Net:
    ns: str
    tap: str

    def exec(self, *args: str, check: bool = True,
             timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.ns, *args, check=check, timeout=timeout)

    def get(self, path: str) -> dict[str, Any]:
        # Not wget's -T: Debian 12's busybox wget crashes with it; the timeout is run's.
        out = self.exec("busybox", "wget", "-q", "-O", "-", f"http://{GUEST_IP}{path}").stdout
        result: dict[str, Any] = json.loads(out)
        return result

    def ping(self) -> bool:
        return self.exec("busybox", "ping", "-c", "1", "-W", "1", GUEST_IP,
                         check=False).returncode == 0


@pytest.fixture(scope="module")
def image() -> GuestImage:
    started = time.monotonic()
    built = build_guest_image(progress=lambda msg: print(f"guest image: {msg}"))
    print(f"guest image ready in {time.monotonic() - started:.2f} s: {built.initrd}")
    return built


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    ns, tap = f"ferry-gt{os.getpid()}", f"gt{os.getpid()}"
    run("ip", "netns", "add", ns)
    try:
        for args in (["link", "set", "lo", "up"], ["link", "add", "br0", "type", "bridge"],
                     ["addr", "add", f"{HOST_IP}/24", "dev", "br0"], ["link", "set", "br0", "up"],
                     ["tuntap", "add", "dev", tap, "mode", "tap"],
                     ["link", "set", tap, "master", "br0", "up"]):
            run("ip", "-n", ns, *args)
        yield Net(ns, tap)
    finally:
        run("ip", "netns", "del", ns, check=False)


@dataclass
class Guest:
    proc: subprocess.Popen[bytes]
    qmp_path: Path
    serial: Path
    started: float
    log: list[str] = field(default_factory=list)

    def qmp(self, command: str) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.qmp_path))
            stream = sock.makefile("rwb")
            json.loads(stream.readline())  # the greeting
            for cmd in ("qmp_capabilities", command):
                stream.write(json.dumps({"execute": cmd}).encode() + b"\n")
                stream.flush()
                while True:
                    reply: dict[str, Any] = json.loads(stream.readline())
                    if "return" in reply or "error" in reply:
                        break
            return reply

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@dataclass
class Lab:
    """Starts guests on one disk in the module's namespace, and remembers them to kill."""

    image: GuestImage
    net: Net
    work: Path
    disk: Path
    guests: list[Guest] = field(default_factory=list)

    def start(self, cmdline: str) -> Guest:
        n = len(self.guests)
        qmp, serial = self.work / f"qmp{n}.sock", self.work / f"serial{n}.log"
        # ip netns exec execs QEMU, so the PID we hold is QEMU's.
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.net.ns, "qemu-system-x86_64", "-accel", "tcg",
             "-m", "256", "-nodefaults", "-display", "none", "-kernel", str(self.image.kernel),
             "-initrd", str(self.image.initrd), "-append", cmdline,
             "-drive", f"if=none,id=d0,file={self.disk},format=qcow2",
             "-device", "virtio-blk-pci,drive=d0",
             "-netdev", f"tap,id=n0,ifname={self.net.tap},script=no,downscript=no",
             "-device", f"virtio-net-pci,netdev=n0,mac={MAC}",
             "-serial", f"file:{serial}", "-qmp", f"unix:{qmp},server=on,wait=off"],
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)  # noqa: PLW1509
        self.guests.append(Guest(proc, qmp, serial, time.monotonic()))
        return self.guests[-1]


@pytest.fixture(scope="module")
def lab(image: GuestImage, net: Net, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    work = tmp_path_factory.mktemp("guest")
    disk = work / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(disk), "256M")
    the_lab = Lab(image, net, work, disk)
    try:
        yield the_lab
    finally:
        for guest in the_lab.guests:
            guest.kill()


@pytest.fixture(scope="module")
def guest(lab: Lab, net: Net) -> Guest:
    vm = lab.start(guest_cmdline(ip=GUEST_IP, hostname="labvm", diskwriter_rate=20, tag=BOOT_TAG))
    eventually(net.ping, 90, "the guest answering ping", step=0.05)
    print(f"first ping answered {time.monotonic() - vm.started:.2f} s after QEMU started")
    eventually(lambda: "ferry-guest: ready" in vm.serial.read_text(errors="replace"), 30,
               "the guest's services listening", step=0.05)
    print(f"services ready {time.monotonic() - vm.started:.2f} s after QEMU started")
    return vm


def test_ping(guest: Guest, net: Net) -> None:
    assert net.ping()


def test_tcp_echo(guest: Guest, net: Net) -> None:
    client = (
        "import socket,sys\n"
        f"s=socket.create_connection(('{GUEST_IP}',7),timeout=10)\n"
        "msgs=[b'hello ferry\\n',b'x'*5000]\n"
        "for m in msgs:\n"
        "  s.sendall(m); got=b''\n"
        "  while len(got)<len(m): got+=s.recv(65536)\n"
        "  assert got==m,(got[:40],m[:40])\n"
        "print('ok')\n"
    )
    assert net.exec(sys.executable, "-c", client).stdout.strip() == "ok"


def test_status_reports_a_growing_uptime(guest: Guest, net: Net) -> None:
    first = eventually(lambda: net.get("/cgi-bin/status"), 30, "the status endpoint")
    assert first["hostname"] == "labvm"
    assert first["ip"] == f"{GUEST_IP}/24"
    assert len(first["boot_id"]) == 36
    assert isinstance(first["echo_connections"], int)
    time.sleep(1.0)
    second = net.get("/cgi-bin/status")
    assert second["uptime"] > first["uptime"]
    assert second["boot_id"] == first["boot_id"]
    assert net.get("/")["boot_id"] == first["boot_id"]


def test_disk_writer_started_at_boot(guest: Guest, net: Net) -> None:
    status = wait_for(net, "/cgi-bin/diskwriter", lambda st: st["last_seq"] >= 5, 60,
                      "records from the boot writer")
    assert status["running"] and status["tag"] == BOOT_TAG and status["first_seq"] == 1


def test_memdirty_reports_progress(guest: Guest, net: Net) -> None:
    started = net.get("/cgi-bin/memdirty?op=start&mib=32&rate=16")
    assert started["running"] and started["working_set_mib"] == 32
    status = wait_for(net, "/cgi-bin/memdirty", lambda st: st["mib_dirtied"] >= 40, 30,
                      "memdirty making progress")
    assert status["passes"] >= 1 and status["running"]
    assert 8 <= status["avg_rate_mibps"] <= 20
    stopped = net.get("/cgi-bin/memdirty?op=stop")
    assert stopped["running"] is False
    assert net.get("/cgi-bin/status")["memdirty"]["running"] is False


def test_bad_parameters_are_refused(guest: Guest, net: Net) -> None:
    result = net.exec("busybox", "wget", "-q", "-O", "-",
                      f"http://{GUEST_IP}/cgi-bin/memdirty?op=start&mib=lots&rate=1", check=False)
    assert result.returncode != 0 and "400" in result.stderr


def test_disk_writer_restart_verify_and_host_read(guest: Guest, net: Net, lab: Lab) -> None:
    restarted = net.get("/cgi-bin/diskwriter?op=start&rate=50&tag=node-b%3A2")
    assert restarted["running"] and restarted["tag"] == "node-b:2" and restarted["first_seq"] > 1
    wait_for(net, "/cgi-bin/diskwriter", lambda st: st["written"] >= 20, 30, "new records")
    final = net.get("/cgi-bin/diskwriter?op=stop")
    assert final["running"] is False and final["errors"] == 0
    verify = net.get("/cgi-bin/verify")
    assert verify["continuous"] and verify["first"] == 1 and verify["bad_crc"] == 0
    assert verify["last"] == final["last_seq"] == verify["records"]
    assert [s["tag"] for s in verify["segments"]] == [BOOT_TAG, "node-b:2"]
    boot_id = net.get("/cgi-bin/status")["boot_id"]

    assert guest.qmp("system_powerdown") == {"return": {}}
    started = time.monotonic()
    guest.proc.wait(timeout=30)
    print(f"QEMU exited {time.monotonic() - started:.2f} s after system_powerdown")
    assert "reboot: Power down" in guest.serial.read_text(errors="replace")

    check = check_records(read_records(lab.disk))
    assert check.continuous and check.count == verify["records"]
    assert (check.first, check.last) == (1, final["last_seq"])
    assert [(s.tag, s.boot_id) for s in check.segments] == [(BOOT_TAG, boot_id),
                                                            ("node-b:2", boot_id)]

    # A second boot on the same disk continues the sequence under its own boot id.
    second = lab.start(guest_cmdline(ip=GUEST_IP, hostname="labvm2", diskwriter_rate=0,
                                tag="node-c:3"))
    wait_for(net, "/cgi-bin/diskwriter", lambda st: st["written"] >= 50, 90,
             "the second boot writing")
    assert net.get("/cgi-bin/diskwriter?op=stop")["first_seq"] == final["last_seq"] + 1
    assert second.qmp("system_powerdown") == {"return": {}}
    second.proc.wait(timeout=30)
    after = check_records(read_records(lab.disk))
    assert after.continuous and after.last is not None and after.last >= final["last_seq"] + 50
    assert after.segments[-1].tag == "node-c:3" and after.segments[-1].boot_id != boot_id

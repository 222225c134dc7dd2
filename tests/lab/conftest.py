"""The lab for end-to-end tests: one real 3-node cluster per test session.

It has its own name, interface tag and subnets, so it never touches a lab a person has up
(`ferry lab up` uses the name "ferry"). It is taken down when the session ends, pass or
fail, and the teardown checks that no namespace, link or process of it is left.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ferry.control import vms as vms_ctl
from ferry.control.client import ClusterClient
from ferry.lab import lab as labmod
from ferry.lab import netsetup, procs
from ferry.lab.guestctl import guest_get, wait_guest
from ferry.lab.layout import LabLayout
from ferry.model.errors import FerryError
from ferry.model.ha import HaPolicy
from ferry.store.etcd import EtcdStore
from ferry.store.keys import Keys

# FERRY_TEST_LAB=name,tag,octet runs a second session beside this one (other addresses).
_NAME, _TAG, _OCTET = os.environ.get("FERRY_TEST_LAB", "ferrytest,ft,97").split(",")
LAYOUT = LabLayout(name=_NAME, nodes=3, tag=_TAG, octet=int(_OCTET))


def _leftovers(layout: LabLayout) -> list[str]:
    left = [ns for ns in netsetup.namespaces() if ns.startswith(layout.name + "-")]
    left += [n.bridge for n in layout.networks if netsetup.link_exists(n.bridge)]
    out = subprocess.run(["pgrep", "-af", str(layout.dir)], capture_output=True, text=True)
    left += [line for line in out.stdout.splitlines() if "pgrep" not in line]
    return left


@pytest.fixture(scope="session")
def lab() -> Iterator[labmod.LabState]:
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root (namespaces, bridges, taps)")
    os.environ["FERRY_LAB"] = LAYOUT.name
    labmod.down(LAYOUT.name, say=lambda m: None)  # a previous run that was killed
    try:
        yield labmod.up(LAYOUT, say=lambda m: print(f"lab: {m}"))
    finally:
        labmod.down(LAYOUT.name, say=lambda m: print(f"lab down: {m}"))
        left = _leftovers(LAYOUT)
        assert not left, f"the lab left behind: {left}"


@dataclass(frozen=True)
class Cli:
    code: int
    out: str
    err: str


def ferry(*args: str, timeout: float = 180) -> Cli:
    """The `ferry` command as a user runs it (against the test lab)."""
    env = dict(os.environ, FERRY_LAB=LAYOUT.name)
    p = subprocess.run([sys.executable, "-m", "ferry", *args], capture_output=True, text=True,
                       timeout=timeout, env=env)
    return Cli(code=p.returncode, out=p.stdout, err=p.stderr)


@pytest.fixture
async def cl(lab: labmod.LabState) -> AsyncIterator[ClusterClient]:
    store = EtcdStore(lab.endpoints)
    try:
        yield ClusterClient(store=store, keys=Keys(lab.cluster))
    finally:
        await store.close()


@dataclass(frozen=True)
class Vm:
    name: str
    ip: str
    client_ns: str

    async def get(self, path: str, timeout: float = 5) -> Any:
        return await guest_get(self.client_ns, self.ip, path, timeout=timeout)


@pytest.fixture
async def make_vm(lab: labmod.LabState, cl: ClusterClient) -> AsyncIterator[
        Callable[..., Any]]:
    """Create and start a VM on a node, wait until its guest answers; removed afterwards."""
    made: list[str] = []

    async def make(name: str, *, node: str = "node1", memory_mib: int = 256,
                   ha: HaPolicy | None = None, kernel_args: str = "") -> Vm:
        await vms_ctl.create_vm(cl, name, memory_mib=memory_mib, ha=ha, kernel_args=kernel_args)
        made.append(name)
        token = await vms_ctl.start_vm(cl, name, node=node)
        view = await vms_ctl.wait_started(cl, name, token=token)
        assert view.ip is not None
        await wait_guest(lab.layout.client_ns, view.ip)
        return Vm(name=name, ip=view.ip, client_ns=lab.layout.client_ns)

    yield make
    for name in made:
        try:
            await vms_ctl.destroy_vm(cl, name)
        except FerryError as err:
            print(f"cleanup of {name}: {err}")


@pytest.fixture
def prober(lab: labmod.LabState) -> Iterator[Callable[[str], Any]]:
    started: list[int] = []

    def start(ip: str) -> Any:
        pid, log = labmod.start_prober(lab, ip, tag="test")
        started.append(pid)
        return log

    yield start
    for pid in started:
        labmod.stop_prober(lab, pid)


def qemu_pids(lab: labmod.LabState, node: str, vm: str) -> list[int]:
    """QEMU processes of ``vm`` on ``node`` (by the node's run directory)."""
    return [p for p in procs.qemu_pids(lab.layout.run_dir(node))
            if f"/vms/{vm}/" in procs.cmdline(p)]


def all_qemu_pids(lab: labmod.LabState, vm: str) -> dict[str, list[int]]:
    return {n: qemu_pids(lab, n, vm) for n in lab.layout.node_names()}


async def eventually(probe: Callable[[], Any], *, timeout: float, what: str,
                     step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = probe()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")

"""`ferry lab fault`: each drill does what it says to the real lab, and is undone.

The lab is shared by the whole session: every test puts back what it broke (in `finally`)
and waits until the node is alive again before it returns.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from ferry.control.client import ClusterClient
from ferry.lab import faults, netsetup, procs
from ferry.lab import lab as labmod
from ferry.store.etcd import EtcdStore
from tests.lab.conftest import LAYOUT, Cli, eventually, ferry

pytestmark = pytest.mark.lab

_CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1)"


def _reaches(ns: str, url: str) -> bool:
    """Whether a TCP connection from namespace ``ns`` to ``url``'s host and port succeeds."""
    u = urlsplit(url)
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _CONNECT,
                        str(u.hostname), str(u.port)], capture_output=True, timeout=30)
    return p.returncode == 0


def _pings(ns: str, address: str) -> bool:
    p = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c1", "-W1", address],
                       capture_output=True, timeout=30)
    return p.returncode == 0


def _state() -> labmod.LabState:
    state = labmod.load_state(LAYOUT.name)
    assert state is not None
    return state


async def _fault(*args: str) -> Cli:
    res = await asyncio.to_thread(ferry, "lab", "fault", *args)
    assert res.code == 0, res.err
    assert len(res.out.strip().splitlines()) == 1, res.out
    return res


async def _refused(*args: str, words: str) -> None:
    res = await asyncio.to_thread(ferry, "lab", "fault", *args)
    lines = res.err.strip().splitlines()
    assert res.code != 0 and len(lines) == 1 and lines[0].startswith("error: "), res.err
    assert words in lines[0], lines[0]


async def _status() -> str:
    res = await asyncio.to_thread(ferry, "lab", "status")
    assert res.code == 0, res.err
    return res.out


def _row(status: str, first: str) -> list[str]:
    return next(line.split() for line in status.splitlines() if line.startswith(first + " "))


async def _alive(cl: ClusterClient, node: str, *, timeout: float = 30) -> None:
    async def alive() -> bool:
        return await cl.store.get(cl.keys.node_alive(node)) is not None
    await eventually(alive, timeout=timeout, what=f"{node}'s alive key")


async def test_isolate_cuts_the_node_off_etcd_and_heal_restores_it(
        lab: labmod.LabState, cl: ClusterClient) -> None:
    node, ns = "node3", lab.layout.node_ns("node3")
    other = lab.layout.cluster.node_address(1)
    assert all(_reaches(ns, url) for url in lab.endpoints)
    res = await _fault(node, "isolate")
    assert "isolated" in res.out
    try:
        assert not any(_reaches(ns, url) for url in lab.endpoints)
        assert not _pings(ns, other)
        # The shared volume is a host directory: still there.
        ls = subprocess.run(["ip", "netns", "exec", ns, "ls", str(lab.layout.volume_dir)],
                            capture_output=True, timeout=30)
        assert ls.returncode == 0
        assert _row(await _status(), node)[3] == "ISOLATED"
        await _refused(node, "isolate", words="already isolated")
    finally:
        if netsetup.link_is_up(lab.layout.root_peer(3, lab.layout.cluster)) is False:
            await asyncio.to_thread(faults.heal, lab, node)
    await eventually(lambda: all(_reaches(ns, url) for url in lab.endpoints), timeout=15,
                     what="etcd to be reachable from node3 again")
    assert _pings(ns, other)
    assert _row(await _status(), node)[3] == "up"
    await _refused(node, "heal", words="not isolated")
    await _alive(cl, node)


async def test_freeze_stops_the_agent_and_thaw_continues_it(
        lab: labmod.LabState, cl: ClusterClient) -> None:
    node = "node2"
    pid = _state().agent_pids[node]
    assert procs.proc_state(pid) in ("S", "R")
    res = await _fault(node, "freeze-agent")
    assert str(pid) in res.out
    try:
        assert procs.proc_state(pid) == "T"
        assert _row(await _status(), node)[5] == "FROZEN"
        await _refused(node, "freeze-agent", words="already frozen")
    finally:
        if procs.proc_state(pid) == "T":
            await asyncio.to_thread(faults.thaw_agent, lab, node)
    assert procs.proc_state(pid) in ("S", "R")
    assert _state().agent_pids[node] == pid  # the same process, continued
    await _refused(node, "thaw-agent", words="not frozen")
    await _alive(cl, node)


def _etcd_running() -> list[bool]:
    state = _state()
    return [procs.is_running(state.etcd_member_pid(m.index), m.marker)
            for m in state.layout.etcd_members]


async def test_kill_leader_leaves_a_working_cluster_and_start_brings_it_back(
        lab: labmod.LabState) -> None:
    assert _etcd_running() == [True, True, True]
    res = await _fault("etcd", "kill-leader")
    try:
        killed = next(m for m in lab.layout.etcd_members if f" {m.name} " in res.out)
        assert _etcd_running() == [m != killed for m in lab.layout.etcd_members]
        store = EtcdStore(lab.endpoints, timeout=10)
        try:
            await store.put("lab-fault-test/kill-leader", killed.name)
            got = await store.get("lab-fault-test/kill-leader")
            assert got is not None and got.value == killed.name
            await store.delete("lab-fault-test/", prefix=True)
        finally:
            await store.close()
        assert _row(await _status(), killed.name)[3:5] == ["NOT", "RUNNING"]
    finally:
        if not all(_etcd_running()):
            await asyncio.to_thread(faults.start_etcd, lab)
    assert _etcd_running() == [True, True, True]
    leaders = [_row(await _status(), m.name)[-1] for m in lab.layout.etcd_members]
    assert sorted(leaders) == ["no", "no", "yes"]
    await _refused("etcd", "start", words="every etcd member is running")


async def test_power_off_kills_every_process_of_the_node_and_power_on_brings_it_back(
        lab: labmod.LabState, cl: ClusterClient) -> None:
    node, ns = "node3", lab.layout.node_ns("node3")
    # Besides the agent, a process and a tap, as a VM's QEMU and its NIC would be.
    sleeper = procs.start_detached(["ip", "netns", "exec", ns, "sleep", "600"],
                                   log=lab.layout.log_path("fault-test"))
    netsetup.ip("tuntap", "add", "dev", "fttap9", "mode", "tap", ns=ns)
    await eventually(lambda: sleeper in netsetup.namespace_pids(ns), timeout=5,
                     what="the sleeper in node3")
    before = netsetup.namespace_pids(ns)
    assert _state().agent_pids[node] in before
    res = await _fault(node, "power-off")
    try:
        assert netsetup.namespace_pids(ns) == []
        await eventually(lambda: all(_gone(p) for p in before), timeout=5,
                         what="node3's processes to be gone")
        links = netsetup.link_names(ns)
        assert "fttap9" not in links and {"cl0", "vmswitch"} <= set(links)
        assert ns in netsetup.namespaces()
        assert all(str(p) in res.out for p in before)
        assert _row(await _status(), node)[2] == "off"
        await _refused(node, "power-off", words="already powered off")
        await _refused(node, "freeze-agent", words="powered off")

        async def expired() -> bool:
            return await cl.store.get(cl.keys.node_alive(node)) is None
        await eventually(expired, timeout=20, what="node3's alive key to expire")
    finally:
        if node in _state().powered_off:
            await asyncio.to_thread(faults.power_on, lab, node)
    await _alive(cl, node)
    assert _row(await _status(), node)[2:4] == ["on", "up"]
    await _refused(node, "power-on", words="is on")


def _gone(pid: int) -> bool:
    try:  # the sleeper is this process's child: reap it, or it stays a zombie
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return procs.proc_state(pid) in (None, "Z")


async def test_bad_targets_change_nothing(lab: labmod.LabState) -> None:
    before = _state()
    for args, words in [(("node7", "power-off"), "no fault target 'node7'"),
                        (("node1", "explode"), "no node fault 'explode'"),
                        (("etcd", "isolate"), "no etcd fault 'isolate'")]:
        await _refused(*args, words=words)
    assert _state() == before

"""VM operations and refusals end to end, and the agent's re-adoption after SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import pytest

from ferry.control import migrations as migs
from ferry.control import vms as vms_ctl
from ferry.control.client import ClusterClient
from ferry.lab import lab as labmod
from ferry.lab import procs
from ferry.model.vm import VmState
from tests.lab.conftest import LAYOUT, all_qemu_pids, eventually, ferry, qemu_pids

pytestmark = pytest.mark.lab


def _one_line_error(res: Any, *words: str) -> None:
    assert res.code != 0
    assert "Traceback" not in res.err
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.err
    for w in words:
        assert w in lines[0], lines[0]


async def test_bad_requests_get_one_clear_line_and_change_nothing(
        lab: labmod.LabState, cl: ClusterClient, make_vm: Any) -> None:
    vm = await make_vm("bad-input", node="node1")
    _, owner_rev = await cl.owner(vm.name)
    migrations = len(await migs.list_migrations(cl))

    _one_line_error(await asyncio.to_thread(ferry, "vm", "migrate", vm.name, "--to", "node1"),
                    "already runs on node1")
    _one_line_error(await asyncio.to_thread(ferry, "vm", "migrate", vm.name, "--to", "node9"),
                    "node9", "does not exist")
    _one_line_error(await asyncio.to_thread(ferry, "vm", "migrate", "no-such-vm", "--to",
                                            "node2"), "no-such-vm", "does not exist")
    _one_line_error(await asyncio.to_thread(ferry, "vm", "start", vm.name, "--node", "node2"),
                    "already running on node1")
    _one_line_error(await asyncio.to_thread(ferry, "vm", "create", "Bad_Name"), "invalid")
    _one_line_error(await asyncio.to_thread(ferry, "vm", "create", vm.name), "already exists")
    _one_line_error(await asyncio.to_thread(ferry, "vm", "delete", vm.name), "not stopped")
    _one_line_error(await asyncio.to_thread(ferry, "migration", "cancel", "nope"),
                    "does not exist")

    assert (await cl.owner(vm.name))[1] == owner_rev
    assert len(await migs.list_migrations(cl)) == migrations
    assert all_qemu_pids(lab, vm.name)["node2"] == []
    assert len(qemu_pids(lab, "node1", vm.name)) == 1


async def test_show_and_list_as_json(lab: labmod.LabState, make_vm: Any) -> None:
    vm = await make_vm("json-vm", node="node2")
    res = await asyncio.to_thread(ferry, "vm", "show", vm.name, "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert (data["node"], data["state"], data["ip"]) == ("node2", "running", vm.ip)
    listed = json.loads((await asyncio.to_thread(ferry, "vm", "list", "--json")).out)
    assert any(v["name"] == vm.name and v["node"] == "node2" for v in listed)
    nodes = json.loads((await asyncio.to_thread(ferry, "node", "list", "--json")).out)
    assert {n["info"]["name"]: n["state"] for n in nodes} == {
        "node1": "up", "node2": "up", "node3": "up"}


async def test_stop_and_start_again(lab: labmod.LabState, cl: ClusterClient,
                                    make_vm: Any) -> None:
    vm = await make_vm("stop-start", node="node3")
    res = await asyncio.to_thread(ferry, "vm", "stop", vm.name)  # ACPI power-off
    assert res.code == 0, res.err
    assert (await vms_ctl.show_vm(cl, vm.name)).state is VmState.STOPPED
    assert all_qemu_pids(lab, vm.name) == {"node1": [], "node2": [], "node3": []}
    res = await asyncio.to_thread(ferry, "vm", "start", vm.name, "--node", "node1")
    assert res.code == 0, res.err
    assert "running on node1" in res.out


async def test_agent_killed_and_restarted_adopts_its_vm(
        lab: labmod.LabState, cl: ClusterClient, make_vm: Any) -> None:
    vm = await make_vm("adopt", node="node2")
    (pid,) = qemu_pids(lab, "node2", vm.name)
    boot = (await vm.get("/cgi-bin/status"))["boot_id"]
    state = labmod.load_state(LAYOUT.name)
    assert state is not None
    agent = state.agent_pids["node2"]
    os.kill(agent, signal.SIGKILL)
    await eventually(lambda: not procs.is_running(agent, "node2"), timeout=10,
                     what="the agent to die")
    # The VM does not depend on its agent.
    assert (await vm.get("/cgi-bin/status"))["boot_id"] == boot
    await asyncio.to_thread(labmod.up, LAYOUT, say=lambda m: None)  # restarts the agent
    new_state = labmod.load_state(LAYOUT.name)
    assert new_state is not None and new_state.agent_pids["node2"] != agent

    async def reported() -> bool:
        view = await vms_ctl.show_vm(cl, vm.name)
        return view.state is VmState.RUNNING and view.pid == pid
    await eventually(reported, timeout=20, what="the new agent to report the adopted VM")
    assert qemu_pids(lab, "node2", vm.name) == [pid]
    assert (await vm.get("/cgi-bin/status"))["boot_id"] == boot
    # ...and it can still migrate it.
    res = await asyncio.to_thread(ferry, "vm", "migrate", vm.name, "--to", "node3")
    assert res.code == 0, res.err


def test_lab_up_is_idempotent(lab: labmod.LabState) -> None:
    before = labmod.load_state(LAYOUT.name)
    res = ferry("lab", "up")
    assert res.code == 0, res.err
    after = labmod.load_state(LAYOUT.name)
    assert before is not None and after is not None
    assert after.agent_pids == before.agent_pids and after.etcd_pids == before.etcd_pids
    res = ferry("lab", "status")
    assert res.code == 0 and "NOT RUNNING" not in res.out, res.out


def test_lab_exec_runs_in_the_node_namespace(lab: labmod.LabState) -> None:
    res = ferry("lab", "exec", "node2", "--", "ip", "-o", "-4", "addr", "show", "dev", "cl0")
    assert res.code == 0, res.err
    assert lab.layout.cluster.node_address(2) in res.out
    res = ferry("lab", "exec", "client", "--", "ip", "-o", "link", "show", "vmswitch")
    assert res.code != 0  # the client has no switch: it is really another namespace
    bad = ferry("lab", "exec", "node7", "--", "true")
    _one_line_error(bad, "node7")

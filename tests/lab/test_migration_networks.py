"""Migration networks for real: published links, fallback on a link down, gateway refusal."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from ferry.control import migrations as migs
from ferry.control import vms as vms_ctl
from ferry.control.client import ClusterClient
from ferry.lab import lab as labmod
from ferry.lab import netsetup
from ferry.model.migration import MigrationOptions, MigrationRecord
from ferry.model.migration import MigrationPhase as P
from ferry.model.vm import VmState
from tests.lab.conftest import LAYOUT, all_qemu_pids, eventually, ferry

pytestmark = pytest.mark.lab

NODES = ["node1", "node2", "node3"]


async def networks() -> dict[str, Any]:
    res = await asyncio.to_thread(ferry, "network", "list", "--json")
    assert res.code == 0, res.err
    return {n["name"]: n for n in json.loads(res.out)["networks"]}


async def wait_link(network: str, node: str, state: str, *, gateway: bool | None = None) -> None:
    """Until the node's agent has published ``state`` for its link (and the gateway)."""
    async def seen() -> bool:
        net = (await networks()).get(network)
        if net is None:
            return False
        member = next((m for m in net["members"] if m["node"] == node), None)
        return member is not None and member["state"] == state and (
            gateway is None or net["gateway"] == gateway)
    await eventually(seen, timeout=15, what=f"{node}'s link on {network} to be {state}",
                     step=0.3)


def net_action(node: str, network: str, action: str) -> None:
    netsetup.net_action(LAYOUT, node, network, action)


def step_1(rec: MigrationRecord) -> str:
    return next(e.note for e in rec.timeline if e.phase is P.CONNECTING)


async def migrate(cl: ClusterClient, vm: str, to: str) -> MigrationRecord:
    res = await asyncio.to_thread(ferry, "vm", "migrate", vm, "--to", to)
    assert res.code == 0, res.err + res.out
    recs = [r for r in await migs.list_migrations(cl) if r.vm == vm]
    return recs[-1]


async def test_network_list_shows_both_migration_networks_up_on_every_node(
        lab: labmod.LabState) -> None:
    for net in LAYOUT.migration_networks:
        for node in NODES:
            await wait_link(net.name, node, "up")
    nets = await networks()
    assert nets["cluster"]["role"] == "cluster"
    for i, net in enumerate(LAYOUT.migration_networks):
        got = nets[net.name]
        assert (got["role"], got["subnets"], got["gateway"], got["priority"]) == (
            "migration", [net.subnet], False, i + 1)
        assert [(m["node"], m["address"], m["interface"], m["state"], m["node_up"])
                for m in got["members"]] == [
            (n, net.node_address(LAYOUT.node_index(n)), net.node_if, "up", True)
            for n in NODES]
    res = await asyncio.to_thread(ferry, "network", "list")
    assert res.code == 0, res.err
    assert "migration order: migration, migration2" in res.out


async def test_a_link_down_on_the_target_moves_the_migration_to_the_next_network(
        lab: labmod.LabState, cl: ClusterClient, make_vm: Any) -> None:
    vm = await make_vm("net-fallback", node="node1")
    boot = (await vm.get("/cgi-bin/status"))["boot_id"]
    try:
        net_action("node2", "migration", "cut")  # the cable: node2 sees no carrier
        await wait_link("migration", "node2", "down")
        rec = await migrate(cl, vm.name, "node2")
        assert (rec.phase, rec.network) == (P.COMPLETED, "migration2")
        assert "skipped migration: link down on node2" in step_1(rec)

        net_action("node3", "migration", "down")  # the node sets its own interface down
        await wait_link("migration", "node3", "down")
        rec = await migrate(cl, vm.name, "node3")
        assert (rec.phase, rec.network) == (P.COMPLETED, "migration2")
        assert "skipped migration: link down on node2 and node3" in step_1(rec)
    finally:
        net_action("node2", "migration", "plug")
        net_action("node3", "migration", "up")
    await wait_link("migration", "node2", "up")
    await wait_link("migration", "node3", "up")
    rec = await migrate(cl, vm.name, "node1")  # back on the first network once it is up
    assert (rec.phase, rec.network) == (P.COMPLETED, "migration")
    assert "skipped" not in step_1(rec)
    view = await vms_ctl.show_vm(cl, vm.name)
    assert (view.node, view.state) == ("node1", VmState.RUNNING)
    assert (await vm.get("/cgi-bin/status"))["boot_id"] == boot


async def _ended(cl: ClusterClient, mid: str) -> MigrationRecord:
    async def ended() -> MigrationRecord | None:
        rec, _ = await cl.migration(mid)
        return rec if rec.phase.terminal else None
    rec: MigrationRecord = await eventually(ended, timeout=60, what="the migration to end")
    return rec


async def test_a_network_with_a_default_gateway_is_refused(
        lab: labmod.LabState, cl: ClusterClient, make_vm: Any) -> None:
    vm = await make_vm("net-gateway", node="node1")
    boot = (await vm.get("/cgi-bin/status"))["boot_id"]
    hop = f"{LAYOUT.migration_networks[1].subnet_prefix}.1"
    try:
        net_action("node2", "migration2", "gateway")
        await wait_link("migration2", "node2", "up", gateway=True)

        forced = await migs.request_migration(
            cl, vm.name, to="node2", options=MigrationOptions(network="migration2"))
        rec = await _ended(cl, forced.id)
        assert rec.phase is P.FAILED
        assert rec.error == ("the requested network cannot be used: migration2: has a default"
                             f" gateway (node2 via {hop}) (not allowed without allow_gateway)")
        view = await vms_ctl.show_vm(cl, vm.name)
        assert (view.node, view.state, view.migration) == ("node1", VmState.RUNNING, None)
        assert all_qemu_pids(lab, vm.name)["node2"] == []

        # In the priority order, the gateway network is skipped rather than refused.
        res = await asyncio.to_thread(ferry, "network", "priority", "migration2", "migration")
        assert res.code == 0, res.err
        rec = await migrate(cl, vm.name, "node2")
        assert (rec.phase, rec.network) == (P.COMPLETED, "migration")
        assert f"skipped migration2: has a default gateway (node2 via {hop})" in step_1(rec)
    finally:
        net_action("node2", "migration2", "no-gateway")
        await asyncio.to_thread(ferry, "network", "priority", "--clear")
    assert (await vm.get("/cgi-bin/status"))["boot_id"] == boot


async def test_network_priority_refuses_unknown_names(lab: labmod.LabState) -> None:
    res = await asyncio.to_thread(ferry, "network", "priority", "migration", "nonet")
    assert res.code == 2
    assert res.err.strip() == ("error: unknown network 'nonet': no node is on it (migration"
                               " networks: migration, migration2)")
    res = await asyncio.to_thread(ferry, "network", "priority")
    assert res.out.strip() == ("migration order: migration, migration2 (each source node's"
                               " configured order; set with `ferry network priority`)")

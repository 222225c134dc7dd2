"""Bugs a review found, kept as tests: config validation, kill reasons, start while stopping."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from ferry.agent.config import parse_config
from ferry.agent.reconcile import KillVm, LocalFacts, LocalRole, Snapshot, VmFacts, decide
from ferry.control.vms import start_vm, stop_vm
from ferry.model.errors import Conflict, InvalidSpec
from ferry.model.vm import DiskSpec, Owner, Power, VmSpec
from tests.unit.control_harness import make_cluster, running_vm
from tests.unit.test_agent_config import MINIMAL


def doc(extra: str = "") -> dict[str, Any]:
    return tomllib.loads(MINIMAL + extra)


def test_migration_network_written_as_a_single_table_is_invalid_spec() -> None:
    # [network.migration] instead of [[network.migration]]: a one-character slip.
    d = doc('\n[network.migration]\nname = "migration"\naddress = "10.78.0.11"\n')
    with pytest.raises(InvalidSpec, match=r"network\.migration"):
        parse_config(d, where="node1.toml")


@pytest.mark.parametrize("value", [[1], ["migration"], "migration"])
def test_migration_network_entries_must_be_tables(value: object) -> None:
    d = doc()
    d["network"]["migration"] = value
    with pytest.raises(InvalidSpec, match=r"node1\.toml.*network\.migration.* must be"):
        parse_config(d, where="node1.toml")


def test_bad_node_name_names_the_file_and_section() -> None:
    d = doc()
    d["node"]["name"] = "Node_1"
    with pytest.raises(InvalidSpec, match=r"^node1\.toml \[node\]"):
        parse_config(d, where="node1.toml")


@pytest.mark.parametrize(("key", "value"), [("lease_ttl", True), ("resync_s", False),
                                            ("lease_ttl", 0), ("resync_s", -1.0)])
def test_timings_must_be_positive_numbers(key: str, value: object) -> None:
    d = doc()
    d["timing"] = {key: value}
    with pytest.raises(InvalidSpec, match=rf"\[timing\].*'{key}'"):
        parse_config(d, where="node1.toml")


def test_kill_reason_of_a_vm_owned_by_no_node() -> None:
    spec = VmSpec(name="vm1", uid="0123456789ab", memory_mib=256, vcpus=1, volume="v",
                  config_path="/c", disks=(DiskSpec(path="/d", size_bytes=1),), nics=())
    snap = Snapshot(
        node="node1",
        vms={"vm1": VmFacts(spec=spec, owner=Owner(node=None, power=Power.OFF), owner_rev=3,
                            status=None)},
        migrations={},
        local={"vm1": LocalFacts(role=LocalRole.PRIMARY, run_state="running", token=1,
                                 migration=None, pid=1)},
    )
    assert decide(snap).actions == (KillVm(vm="vm1", why="owned by nobody"),)


async def test_start_refuses_a_vm_that_is_still_stopping(tmp_path: Path) -> None:
    c = await make_cluster(tmp_path)
    await c.add_node("node1")
    await c.add_node("node2")
    await running_vm(c, "vm1", "node1")
    await stop_vm(c.cl, "vm1")  # graceful: node1's QEMU still runs and reports RUNNING
    rev = c.revision
    with pytest.raises(Conflict, match="stopping"):
        await start_vm(c.cl, "vm1", node="node2")
    assert c.revision == rev

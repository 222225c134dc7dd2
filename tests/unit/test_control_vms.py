"""VM operations of the control layer against MemoryStore and a tmp volume.

Every refused operation must leave the store as it was: its revision does not move.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from ferry.control.vms import (
    create_vm,
    delete_vm,
    list_vms,
    save_config,
    show_vm,
    start_vm,
    stop_vm,
    vm_state,
    wait_started,
    wait_stopped,
)
from ferry.model import codec
from ferry.model.errors import Conflict, FerryError, InvalidSpec, NotFound, Timeout
from ferry.model.vm import Owner, Power, VmSpec, VmState, VmStatus
from ferry.storage.volume import vm_dir
from ferry.store.base import Compare, Put, TxnOp, TxnResult
from ferry.store.memory import MemoryStore
from tests.unit.control_harness import Cluster, make_cluster, running_vm

MiB = 1024**2


@pytest.fixture
async def c(tmp_path: Path) -> Cluster:
    return await make_cluster(tmp_path)


async def spec_of(c: Cluster, name: str) -> VmSpec:
    e = await c.store.get(c.keys.vm_spec(name))
    assert e is not None
    return codec.decode(VmSpec, e.value)


async def claims(c: Cluster) -> dict[str, str]:
    entries, _ = await c.store.get_prefix(c.keys.ip_claims)
    return {e.key.rsplit("/", 1)[1]: e.value for e in entries}


class Interfering(MemoryStore):
    """Another client changes ``key`` just before our next transaction that writes it."""

    def __init__(self, key: str, value: str) -> None:
        super().__init__()
        self.key = key
        self.value = value

    async def txn(self, compares: Sequence[Compare], success: Sequence[TxnOp],
                  failure: Sequence[TxnOp] = ()) -> TxnResult:
        if any(isinstance(op, Put) and op.key == self.key for op in success) and self.value:
            value, self.value = self.value, ""
            await self.put(self.key, value)
        return await super().txn(compares, success, failure)


async def copy_into(c: Cluster, store: MemoryStore) -> None:
    entries, _ = await c.store.get_prefix(c.keys.root)
    for e in entries:
        await store.put(e.key, e.value)
    c.cl.store = store


# --- create --------------------------------------------------------------------------


async def test_create_writes_spec_owner_claim_and_files(c: Cluster) -> None:
    rev = c.revision
    spec = await create_vm(c.cl, "vm1", memory_mib=128, vcpus=2, disk_size=4 * MiB)
    assert c.revision == rev + 1  # one transaction
    assert await spec_of(c, "vm1") == spec
    assert await c.owner("vm1") == Owner(node=None, power=Power.OFF)
    assert spec.memory_mib == 128 and spec.vcpus == 2
    assert spec.volume == "shared0"
    assert spec.nics[0].ip == "10.79.0.10"
    assert await claims(c) == {"10.79.0.10": "vm1"}
    d = vm_dir(c.volume, "vm1")
    assert (d / "disk0.qcow2").is_file()
    assert spec.disks[0].path == str(d / "disk0.qcow2")
    assert spec.disks[0].size_bytes == 4 * MiB
    assert codec.decode(VmSpec, (d / "vm.json").read_text()) == spec
    spec.check()


async def test_create_gives_each_vm_its_own_uid_and_mac(c: Cluster) -> None:
    a = await create_vm(c.cl, "a", disk_size=MiB)
    b = await create_vm(c.cl, "b", disk_size=MiB)
    assert a.uid != b.uid
    assert a.nics[0].mac != b.nics[0].mac
    assert a.tap_name(0) != b.tap_name(0)


async def test_ip_allocation_skips_claimed_addresses(c: Cluster) -> None:
    await c.store.put(c.keys.ip_claim("10.79.0.10"), "someone")
    await c.store.put(c.keys.ip_claim("10.79.0.12"), "else")
    a = await create_vm(c.cl, "a", disk_size=MiB)
    b = await create_vm(c.cl, "b", disk_size=MiB)
    assert a.nics[0].ip == "10.79.0.11"
    assert b.nics[0].ip == "10.79.0.13"
    assert (await claims(c))["10.79.0.13"] == "b"


async def test_ip_allocation_reuses_an_address_after_delete(c: Cluster) -> None:
    await create_vm(c.cl, "a", disk_size=MiB)
    await create_vm(c.cl, "b", disk_size=MiB)
    await delete_vm(c.cl, "a")
    again = await create_vm(c.cl, "c", disk_size=MiB)
    assert again.nics[0].ip == "10.79.0.10"


async def test_no_free_address_is_a_conflict_and_changes_nothing(tmp_path: Path) -> None:
    c = await make_cluster(tmp_path)
    for host in range(10, 255):
        await c.store.put(c.keys.ip_claim(f"10.79.0.{host}"), "x")
    rev = c.revision
    with pytest.raises(Conflict, match="no free address"):
        await create_vm(c.cl, "vm1", disk_size=MiB)
    assert c.revision == rev
    assert not vm_dir(c.volume, "vm1").exists()


async def test_create_without_vm_network_has_no_address(tmp_path: Path) -> None:
    c = await make_cluster(tmp_path, vm_network=False)
    spec = await create_vm(c.cl, "vm1", disk_size=MiB)
    assert spec.nics[0].ip is None
    assert await claims(c) == {}


async def test_create_with_boot_image_puts_address_and_hostname_on_the_cmdline(
    tmp_path: Path,
) -> None:
    c = await make_cluster(tmp_path, boot=True)
    spec = await create_vm(c.cl, "web-1", disk_size=MiB)
    assert spec.boot is not None
    assert spec.boot.kernel == str(tmp_path / "vmlinuz")
    assert spec.boot.cmdline.split() == ["console=ttyS0", "ferry.hostname=web-1",
                                         "ferry.ip=10.79.0.10/24"]


async def test_create_with_a_missing_kernel_is_refused(tmp_path: Path) -> None:
    c = await make_cluster(tmp_path, boot=True)
    (tmp_path / "vmlinuz").unlink()
    rev = c.revision
    with pytest.raises(InvalidSpec, match="vmlinuz is missing"):
        await create_vm(c.cl, "vm1", disk_size=MiB)
    assert c.revision == rev
    assert not vm_dir(c.volume, "vm1").exists()


async def test_duplicate_name_is_a_conflict_and_changes_nothing(c: Cluster) -> None:
    first = await create_vm(c.cl, "vm1", disk_size=MiB)
    disk = Path(first.disks[0].path)
    before = disk.stat().st_mtime_ns
    rev = c.revision
    with pytest.raises(Conflict, match="already exists"):
        await create_vm(c.cl, "vm1", memory_mib=512, disk_size=2 * MiB)
    assert c.revision == rev
    assert await spec_of(c, "vm1") == first
    assert disk.stat().st_mtime_ns == before
    assert list(vm_dir(c.volume, "vm1").parent.iterdir()) == [vm_dir(c.volume, "vm1")]


async def test_leftover_directory_on_the_volume_is_a_conflict(c: Cluster) -> None:
    vm_dir(c.volume, "vm1").mkdir(parents=True)
    rev = c.revision
    with pytest.raises(Conflict, match="already exists on volume shared0"):
        await create_vm(c.cl, "vm1", disk_size=MiB)
    assert c.revision == rev


@pytest.mark.parametrize("name", ["", "VM1", "-vm", "vm_1", "a" * 32, "vm 1", "vm/1", "ü"])
async def test_bad_name_is_refused_before_anything(c: Cluster, name: str) -> None:
    rev = c.revision
    with pytest.raises(InvalidSpec, match="invalid VM name"):
        await create_vm(c.cl, name, disk_size=MiB)
    assert c.revision == rev
    assert not (Path(c.volume.path) / "vms").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"memory_mib": 16}, "memory must be between"),
    ({"memory_mib": 2 * 1024 * 1024}, "memory must be between"),
    ({"vcpus": 0}, "vcpus must be between"),
    ({"vcpus": 65}, "vcpus must be between"),
    ({"disk_size": 1024}, "disk size must be at least 1M"),
])
async def test_bad_sizes_are_refused_before_anything(
    c: Cluster, kwargs: dict[str, int], message: str
) -> None:
    rev = c.revision
    with pytest.raises(InvalidSpec, match=message):
        await create_vm(c.cl, "vm1", memory_mib=kwargs.get("memory_mib", 256),
                        vcpus=kwargs.get("vcpus", 1), disk_size=kwargs.get("disk_size", MiB))
    assert c.revision == rev
    assert not (Path(c.volume.path) / "vms").exists()
    assert await claims(c) == {}


async def test_unknown_volume_is_not_found(c: Cluster) -> None:
    rev = c.revision
    with pytest.raises(NotFound, match="volume 'nope'"):
        await create_vm(c.cl, "vm1", volume="nope", disk_size=MiB)
    assert c.revision == rev


async def test_no_volume_and_no_default_is_invalid(tmp_path: Path) -> None:
    c = await make_cluster(tmp_path, default_volume=False)
    rev = c.revision
    with pytest.raises(InvalidSpec, match="no default volume"):
        await create_vm(c.cl, "vm1", disk_size=MiB)
    assert c.revision == rev


async def test_lost_race_for_the_address_removes_the_files(c: Cluster) -> None:
    racing = Interfering(c.keys.ip_claim("10.79.0.10"), "other-vm")
    await copy_into(c, racing)
    with pytest.raises(Conflict, match="taken concurrently"):
        await create_vm(c.cl, "vm1", disk_size=MiB)
    assert await racing.get(c.keys.vm_spec("vm1")) is None
    assert not vm_dir(c.volume, "vm1").exists()
    claim = await racing.get(c.keys.ip_claim("10.79.0.10"))
    assert claim is not None and claim.value == "other-vm"


# --- start ---------------------------------------------------------------------------


async def test_start_on_a_named_node(c: Cluster) -> None:
    await c.add_node("node1")
    await c.add_node("node2")
    await create_vm(c.cl, "vm1", disk_size=MiB)
    token = await start_vm(c.cl, "vm1", node="node2")
    assert await c.owner("vm1") == Owner(node="node2", power=Power.ON)
    e = await c.store.get(c.keys.vm_owner("vm1"))
    assert e is not None and e.mod_revision == token == c.revision


async def test_start_unknown_vm_is_not_found(c: Cluster) -> None:
    await c.add_node("node1")
    rev = c.revision
    with pytest.raises(NotFound, match="'ghost'"):
        await start_vm(c.cl, "ghost")
    assert c.revision == rev


async def test_start_on_unknown_node_is_not_found(c: Cluster) -> None:
    await c.add_node("node1")
    await create_vm(c.cl, "vm1", disk_size=MiB)
    rev = c.revision
    with pytest.raises(NotFound, match="node 'node9'"):
        await start_vm(c.cl, "vm1", node="node9")
    assert c.revision == rev


async def test_start_on_a_node_that_is_down_is_a_conflict(c: Cluster) -> None:
    await c.add_node("node1")
    await c.add_node("node2")
    await c.node_down("node2")
    await create_vm(c.cl, "vm1", disk_size=MiB)
    rev = c.revision
    with pytest.raises(Conflict, match="node node2 is down"):
        await start_vm(c.cl, "vm1", node="node2")
    assert c.revision == rev


async def test_start_with_every_node_down_is_a_conflict(c: Cluster) -> None:
    await c.add_node("node1", up=False)
    await create_vm(c.cl, "vm1", disk_size=MiB)
    rev = c.revision
    with pytest.raises(Conflict, match="no node is up"):
        await start_vm(c.cl, "vm1")
    assert c.revision == rev


async def test_start_on_a_node_without_room_is_a_conflict(c: Cluster) -> None:
    await c.add_node("small", memory_mib=512 + 200)
    await create_vm(c.cl, "vm1", memory_mib=256, disk_size=MiB)
    rev = c.revision
    with pytest.raises(Conflict, match="has 200 MiB free, the VM needs 256 MiB"):
        await start_vm(c.cl, "vm1", node="small")
    assert c.revision == rev


async def test_start_a_running_vm_is_a_conflict_naming_its_node(c: Cluster) -> None:
    await c.add_node("node1")
    await c.add_node("node2")
    await running_vm(c, "vm1", "node1")
    rev = c.revision
    with pytest.raises(Conflict, match="already running on node1"):
        await start_vm(c.cl, "vm1", node="node2")
    assert c.revision == rev
    assert (await c.owner("vm1")).node == "node1"


async def test_placement_picks_the_node_with_most_free_memory(c: Cluster) -> None:
    await c.add_node("node1", memory_mib=4096)
    await c.add_node("node2", memory_mib=8192)
    await c.add_node("node3", memory_mib=6144)
    await create_vm(c.cl, "vm1", disk_size=MiB)
    await start_vm(c.cl, "vm1")
    assert (await c.owner("vm1")).node == "node2"


async def test_placement_counts_the_vms_already_running(c: Cluster) -> None:
    await c.add_node("node1", memory_mib=4096)
    await c.add_node("node2", memory_mib=6144)
    await running_vm(c, "big", "node2", memory_mib=4096)  # node2: 1536 MiB left
    await create_vm(c.cl, "vm1", disk_size=MiB)
    await start_vm(c.cl, "vm1")
    assert (await c.owner("vm1")).node == "node1"


async def test_placement_skips_nodes_that_are_down(c: Cluster) -> None:
    await c.add_node("node1", memory_mib=4096)
    await c.add_node("node2", memory_mib=65536)
    await c.node_down("node2")
    await create_vm(c.cl, "vm1", disk_size=MiB)
    await start_vm(c.cl, "vm1")
    assert (await c.owner("vm1")).node == "node1"


# --- stop ----------------------------------------------------------------------------


async def test_stop_keeps_the_node_and_turns_the_power_off(c: Cluster) -> None:
    await c.add_node("node1")
    await running_vm(c, "vm1", "node1")
    granted = await c.store.get(c.keys.vm_owner("vm1"))
    assert granted is not None
    await stop_vm(c.cl, "vm1")
    # Same node, same fencing token (the revision that granted node1), power off.
    assert await c.owner("vm1") == Owner(node="node1", power=Power.OFF, force=False,
                                         granted=granted.mod_revision)
    assert (await show_vm(c.cl, "vm1")).state is VmState.STOPPING


async def test_stop_with_force(c: Cluster) -> None:
    await c.add_node("node1")
    await running_vm(c, "vm1", "node1")
    await stop_vm(c.cl, "vm1", force=True)
    assert (await c.owner("vm1")).force is True


async def test_stop_a_vm_that_is_not_running_is_a_conflict(c: Cluster) -> None:
    await create_vm(c.cl, "vm1", disk_size=MiB)
    rev = c.revision
    with pytest.raises(Conflict, match="not running"):
        await stop_vm(c.cl, "vm1")
    assert c.revision == rev


async def test_force_stop_of_a_stopped_vm_is_allowed(c: Cluster) -> None:
    await create_vm(c.cl, "vm1", disk_size=MiB)
    await stop_vm(c.cl, "vm1", force=True)
    assert (await c.owner("vm1")).force is True


async def test_stop_a_migrating_vm_is_a_conflict(c: Cluster) -> None:
    await c.add_node("node1")
    await running_vm(c, "vm1", "node1")
    await c.set_owner("vm1", Owner(node="node1", power=Power.ON, migration="m1",
                                   target="node2"))
    rev = c.revision
    for force in (False, True):
        with pytest.raises(Conflict, match=r"migrating \(m1\)"):
            await stop_vm(c.cl, "vm1", force=force)
    assert c.revision == rev


async def test_stop_unknown_vm_is_not_found(c: Cluster) -> None:
    rev = c.revision
    with pytest.raises(NotFound):
        await stop_vm(c.cl, "ghost")
    assert c.revision == rev


# --- delete --------------------------------------------------------------------------


async def test_delete_removes_keys_claim_and_files(c: Cluster) -> None:
    await create_vm(c.cl, "vm1", disk_size=MiB)
    await create_vm(c.cl, "vm2", disk_size=MiB)
    rev = c.revision
    await delete_vm(c.cl, "vm1")
    assert c.revision == rev + 1
    entries, _ = await c.store.get_prefix(c.keys.vm_prefix("vm1"))
    assert entries == []
    assert await claims(c) == {"10.79.0.11": "vm2"}
    assert not vm_dir(c.volume, "vm1").exists()
    assert vm_dir(c.volume, "vm2").exists()
    assert [v.name for v in await list_vms(c.cl)] == ["vm2"]


async def test_delete_a_running_vm_is_a_conflict(c: Cluster) -> None:
    await c.add_node("node1")
    await running_vm(c, "vm1", "node1")
    rev = c.revision
    with pytest.raises(Conflict, match="not stopped"):
        await delete_vm(c.cl, "vm1")
    assert c.revision == rev
    assert vm_dir(c.volume, "vm1").exists()


async def test_delete_a_vm_that_is_still_stopping_is_a_conflict(c: Cluster) -> None:
    await c.add_node("node1")
    await running_vm(c, "vm1", "node1")
    await stop_vm(c.cl, "vm1")
    rev = c.revision
    with pytest.raises(Conflict, match="not stopped"):
        await delete_vm(c.cl, "vm1")
    assert c.revision == rev


async def test_delete_a_starting_vm_is_a_conflict(c: Cluster) -> None:
    await c.add_node("node1")
    await create_vm(c.cl, "vm1", disk_size=MiB)
    await start_vm(c.cl, "vm1")
    rev = c.revision
    with pytest.raises(Conflict):
        await delete_vm(c.cl, "vm1")
    assert c.revision == rev


async def test_delete_unknown_vm_is_not_found(c: Cluster) -> None:
    rev = c.revision
    with pytest.raises(NotFound):
        await delete_vm(c.cl, "ghost")
    assert c.revision == rev


# --- views and waiting ---------------------------------------------------------------


@pytest.mark.parametrize(("owner", "status", "state"), [
    (Owner(node=None, power=Power.OFF), None, VmState.STOPPED),
    (Owner(node="n1", power=Power.OFF), VmStatus("n1", VmState.RUNNING, 1), VmState.STOPPING),
    # Off but not yet released by its node: still stopping, whatever the status says.
    (Owner(node="n1", power=Power.OFF), VmStatus("n1", VmState.FAILED, 1), VmState.STOPPING),
    (Owner(node="n1", power=Power.OFF), VmStatus("n2", VmState.RUNNING, 1), VmState.STOPPING),
    (Owner(node="n1", power=Power.OFF), None, VmState.STOPPING),
    (Owner(node="n1", power=Power.ON), None, VmState.STARTING),
    (Owner(node="n1", power=Power.ON), VmStatus("n2", VmState.RUNNING, 1), VmState.STARTING),
    (Owner(node="n1", power=Power.ON), VmStatus("n1", VmState.PAUSED, 1), VmState.PAUSED),
    (Owner(node="n1", power=Power.ON, migration="m", target="n2"),
     VmStatus("n1", VmState.RUNNING, 1), VmState.MIGRATING),
])
def test_vm_state(owner: Owner, status: VmStatus | None, state: VmState) -> None:
    assert vm_state(owner, status) is state


async def test_show_a_running_vm(c: Cluster) -> None:
    await c.add_node("node1")
    token = await running_vm(c, "vm1", "node1", memory_mib=128)
    view = await show_vm(c.cl, "vm1")
    assert view.state is VmState.RUNNING
    assert view.node == "node1"
    assert view.ip == "10.79.0.10"
    assert view.memory_mib == 128
    assert view.pid == 4242
    assert view.volume == "shared0"
    assert token > 0


async def test_show_unknown_vm_is_not_found(c: Cluster) -> None:
    with pytest.raises(NotFound):
        await show_vm(c.cl, "ghost")


async def test_wait_started_returns_once_the_owner_reports_running(c: Cluster) -> None:
    await c.add_node("node1")
    token = await running_vm(c, "vm1", "node1")
    view = await wait_started(c.cl, "vm1", token=token, timeout=5)
    assert view.state is VmState.RUNNING


async def test_wait_started_gives_the_vm_back_to_off_when_it_failed(c: Cluster) -> None:
    await c.add_node("node1")
    await create_vm(c.cl, "vm1", disk_size=MiB)
    token = await start_vm(c.cl, "vm1", node="node1")
    await c.report("vm1", "node1", VmState.FAILED, token=token, detail="no kvm")
    with pytest.raises(FerryError, match="failed to start on node1: no kvm"):
        await wait_started(c.cl, "vm1", token=token, timeout=5)
    assert (await c.owner("vm1")).power is Power.OFF


async def test_wait_started_times_out(c: Cluster) -> None:
    await c.add_node("node1")
    await create_vm(c.cl, "vm1", disk_size=MiB)
    token = await start_vm(c.cl, "vm1", node="node1")
    # An old status (token of an earlier start) does not count.
    await c.report("vm1", "node1", token=token - 1)
    with pytest.raises(Timeout):
        await wait_started(c.cl, "vm1", token=token, timeout=0.05)


async def test_wait_stopped(c: Cluster) -> None:
    await create_vm(c.cl, "vm1", disk_size=MiB)
    await wait_stopped(c.cl, "vm1", timeout=5)
    await c.add_node("node1")
    await start_vm(c.cl, "vm1")
    with pytest.raises(Timeout):
        await wait_stopped(c.cl, "vm1", timeout=0.05)


async def test_save_config_rewrites_the_file_on_the_volume(c: Cluster) -> None:
    spec = await create_vm(c.cl, "vm1", disk_size=MiB)
    save_config(c.volume, replace(spec, vcpus=3))
    text = (vm_dir(c.volume, "vm1") / "vm.json").read_text()
    assert codec.decode(VmSpec, text).vcpus == 3


async def test_start_refuses_when_the_owner_changed_meanwhile(c: Cluster) -> None:
    await c.add_node("node1")
    await create_vm(c.cl, "vm1", disk_size=MiB)
    theirs = codec.encode(Owner(node="node2", power=Power.ON))
    store = Interfering(c.keys.vm_owner("vm1"), theirs)
    await copy_into(c, store)
    with pytest.raises(Conflict, match="changed while starting"):
        await start_vm(c.cl, "vm1", node="node1")
    e = await store.get(c.keys.vm_owner("vm1"))
    assert e is not None and e.value == theirs


async def test_stop_refuses_when_the_owner_changed_meanwhile(c: Cluster) -> None:
    await c.add_node("node1")
    await running_vm(c, "vm1", "node1")
    theirs = codec.encode(Owner(node="node1", power=Power.ON, migration="m1", target="node2"))
    store = Interfering(c.keys.vm_owner("vm1"), theirs)
    await copy_into(c, store)
    with pytest.raises(Conflict, match="changed while stopping"):
        await stop_vm(c.cl, "vm1")
    e = await store.get(c.keys.vm_owner("vm1"))
    assert e is not None and e.value == theirs

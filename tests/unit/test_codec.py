"""The JSON codec: round trips of the model, and errors that name the field path."""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any

import pytest

from ferry.model import cluster, codec, migration, node, vm
from ferry.model.cluster import BootImage, ClusterConfig, VmNetwork, Volume
from ferry.model.errors import InvalidSpec
from ferry.model.migration import (
    MigrationOptions,
    MigrationPhase,
    MigrationProgress,
    MigrationRecord,
    MigrationSummary,
    PhaseEvent,
    TargetConfig,
)
from ferry.model.node import NetAddress, NodeInfo, NodeState, NodeView
from ferry.model.vm import BootSpec, DiskSpec, NicSpec, Owner, Power, VmSpec, VmState, VmStatus

SPEC = VmSpec(
    name="vm1", uid="0123456789ab", memory_mib=256, vcpus=2, volume="shared0",
    config_path="/vol/vms/vm1/vm.json",
    disks=(DiskSpec(path="/vol/vms/vm1/disk0.qcow2", size_bytes=1 << 30),
           DiskSpec(path="/vol/vms/vm1/disk1.raw", size_bytes=4096, format="raw")),
    nics=(NicSpec(mac="52:54:00:01:23:45", ip="10.79.0.10"),
          NicSpec(mac="52:54:00:01:23:46", bridge="br1")),
    boot=BootSpec(kernel="/k", initrd="/i", cmdline="console=ttyS0 quiet"),
    machine="q35", cpu_model="qemu64", created_at=1700000000.5,
)
BARE_SPEC = VmSpec(name="bare", uid="ffffffffffff", memory_mib=32, vcpus=1, volume="v",
                   config_path="/c", disks=(), nics=())
INFO = NodeInfo(
    name="node1", cluster_address="10.77.0.11",
    migration_addresses=(NetAddress("migration", "10.78.0.11"),
                         NetAddress("migration2", "10.80.0.11")),
    bridge="vmswitch", memory_mib=24000, cpus=2, accel="tcg", version="0.1.0",
    started_at=12.25,
)
SUMMARY = MigrationSummary(total_s=1.5, qemu_total_ms=700, downtime_ms=30, switchover_ms=None,
                           bytes_sent=123456789, setup_ms=5, throughput_bps=9.5e8)
RECORD = MigrationRecord(
    id="abcd1234", vm="vm1", source="node1", target="node2", phase=MigrationPhase.COMPLETED,
    created_at=1.0,
    options=MigrationOptions(max_bandwidth=1000, downtime_limit_ms=100, priority=2),
    timeline=(PhaseEvent(MigrationPhase.CONNECTING, 1.5, "node1"),
              PhaseEvent(MigrationPhase.COPYING_MEMORY, 2.0, "node1", note="pass 1")),
    error="", network="migration",
    config=TargetConfig(spec=SPEC, accel="tcg", cpu_model="qemu64"),
    target_uri="tcp:10.78.0.12:4444", stopped_at=3.0, committed_at=3.1, resumed_at=3.2,
    target_released_at=None, finished_at=4.0, summary=SUMMARY,
)

EXAMPLES: list[object] = [
    SPEC,
    BARE_SPEC,
    BootSpec(kernel="/k", initrd="/i", cmdline=""),
    DiskSpec(path="/d", size_bytes=1),
    NicSpec(mac="52:54:00:00:00:01"),
    Owner(node="node1", power=Power.ON, migration="m1", target="node2", force=False),
    Owner(node=None, power=Power.OFF, force=True),
    VmStatus(node="node1", state=VmState.FAILED, token=7, pid=None, since=1.5, detail="oops"),
    VmStatus(node="node1", state=VmState.RUNNING, token=7, pid=123),
    INFO,
    NetAddress("migration", "10.78.0.11"),
    NodeView(info=INFO, state=NodeState.DOWN, vms=("a", "b"), memory_used_mib=512),
    Volume(name="shared0", path="/var/lib/ferry/shared0"),
    BootImage(kernel="/k", initrd="/i"),
    VmNetwork(subnet="10.79.0.0/24", first_host=20),
    ClusterConfig(name="c", default_volume="shared0", boot_image=BootImage("/k", "/i", "x"),
                  vm_network=VmNetwork("10.79.0.0/24"), bridge="br0"),
    ClusterConfig(name="minimal"),
    RECORD,
    MigrationRecord(id="m", vm="v", source="a", target="b", phase=MigrationPhase.QUEUED,
                    created_at=0.0),
    PhaseEvent(MigrationPhase.FAILED, 2.0, "node2", "target died"),
    MigrationOptions(),
    MigrationProgress(at=1.0, status="active", elapsed_ms=10, ram_total=100,
                      ram_transferred=50, ram_remaining=50, throughput_bps=1.5,
                      dirty_rate_pps=2.5, page_size=4096, expected_downtime_ms=3,
                      iterations=4, throttle_pct=20),
    SUMMARY,
    dataclasses.replace(SUMMARY, switchover_ms=12.5),
    TargetConfig(spec=BARE_SPEC, accel="kvm", cpu_model="host"),
]


def _model_dataclasses() -> set[type]:
    found: set[type] = set()
    for module in (cluster, migration, node, vm):
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__:
                found.add(obj)
    return found


def test_examples_cover_every_model_dataclass() -> None:
    assert _model_dataclasses() <= {type(e) for e in EXAMPLES}


@pytest.mark.parametrize("obj", EXAMPLES, ids=lambda o: type(o).__name__)
def test_round_trip(obj: object) -> None:
    text = codec.encode(obj)
    back = codec.decode(type(obj), text)
    assert back == obj
    assert type(back) is type(obj)
    assert codec.encode(back) == text


def test_nested_tuples_come_back_as_tuples() -> None:
    back = codec.decode(VmSpec, codec.encode(SPEC))
    assert isinstance(back.disks, tuple)
    assert isinstance(back.nics, tuple)
    assert back.disks[1].format == "raw"
    assert back.nics[0].ip == "10.79.0.10"
    assert back.nics[1].ip is None


def test_migration_record_keeps_timeline_options_config_summary() -> None:
    back = codec.decode(MigrationRecord, codec.encode(RECORD))
    assert back.timeline[1].note == "pass 1"
    assert back.timeline[0].phase is MigrationPhase.CONNECTING
    assert back.options.max_bandwidth == 1000
    assert back.config is not None and back.config.spec == SPEC
    assert back.summary is not None and back.summary.switchover_ms is None


def test_encoding_is_plain_json_with_enum_values() -> None:
    data = json.loads(codec.encode(Owner(node="n", power=Power.ON)))
    assert data == {"node": "n", "power": "on", "migration": None, "target": None,
                    "force": False, "granted": 0, "ha": False}
    assert json.loads(codec.encode(RECORD))["timeline"][0]["phase"] == "connecting"


def test_encoding_is_canonical() -> None:
    text = codec.encode(Owner(node="n", power=Power.ON))
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


def test_defaults_fill_absent_optional_fields() -> None:
    back = codec.decode(Owner, '{"node": "n", "power": "off"}')
    assert back == Owner(node="n", power=Power.OFF)
    rec = codec.decode(MigrationRecord, json.dumps({
        "id": "m", "vm": "v", "source": "a", "target": "b", "phase": "queued",
        "created_at": 1}))
    assert rec.options == MigrationOptions()
    assert rec.timeline == ()
    assert rec.created_at == 1.0 and isinstance(rec.created_at, float)


# --- errors --------------------------------------------------------------------------


def _spec_data() -> dict[str, Any]:
    data = codec.to_data(SPEC)
    assert isinstance(data, dict)
    return data


def _fails(cls: type, data: object) -> str:
    with pytest.raises(InvalidSpec) as info:
        codec.decode(cls, json.dumps(data))
    return str(info.value)


def test_bad_enum_value() -> None:
    msg = _fails(Owner, {"node": "n", "power": "maybe"})
    assert "Owner.power" in msg
    assert "'maybe' is not a valid Power" in msg


def test_bad_enum_value_deep_in_a_timeline() -> None:
    data = codec.to_data(RECORD)
    data["timeline"][1]["phase"] = "teleporting"
    msg = _fails(MigrationRecord, data)
    assert "MigrationRecord.timeline[1].phase" in msg
    assert "MigrationPhase" in msg


def test_unhashable_enum_value() -> None:
    msg = _fails(VmStatus, {"node": "n", "state": ["running"], "token": 1})
    assert "VmStatus.state" in msg


def test_missing_field() -> None:
    data = _spec_data()
    del data["memory_mib"]
    msg = _fails(VmSpec, data)
    assert msg == "VmSpec: missing field 'memory_mib'"


def test_missing_field_in_a_nested_object() -> None:
    data = _spec_data()
    del data["disks"][1]["path"]
    assert _fails(VmSpec, data) == "VmSpec.disks[1]: missing field 'path'"


def test_missing_field_inside_an_optional_object() -> None:
    data = codec.to_data(RECORD)
    del data["config"]["spec"]["uid"]
    msg = _fails(MigrationRecord, data)
    assert "MigrationRecord.config.spec" in msg
    assert "missing field 'uid'" in msg


@pytest.mark.parametrize(("field", "value", "path"), [
    ("memory_mib", "256", "VmSpec.memory_mib"),
    ("memory_mib", 256.0, "VmSpec.memory_mib"),
    ("memory_mib", True, "VmSpec.memory_mib"),
    ("name", 5, "VmSpec.name"),
    ("created_at", "now", "VmSpec.created_at"),
    ("created_at", False, "VmSpec.created_at"),
    ("disks", {"path": "/d"}, "VmSpec.disks"),
    ("disks", [["/d", 1]], "VmSpec.disks[0]"),
    ("nics", "52:54:00:00:00:01", "VmSpec.nics"),
    ("cpu_model", 64, "VmSpec.cpu_model"),
    ("boot", "kernel", "VmSpec.boot"),
])
def test_wrong_type_names_the_field(field: str, value: object, path: str) -> None:
    data = _spec_data()
    data[field] = value
    msg = _fails(VmSpec, data)
    assert msg.startswith(path + ":")


def test_wrong_type_in_a_nested_list_item() -> None:
    data = _spec_data()
    data["nics"][1]["mac"] = None
    assert _fails(VmSpec, data).startswith("VmSpec.nics[1].mac:")


def test_null_for_a_required_field() -> None:
    data = _spec_data()
    data["uid"] = None
    assert _fails(VmSpec, data).startswith("VmSpec.uid:")


def test_not_an_object_at_the_top() -> None:
    assert _fails(VmSpec, [1, 2]) == "VmSpec: expected an object for VmSpec"


def test_not_json() -> None:
    with pytest.raises(InvalidSpec, match="not valid JSON for Owner"):
        codec.decode(Owner, "{node")


def test_decode_accepts_bytes() -> None:
    assert codec.decode(Volume, b'{"name": "v", "path": "/p"}') == Volume("v", "/p")


def test_unknown_fields_are_ignored() -> None:
    back = codec.decode(Volume, '{"name": "v", "path": "/p", "added_later": 1}')
    assert back == Volume("v", "/p")


def test_from_data_tuples_of_fixed_length() -> None:
    assert codec.from_data(tuple[int, str], [1, "a"]) == (1, "a")
    with pytest.raises(InvalidSpec, match="expected 2 items"):
        codec.from_data(tuple[int, str], [1])
    with pytest.raises(InvalidSpec, match=r"^x\[1\]: expected str"):
        codec.from_data(tuple[int, str], [1, 2], "x")


def test_from_data_dicts() -> None:
    assert codec.from_data(dict[str, int], {"a": 1}) == {"a": 1}
    with pytest.raises(InvalidSpec, match=r"^d\.a: expected int"):
        codec.from_data(dict[str, int], {"a": "1"}, "d")
    with pytest.raises(InvalidSpec, match="expected an object"):
        codec.from_data(dict[str, int], [], "d")


def test_from_data_any_and_none() -> None:
    assert codec.from_data(Any, {"x": [1]}) == {"x": [1]}
    assert codec.from_data(type(None), None) is None
    with pytest.raises(InvalidSpec, match="expected null"):
        codec.from_data(type(None), 0)


def test_from_data_refuses_unknown_types() -> None:
    with pytest.raises(InvalidSpec, match="cannot decode type"):
        codec.from_data(set[int], [1])


def test_to_data_of_dicts_and_lists() -> None:
    assert codec.to_data({1: [Power.ON, (VmState.RUNNING,)]}) == {"1": ["on", ["running"]]}

"""The agent's TOML configuration: defaults, and errors that name the section and key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from ferry.agent.config import AgentConfig, Timings, load_config, parse_config, resolve_accel
from ferry.model.errors import InvalidSpec
from ferry.model.node import NetAddress

MINIMAL = """
[node]
name = "node1"

[store]
endpoints = ["http://10.77.0.1:2379"]

[network]
cluster_address = "10.77.0.11"
"""

FULL = """
[node]
name = "node2"
cluster = "prod"
bridge = "br-vm"
run_dir = "/var/run/ferry-x"

[store]
endpoints = ["http://a:2379", "http://b:2379"]

[network]
cluster_address = "10.77.0.12"

[[network.migration]]
name = "migration"
address = "10.78.0.12"

[[network.migration]]
name = "migration2"
address = "10.80.0.12"

[qemu]
accel = "kvm"
cpu_model = "Westmere"
binary = "/opt/qemu/bin/qemu-system-x86_64"

[timing]
lease_ttl = 4
resync_s = 1
stop_timeout_s = 30.5
"""


def doc(text: str = MINIMAL) -> dict[str, Any]:
    return tomllib.loads(text)


def fails(d: dict[str, Any]) -> str:
    with pytest.raises(InvalidSpec) as info:
        parse_config(d, where="node1.toml")
    return str(info.value)


def test_minimal_config_takes_the_defaults() -> None:
    cfg = parse_config(doc())
    assert cfg == AgentConfig(
        node="node1", cluster="default", endpoints=("http://10.77.0.1:2379",),
        cluster_address="10.77.0.11", migration_networks=(),
    )
    assert cfg.bridge == "vmswitch"
    assert cfg.run_dir == Path("/run/ferry")
    assert cfg.accel == "auto"
    assert cfg.cpu_model == ""
    assert cfg.qemu_binary == "qemu-system-x86_64"
    assert cfg.timings == Timings(lease_ttl=15, resync_s=2.0, stop_timeout_s=60.0,
                                  watchdog_s=10.0, fence_delay_s=15.0, self_fence_margin_s=3.75,
                                  store_timeout_s=3.75)


def test_full_config() -> None:
    cfg = parse_config(doc(FULL))
    assert cfg.node == "node2"
    assert cfg.cluster == "prod"
    assert cfg.bridge == "br-vm"
    assert cfg.run_dir == Path("/var/run/ferry-x")
    assert cfg.endpoints == ("http://a:2379", "http://b:2379")
    assert cfg.migration_networks == (NetAddress("migration", "10.78.0.12"),
                                      NetAddress("migration2", "10.80.0.12"))
    assert cfg.accel == "kvm"
    assert cfg.cpu_model == "Westmere"
    assert cfg.qemu_binary == "/opt/qemu/bin/qemu-system-x86_64"
    # The HA timings derive from the lease TTL when not given: W = 2T/3, D = T, margin T/4.
    assert cfg.timings == Timings(lease_ttl=4, resync_s=1.0, stop_timeout_s=30.5,
                                  watchdog_s=2.67, fence_delay_s=4.0, self_fence_margin_s=1.0,
                                  store_timeout_s=1.0)
    assert isinstance(cfg.timings.resync_s, float)


@pytest.mark.parametrize(("section", "key", "where"), [
    ("node", "name", "[node]"),
    ("store", "endpoints", "[store]"),
    ("network", "cluster_address", "[network]"),
])
def test_missing_required_key(section: str, key: str, where: str) -> None:
    d = doc()
    del d[section][key]
    assert fails(d) == f"node1.toml {where}: missing key '{key}'"


def test_missing_section_is_reported_as_its_missing_key() -> None:
    d = doc()
    del d["network"]
    assert fails(d) == "node1.toml [network]: missing key 'cluster_address'"


@pytest.mark.parametrize(("section", "key", "value", "where"), [
    ("node", "name", 1, "[node]"),
    ("node", "cluster", ["a"], "[node]"),
    ("node", "bridge", 0, "[node]"),
    ("node", "run_dir", True, "[node]"),
    ("network", "cluster_address", 10, "[network]"),
    ("qemu", "accel", 1, "[qemu]"),
    ("qemu", "cpu_model", 1, "[qemu]"),
    ("qemu", "binary", ["q"], "[qemu]"),
    ("timing", "lease_ttl", "10", "[timing]"),
    ("timing", "lease_ttl", 2.5, "[timing]"),
    ("timing", "resync_s", "2", "[timing]"),
    ("timing", "stop_timeout_s", [1], "[timing]"),
    ("store", "endpoints", "http://x", "[store]"),
])
def test_wrong_type_names_section_and_key(section: str, key: str, value: object,
                                          where: str) -> None:
    d = doc()
    d.setdefault(section, {})[key] = value
    msg = fails(d)
    assert msg.startswith(f"node1.toml {where}: key '{key}' must be a ")
    assert repr(value) in msg


@pytest.mark.parametrize("endpoints", [[], [1], ["http://a", None]])
def test_endpoints_must_be_a_non_empty_list_of_strings(endpoints: list[object]) -> None:
    d = doc()
    d["store"]["endpoints"] = endpoints
    assert fails(d) == "node1.toml [store]: 'endpoints' must be a non-empty list of URLs"


def test_accel_must_be_known() -> None:
    d = doc()
    d["qemu"] = {"accel": "hvf"}
    msg = fails(d)
    assert msg.startswith("node1.toml [qemu]: 'accel'")
    assert "kvm, tcg, auto" in msg


@pytest.mark.parametrize("accel", ["kvm", "tcg", "auto"])
def test_known_accels(accel: str) -> None:
    d = doc()
    d["qemu"] = {"accel": accel}
    assert parse_config(d).accel == accel


@pytest.mark.parametrize("section", ["node", "store", "network", "qemu", "timing"])
def test_a_section_that_is_not_a_table(section: str) -> None:
    d = doc()
    d[section] = "oops"
    assert fails(d) == f"node1.toml: [{section}] must be a table"


def test_migration_network_entry_missing_a_key_is_numbered() -> None:
    d = doc(FULL)
    del d["network"]["migration"][1]["address"]
    assert fails(d) == "node1.toml [[network.migration]] #2: missing key 'address'"


def test_migration_network_entry_with_wrong_type() -> None:
    d = doc(FULL)
    d["network"]["migration"][0]["name"] = 7
    assert fails(d).startswith("node1.toml [[network.migration]] #1: key 'name'")


def test_bad_node_name() -> None:
    d = doc()
    d["node"]["name"] = "Node_1"
    assert "invalid node name 'Node_1'" in fails(d)


def test_where_defaults_to_config() -> None:
    d = doc()
    del d["node"]["name"]
    with pytest.raises(InvalidSpec, match=r"^config \[node\]: missing key 'name'$"):
        parse_config(d)


def test_load_config_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "node2.toml"
    path.write_text(FULL)
    assert load_config(path) == parse_config(doc(FULL))


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "node1.toml"
    path.write_text(MINIMAL.replace('name = "node1"', ""))
    with pytest.raises(InvalidSpec, match=f"^{path} \\[node\\]: missing key 'name'"):
        load_config(path)


def test_load_config_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec, match="cannot read configuration"):
        load_config(tmp_path / "absent.toml")


def test_load_config_of_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[node\nname=")
    with pytest.raises(InvalidSpec, match="not valid TOML"):
        load_config(path)


@pytest.mark.parametrize("accel", ["kvm", "tcg"])
def test_resolve_accel_keeps_an_explicit_choice(accel: str) -> None:
    assert resolve_accel(accel) == accel


def test_resolve_accel_auto_picks_one() -> None:
    assert resolve_accel("auto") in ("kvm", "tcg")


def test_explicit_ha_timings_are_kept() -> None:
    d = doc()
    d["timing"] = {"lease_ttl": 6, "watchdog_s": 3, "fence_delay_s": 5,
                   "self_fence_margin_s": 1.5, "store_timeout_s": 1.2}
    t = parse_config(d).timings
    assert (t.watchdog_s, t.fence_delay_s, t.self_fence_margin_s, t.store_timeout_s) == (
        3.0, 5.0, 1.5, 1.2)


@pytest.mark.parametrize(("timing", "complaint"), [
    ({"lease_ttl": 1}, "lease_ttl must be at least 2 s"),
    ({"lease_ttl": 4, "self_fence_margin_s": 4}, "self_fence_margin_s must be shorter"),
    ({"lease_ttl": 4, "watchdog_s": 5}, "watchdog_s must be shorter than lease_ttl"),
    ({"lease_ttl": 6, "watchdog_s": 4, "fence_delay_s": 4.5},
     "fence_delay_s must be at least watchdog_s + 1 s"),
])
def test_unsafe_ha_timings_are_refused(timing: dict[str, float], complaint: str) -> None:
    d = doc()
    d["timing"] = timing
    assert complaint in fails(d)


def test_the_cluster_network_is_named_cluster_unless_configured() -> None:
    assert parse_config(doc()).cluster_network == "cluster"
    d = doc(FULL)
    d["network"]["cluster_name"] = "backbone"
    assert parse_config(d).cluster_network == "backbone"


@pytest.mark.parametrize("clash", ["cluster", "migration"])
def test_network_names_are_unique(clash: str) -> None:
    d = doc(FULL)
    d["network"]["migration"][1]["name"] = clash
    assert fails(d) == (f"node1.toml [network]: network name {clash!r} is empty or used twice"
                        " (the cluster network is 'cluster_name', default 'cluster')")

"""The agent's configuration file (TOML), checked on load with errors naming the key."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.model.errors import InvalidSpec
from ferry.model.node import NetAddress
from ferry.model.vm import check_name

ACCELS = ("kvm", "tcg", "auto")


@dataclass(frozen=True)
class Timings:
    """How fast the cluster notices and acts on a dead node (design/ha.md).

    With lease TTL T the node keeps its lease alive every T/3 and stops its own HA VMs
    ``self_fence_margin_s`` before T has passed since its last successful keepalive was
    sent; its watchdog kills them ``watchdog_s`` after the agent last fed it; the manager
    waits ``fence_delay_s`` after the lease is gone before restarting them elsewhere.
    Defaults derive from T: W = 2T/3, D = T, margin = T/4 (T=15: W=10, D=15).
    """

    lease_ttl: int = 15  # seconds; the node is "up" while its lease lives
    resync_s: float = 2.0  # full reconcile even without store events
    stop_timeout_s: float = 60.0  # guest shutdown before a forced stop
    watchdog_s: float = 10.0  # 0: 2T/3
    fence_delay_s: float = 15.0  # 0: T
    self_fence_margin_s: float = 3.75  # 0: T/4
    store_timeout_s: float = 3.75  # 0: T/4, at least 1 s: a keepalive must fail fast

    def resolved(self) -> Timings:
        t = float(self.lease_ttl)
        return Timings(
            lease_ttl=self.lease_ttl, resync_s=self.resync_s, stop_timeout_s=self.stop_timeout_s,
            watchdog_s=self.watchdog_s or round(2 * t / 3, 2),
            fence_delay_s=self.fence_delay_s or t,
            self_fence_margin_s=self.self_fence_margin_s or t / 4,
            store_timeout_s=self.store_timeout_s or max(1.0, t / 4),
        )

    def check(self, where: str) -> None:
        """The orderings that make fencing safe; InvalidSpec names the broken one."""
        r = self.resolved()
        if r.lease_ttl < 2:
            raise InvalidSpec(f"{where}: lease_ttl must be at least 2 s (etcd's minimum)")
        if r.self_fence_margin_s >= r.lease_ttl:
            raise InvalidSpec(f"{where}: self_fence_margin_s must be shorter than lease_ttl")
        if r.watchdog_s >= r.lease_ttl:
            raise InvalidSpec(f"{where}: watchdog_s must be shorter than lease_ttl")
        if r.fence_delay_s < r.watchdog_s + 1.0:
            raise InvalidSpec(f"{where}: fence_delay_s must be at least watchdog_s + 1 s, so"
                              " a hung node's watchdog has killed its VMs before recovery")


@dataclass(frozen=True)
class AgentConfig:
    node: str
    cluster: str
    endpoints: tuple[str, ...]
    cluster_address: str
    migration_networks: tuple[NetAddress, ...]
    bridge: str = "vmswitch"
    run_dir: Path = Path("/run/ferry")
    accel: str = "auto"
    cpu_model: str = ""
    qemu_binary: str = "qemu-system-x86_64"
    timings: Timings = Timings()
    cluster_network: str = "cluster"  # the name `ferry network list` gives the cluster network


def _get(table: dict[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    if key not in table:
        if default is None:
            raise InvalidSpec(f"{where}: missing key '{key}'")
        return default
    value = table[key]
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind):
        raise InvalidSpec(f"{where}: key '{key}' must be a {kind.__name__}, not {value!r}")
    return value


def _positive(table: dict[str, Any], key: str, kind: type, where: str, default: Any) -> Any:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not isinstance(value, int)):
        raise InvalidSpec(f"{where}: key '{key}' must be a {kind.__name__}, not {value!r}")
    if value <= 0:
        raise InvalidSpec(f"{where}: key '{key}' must be positive, not {value!r}")
    return kind(value)


def _section(doc: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    sec = doc.get(name, {})
    if not isinstance(sec, dict):
        raise InvalidSpec(f"{where}: [{name}] must be a table")
    return sec


def parse_config(doc: dict[str, Any], *, where: str = "config") -> AgentConfig:
    node = _section(doc, "node", where)
    store = _section(doc, "store", where)
    net = _section(doc, "network", where)
    qemu = _section(doc, "qemu", where)
    timing = _section(doc, "timing", where)
    try:
        name = check_name("node", _get(node, "name", str, f"{where} [node]"))
    except InvalidSpec as err:
        msg = str(err)
        raise InvalidSpec(msg if msg.startswith(where) else f"{where} [node]: {msg}") from None
    endpoints = _get(store, "endpoints", list, f"{where} [store]")
    if not endpoints or not all(isinstance(e, str) for e in endpoints):
        raise InvalidSpec(f"{where} [store]: 'endpoints' must be a non-empty list of URLs")
    migs = []
    entries = net.get("migration", [])
    if not isinstance(entries, list) or not all(isinstance(m, dict) for m in entries):
        raise InvalidSpec(f"{where}: network.migration must be a list of tables"
                          " ([[network.migration]] with name and address)")
    for i, m in enumerate(entries):
        w = f"{where} [[network.migration]] #{i + 1}"
        migs.append(NetAddress(network=_get(m, "name", str, w), address=_get(m, "address", str, w)))
    cluster_network = _get(net, "cluster_name", str, f"{where} [network]", "cluster")
    _unique_networks([cluster_network, *(m.network for m in migs)], f"{where} [network]")
    accel = _get(qemu, "accel", str, f"{where} [qemu]", "auto")
    if accel not in ACCELS:
        raise InvalidSpec(f"{where} [qemu]: 'accel' must be one of {', '.join(ACCELS)}")
    return AgentConfig(
        node=name,
        cluster=_get(node, "cluster", str, f"{where} [node]", "default"),
        endpoints=tuple(endpoints),
        cluster_address=_get(net, "cluster_address", str, f"{where} [network]"),
        migration_networks=tuple(migs),
        bridge=_get(node, "bridge", str, f"{where} [node]", "vmswitch"),
        run_dir=Path(_get(node, "run_dir", str, f"{where} [node]", "/run/ferry")),
        accel=accel,
        cpu_model=_get(qemu, "cpu_model", str, f"{where} [qemu]", ""),
        qemu_binary=_get(qemu, "binary", str, f"{where} [qemu]", "qemu-system-x86_64"),
        timings=_timings(timing, f"{where} [timing]"),
        cluster_network=cluster_network,
    )


def _unique_networks(names: list[str], where: str) -> None:
    """Networks are known by name across the cluster: one name, one network."""
    for name in names:
        if not name or names.count(name) > 1:
            raise InvalidSpec(f"{where}: network name {name!r} is empty or used twice"
                              " (the cluster network is 'cluster_name', default 'cluster')")


def _timings(timing: dict[str, Any], where: str) -> Timings:
    optional = {k: _positive(timing, k, float, where, 1.0) if k in timing else 0.0
                for k in ("watchdog_s", "fence_delay_s", "self_fence_margin_s",
                          "store_timeout_s")}
    t = Timings(
        lease_ttl=_positive(timing, "lease_ttl", int, where, 15),
        resync_s=_positive(timing, "resync_s", float, where, 2.0),
        stop_timeout_s=_positive(timing, "stop_timeout_s", float, where, 60.0),
        **optional,
    )
    t.check(where)
    return t.resolved()


def load_config(path: Path) -> AgentConfig:
    try:
        text = path.read_text()
    except OSError as err:
        raise InvalidSpec(f"cannot read configuration {path}: {err.strerror}") from err
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise InvalidSpec(f"{path}: not valid TOML: {err}") from err
    return parse_config(doc, where=str(path))


def resolve_accel(wanted: str) -> str:
    """'auto' -> kvm when /dev/kvm is usable, else tcg."""
    if wanted != "auto":
        return wanted
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"

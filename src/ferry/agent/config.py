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
    lease_ttl: int = 10  # seconds; the node is "up" while its lease lives
    resync_s: float = 2.0  # full reconcile even without store events
    stop_timeout_s: float = 60.0  # guest shutdown before a forced stop


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
        timings=Timings(
            lease_ttl=_positive(timing, "lease_ttl", int, f"{where} [timing]", 10),
            resync_s=_positive(timing, "resync_s", float, f"{where} [timing]", 2.0),
            stop_timeout_s=_positive(timing, "stop_timeout_s", float, f"{where} [timing]", 60.0),
        ),
    )


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

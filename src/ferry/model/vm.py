"""Virtual machines: their specification, who owns them, and what a node observes."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace

from ferry.model.errors import InvalidSpec
from ferry.model.ha import HaPolicy, StartAction
from ferry.model.policy import MigrationPolicy

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
MIN_MEMORY_MIB = 32
MAX_MEMORY_MIB = 1024 * 1024
MAX_VCPUS = 64


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidSpec(
            f"invalid {kind} name {name!r}: use 1-31 lower-case letters, digits and '-',"
            " starting with a letter or digit"
        )
    return name


class Power(enum.Enum):
    """What the cluster wants of a VM."""

    ON = "on"
    OFF = "off"


class VmState(enum.Enum):
    """What a user sees of a VM, combining the desired power with what its node reports."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    MIGRATING = "migrating"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class BootSpec:
    """Direct kernel boot (the lab guest); None in VmSpec means boot from the first disk."""

    kernel: str
    initrd: str
    cmdline: str


@dataclass(frozen=True)
class DiskSpec:
    path: str
    size_bytes: int
    format: str = "qcow2"


@dataclass(frozen=True)
class NicSpec:
    mac: str
    bridge: str = "vmswitch"
    ip: str | None = None


@dataclass(frozen=True)
class VmSpec:
    name: str
    uid: str
    memory_mib: int
    vcpus: int
    volume: str
    config_path: str
    disks: tuple[DiskSpec, ...]
    nics: tuple[NicSpec, ...]
    boot: BootSpec | None = None
    machine: str = "pc"
    cpu_model: str | None = None
    created_at: float = 0.0
    ha: HaPolicy | None = None
    start_action: StartAction = StartAction.START
    migration_policy: MigrationPolicy | None = None

    def check(self) -> None:
        """Raise InvalidSpec if this spec could not boot; changes nothing."""
        check_name("VM", self.name)
        if not re.fullmatch(r"[0-9a-f]{12}", self.uid):
            raise InvalidSpec(f"VM {self.name}: uid must be 12 hex digits")
        if not MIN_MEMORY_MIB <= self.memory_mib <= MAX_MEMORY_MIB:
            raise InvalidSpec(
                f"VM {self.name}: memory must be between {MIN_MEMORY_MIB} MiB and"
                f" {MAX_MEMORY_MIB} MiB, not {self.memory_mib} MiB"
            )
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise InvalidSpec(f"VM {self.name}: vcpus must be between 1 and {MAX_VCPUS}")
        if not self.disks and self.boot is None:
            raise InvalidSpec(f"VM {self.name}: needs a disk or a kernel to boot")
        for nic in self.nics:
            if not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", nic.mac):
                raise InvalidSpec(f"VM {self.name}: bad MAC address {nic.mac!r}")
        if self.ha is not None and self.start_action is not StartAction.NONE:
            raise InvalidSpec(f"VM {self.name} is highly available: its start action is"
                              " 'none' (only the cluster decides where it starts)")
        if self.ha is not None:
            for node in self.ha.preferred_nodes:
                check_name("node", node)

    def tap_name(self, index: int) -> str:
        """The tap device of NIC ``index``: the same on every node, so migration finds it."""
        return f"ft{self.uid[:10]}{index}"


@dataclass(frozen=True)
class Owner:
    """Which node may run the VM, and whether it should run.

    ``granted`` is the store revision of the write that made ``node`` the owner: the VM's
    fencing token. A write that hands the VM to a node leaves it 0, meaning "this record's
    own mod_revision"; every later write that keeps the node (power, migration flags, HA)
    carries the token forward with ``amend``. Tokens only grow, so a QEMU started under an
    older token is recognisably stale.

    During a migration ``migration`` and ``target`` are set and the source still owns it.
    ``ha`` is true once the owning node has armed HA protection for the VM (its watchdog and
    self-fencing will kill the VM's QEMU); only then may the manager restart it elsewhere.
    """

    node: str | None
    power: Power
    migration: str | None = None
    target: str | None = None
    force: bool = False
    granted: int = 0
    ha: bool = False

    def token(self, mod_revision: int) -> int:
        return self.granted or mod_revision

    def amend(self, mod_revision: int, **changes: object) -> Owner:
        """This record changed in ``changes`` with the same node and fencing token."""
        if "node" in changes and changes["node"] != self.node:
            raise ValueError("amend keeps the owner; a new owner is a new grant")
        return replace(self, granted=self.token(mod_revision), **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class VmStatus:
    """What the node running a VM reports about it (bound to that node's lease)."""

    node: str
    state: VmState
    token: int
    pid: int | None = None
    since: float = 0.0
    detail: str = ""


def mac_for(uid: str) -> str:
    """A locally administered MAC in QEMU's 52:54:00 range derived from the VM's uid."""
    return "52:54:00:" + ":".join(uid[i : i + 2] for i in (0, 2, 4))


def parse_size(text: str, *, default_unit: str = "M") -> int:
    """'256M' -> bytes. Suffixes K, M, G, T are powers of 1024; a bare number is in
    ``default_unit``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise InvalidSpec(f"not a size: {text!r} (use e.g. 256M or 1G)")
    factor = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    suffix = (m.group(2) or default_unit).upper()
    return int(float(m.group(1)) * factor[suffix])

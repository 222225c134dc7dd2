"""Machine types: "pc" is an alias each QEMU version resolves to its newest machine, so a
VM is started with the concrete type (pc-i440fx-10.0) and keeps it for its whole life; a
migration target, perhaps a newer QEMU, then builds exactly the same machine."""

from __future__ import annotations

import re
from functools import cache

from ferry.model.errors import QemuError
from ferry.shell import CommandFailed, run_sync


@cache
def machine_aliases(binary: str) -> dict[str, str]:
    """alias -> concrete machine type, from ``BINARY -machine help``."""
    try:
        out = run_sync(binary, "-machine", "help", timeout=30)
    except CommandFailed as err:
        raise QemuError(f"cannot list QEMU's machine types: {err}") from err
    aliases = {}
    for line in out.splitlines():
        m = re.match(r"^(\S+)\s+.*\(alias of (\S+)\)\s*$", line)
        if m:
            aliases[m.group(1)] = m.group(2)
    return aliases


def resolve_machine(binary: str, machine: str) -> str:
    return machine_aliases(binary).get(machine, machine)

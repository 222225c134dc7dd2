"""The layout of a VM's files on a shared volume, and creating/removing them.

    <volume>/vms/<vm>/vm.json        the VM's configuration (the store holds the same)
    <volume>/vms/<vm>/disk0.qcow2    its disks
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ferry.model.cluster import Volume
from ferry.model.errors import Conflict, InvalidSpec
from ferry.shell import CommandFailed, run


def vm_dir(volume: Volume, vm: str) -> Path:
    return Path(volume.path) / "vms" / vm


def check_volume(volume: Volume) -> None:
    p = Path(volume.path)
    if not p.is_dir():
        raise InvalidSpec(f"volume {volume.name}: {p} is not a directory on this node")
    if not os.access(p, os.W_OK):
        raise InvalidSpec(f"volume {volume.name}: {p} is not writable from this node")


async def create_vm_files(volume: Volume, vm: str, *, disk_size: int, config_json: str) -> Path:
    """Create the VM's directory, an empty qcow2 disk and its config file; return the disk."""
    check_volume(volume)
    d = vm_dir(volume, vm)
    if d.exists():
        raise Conflict(f"{d} already exists on volume {volume.name}: remove it or pick another"
                       " name")
    d.mkdir(parents=True)
    disk = d / "disk0.qcow2"
    try:
        await run("qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(disk_size))
        (d / "vm.json").write_text(config_json)
    except (CommandFailed, OSError) as err:
        shutil.rmtree(d, ignore_errors=True)
        raise InvalidSpec(f"cannot create the disk of {vm}: {err}") from err
    return disk


def write_config(volume: Volume, vm: str, config_json: str) -> None:
    (vm_dir(volume, vm) / "vm.json").write_text(config_json)


def remove_vm_files(volume: Volume, vm: str) -> None:
    shutil.rmtree(vm_dir(volume, vm), ignore_errors=True)

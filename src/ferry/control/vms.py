"""VM operations: create, start, stop, delete, list, show."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import time
from dataclasses import dataclass, replace

from ferry.control.client import ClusterClient
from ferry.control.ha import check_policy
from ferry.control.nodes import node_loads
from ferry.ha.placement import check_fits, choose_node
from ferry.model import codec
from ferry.model.cluster import ClusterConfig, Volume
from ferry.model.errors import Conflict, FerryError, InvalidSpec, NotFound, Timeout
from ferry.model.ha import HaPolicy, StartAction
from ferry.model.vm import (
    BootSpec,
    DiskSpec,
    NicSpec,
    Owner,
    Power,
    VmSpec,
    VmState,
    VmStatus,
    check_name,
    mac_for,
)
from ferry.storage.volume import create_vm_files, remove_vm_files, vm_dir, write_config
from ferry.store.base import Compare, Delete, Put


@dataclass(frozen=True)
class VmView:
    name: str
    state: VmState
    node: str | None
    memory_mib: int
    vcpus: int
    ip: str | None
    migration: str | None = None
    target: str | None = None
    pid: int | None = None
    since: float | None = None
    detail: str = ""
    volume: str = ""
    disk: str = ""
    ha: HaPolicy | None = None
    ha_armed: bool = False
    start_action: StartAction = StartAction.START


def vm_state(owner: Owner, status: VmStatus | None, *, node_up: bool = True) -> VmState:
    """What users see: the desired power combined with what the owning node reports.
    A VM meant to run on a node that is down is UNKNOWN: nobody can say what it does."""
    reported = status if status is not None and status.node == owner.node else None
    if owner.power is Power.OFF:
        # Stopped only once its node has released it: no status may just mean the node
        # lost its lease, and a node cut off from the cluster may still run the VM.
        if owner.node is None:
            return VmState.STOPPED
        return VmState.STOPPING if node_up else VmState.UNKNOWN
    if owner.migration is not None:
        return VmState.MIGRATING
    if reported is None:
        return VmState.STARTING if node_up else VmState.UNKNOWN
    return reported.state


async def show_vm(cl: ClusterClient, name: str) -> VmView:
    spec = await cl.spec(name)
    owner, _ = await cl.owner(name)
    up = owner.node is None or await cl.node_up(owner.node)
    return _view(spec, owner, await cl.status(name), node_up=up)


def _view(spec: VmSpec, owner: Owner, status: VmStatus | None, *,
          node_up: bool = True) -> VmView:
    reported = status if status is not None and status.node == owner.node else None
    state = vm_state(owner, status, node_up=node_up)
    detail = reported.detail if reported else ""
    if state is VmState.UNKNOWN:
        detail = f"its node {owner.node} is down" + (
            "; HA restarts it elsewhere after the fence delay" if owner.ha else "")
    return VmView(
        name=spec.name, state=state,
        node=owner.node if owner.power is Power.ON or reported else None,
        memory_mib=spec.memory_mib, vcpus=spec.vcpus,
        ip=spec.nics[0].ip if spec.nics else None,
        migration=owner.migration, target=owner.target,
        pid=reported.pid if reported else None, since=reported.since if reported else None,
        detail=detail, volume=spec.volume,
        disk=spec.disks[0].path if spec.disks else "", ha=spec.ha, ha_armed=owner.ha,
        start_action=spec.start_action,
    )


async def list_vms(cl: ClusterClient) -> list[VmView]:
    specs = await cl.all_of(VmSpec, cl.keys.vms, "spec")
    owners = await cl.all_of(Owner, cl.keys.vms, "owner")
    statuses = await cl.all_of(VmStatus, cl.keys.vms, "status")
    entries, _ = await cl.store.get_prefix(cl.keys.nodes)
    up = {e.key for e in entries}
    views = []
    for n, s in sorted(specs.items()):
        owner = owners.get(n, Owner(node=None, power=Power.OFF))
        node_up = owner.node is None or cl.keys.node_alive(owner.node) in up
        views.append(_view(s, owner, statuses.get(n), node_up=node_up))
    return views


async def _allocate_ip(cl: ClusterClient, config: ClusterConfig) -> str | None:
    if config.vm_network is None:
        return None
    net = ipaddress.ip_network(config.vm_network.subnet)
    entries, _ = await cl.store.get_prefix(cl.keys.ip_claims)
    taken = {e.key.rsplit("/", 1)[1] for e in entries}
    for i, host in enumerate(net.hosts(), start=1):
        if i >= config.vm_network.first_host and str(host) not in taken:
            return str(host)
    raise Conflict(f"no free address left in {net}")


async def create_vm(cl: ClusterClient, name: str, *, memory_mib: int = 256, vcpus: int = 1,
                    disk_size: int = 1024**3, volume: str | None = None,
                    ha: HaPolicy | None = None, kernel_args: str = "") -> VmSpec:
    """Check everything, create the VM's files on its volume, then record it in one txn."""
    check_name("VM", name)
    if await cl.store.get(cl.keys.vm_spec(name)) is not None:
        raise Conflict(f"VM {name!r} already exists")
    config = await cl.config()
    vol = await _volume(cl, config, volume)
    if disk_size < 1024**2:
        raise InvalidSpec("disk size must be at least 1M")
    uid = secrets.token_hex(6)
    ip = await _allocate_ip(cl, config)
    spec = _new_spec(name, uid=uid, memory_mib=memory_mib, vcpus=vcpus, volume=vol,
                     disk_size=disk_size, ip=ip, config=config, kernel_args=kernel_args)
    if ha is not None:
        await check_policy(cl, spec, ha)
        spec = replace(spec, ha=ha, start_action=StartAction.NONE)
    spec.check()
    _check_boot(spec)
    await create_vm_files(vol, name, disk_size=disk_size, config_json=codec.encode(spec))
    ops: list[Put | Delete] = [
        Put(cl.keys.vm_spec(name), codec.encode(spec)),
        Put(cl.keys.vm_owner(name), codec.encode(Owner(node=None, power=Power.OFF))),
    ]
    compares = [Compare.absent(cl.keys.vm_spec(name))]
    if ip is not None:
        ops.append(Put(cl.keys.ip_claim(ip), name))
        compares.append(Compare.absent(cl.keys.ip_claim(ip)))
    res = await cl.store.txn(compares, ops)
    if not res.succeeded:
        remove_vm_files(vol, name)
        raise Conflict(f"VM {name!r} (or its address {ip}) was taken concurrently; try again")
    return spec


async def _volume(cl: ClusterClient, config: ClusterConfig, name: str | None) -> Volume:
    name = name or config.default_volume
    if not name:
        raise InvalidSpec("no volume given and the cluster has no default volume")
    return await cl.volume(name)


def _new_spec(name: str, *, uid: str, memory_mib: int, vcpus: int, volume: Volume,
              disk_size: int, ip: str | None, config: ClusterConfig,
              kernel_args: str = "") -> VmSpec:
    d = vm_dir(volume, name)
    boot = None
    if kernel_args and config.boot_image is None:
        raise InvalidSpec("kernel arguments need a cluster boot image (direct kernel boot)")
    if config.boot_image is not None:
        args = [config.boot_image.cmdline, f"ferry.hostname={name}", kernel_args]
        if ip is not None and config.vm_network is not None:
            prefix = ipaddress.ip_network(config.vm_network.subnet).prefixlen
            args.append(f"ferry.ip={ip}/{prefix}")
        boot = BootSpec(kernel=config.boot_image.kernel, initrd=config.boot_image.initrd,
                        cmdline=" ".join(a for a in args if a))
    return VmSpec(
        name=name, uid=uid, memory_mib=memory_mib, vcpus=vcpus, volume=volume.name,
        config_path=str(d / "vm.json"),
        disks=(DiskSpec(path=str(d / "disk0.qcow2"), size_bytes=disk_size),),
        nics=(NicSpec(mac=mac_for(uid), bridge=config.bridge, ip=ip),),
        boot=boot, created_at=time.time(),
    )


def _check_boot(spec: VmSpec) -> None:
    if spec.boot is not None:
        for f in (spec.boot.kernel, spec.boot.initrd):
            if not os.access(f, os.R_OK):
                raise InvalidSpec(f"VM {spec.name} would not boot: {f} is missing")


async def start_vm(cl: ClusterClient, name: str, *, node: str | None = None,
                   force: bool = False) -> int:
    """Make ``node`` (or the best node) the owner with power on; returns the owner revision."""
    spec = await cl.spec(name)
    owner, rev = await cl.owner(name)
    if owner.power is Power.ON:
        where = f"on {owner.node}" if owner.node else "already"
        raise Conflict(f"VM {name} is already running {where}; stop it first")
    up = owner.node is None or await cl.node_up(owner.node)
    if vm_state(owner, await cl.status(name), node_up=up) is VmState.STOPPING:
        raise Conflict(f"VM {name} is still stopping on {owner.node}; wait until it has stopped")
    loads = await node_loads(cl)
    if node is not None:
        by_name = {n.name: n for n in loads}
        if node not in by_name:
            raise NotFound(f"node {node!r} does not exist")
        check_fits(by_name[node], spec.memory_mib)
    else:
        node = choose_node(loads, spec.memory_mib, spec.ha.preferred_nodes if spec.ha else ())
    if owner.node is not None and owner.node != node and not force:
        await _check_left(cl, name, owner)
    new = Owner(node=node, power=Power.ON)
    res = await cl.store.txn([Compare.unchanged(cl.keys.vm_owner(name), rev)],
                             [Put(cl.keys.vm_owner(name), codec.encode(new))])
    if not res.succeeded:
        raise Conflict(f"VM {name} changed while starting it; try again")
    return res.revision


async def _check_left(cl: ClusterClient, name: str, owner: Owner) -> None:
    """Moving a VM to another node needs its last node to have released it (it confirmed
    the QEMU is gone). A node that is down (cut off, hung) may still run it unseen; a fenced
    node has killed its armed HA VMs, nothing else is known to be dead."""
    assert owner.node is not None
    fenced = await cl.store.get(cl.keys.node_fenced(owner.node)) is not None
    if owner.ha and fenced:
        return
    if await cl.node_up(owner.node):
        raise Conflict(f"VM {name} is still stopping on {owner.node}; wait until it has"
                       " stopped")
    raise Conflict(f"VM {name} last ran on {owner.node}, which is down: it may still run"
                   f" there unseen. Start it again when {owner.node} is back (or on"
                   f" {owner.node}); if you know {owner.node} is off, use --force")


async def wait_started(cl: ClusterClient, name: str, *, token: int, timeout: float = 120) -> VmView:
    """Wait until the owner reports the VM running; on failure give the VM back to 'off'."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owner, rev = await cl.owner(name)
        status = await cl.status(name)
        if owner.power is not Power.ON:
            raise Conflict(f"VM {name} was stopped while starting")
        if status is not None and status.node == owner.node and status.token >= token:
            if status.state is VmState.RUNNING:
                return await show_vm(cl, name)
            if status.state is VmState.FAILED:
                await _power_off_after_failure(cl, name, rev)
                raise FerryError(f"VM {name} failed to start on {owner.node}: {status.detail}")
        await asyncio.sleep(0.1)
    raise Timeout(f"VM {name} did not start within {timeout:.0f}s")


async def _power_off_after_failure(cl: ClusterClient, name: str, rev: int) -> None:
    owner, current = await cl.owner(name)
    if current != rev:
        return  # someone else changed the VM since: theirs is the newer intent
    off = owner.amend(rev, power=Power.OFF)
    await cl.store.txn([Compare.unchanged(cl.keys.vm_owner(name), rev)],
                       [Put(cl.keys.vm_owner(name), codec.encode(off))])


async def stop_vm(cl: ClusterClient, name: str, *, force: bool = False) -> None:
    await cl.spec(name)
    owner, rev = await cl.owner(name)
    if owner.migration is not None:
        raise Conflict(f"VM {name} is migrating ({owner.migration}); cancel the migration first")
    if owner.power is Power.OFF and not force:
        raise Conflict(f"VM {name} is not running")
    new = owner.amend(rev, power=Power.OFF, force=force)
    res = await cl.store.txn([Compare.unchanged(cl.keys.vm_owner(name), rev)],
                             [Put(cl.keys.vm_owner(name), codec.encode(new))])
    if not res.succeeded:
        raise Conflict(f"VM {name} changed while stopping it; try again")


async def wait_stopped(cl: ClusterClient, name: str, *, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owner, _ = await cl.owner(name)
        if vm_state(owner, await cl.status(name)) is VmState.STOPPED:
            return
        await asyncio.sleep(0.1)
    raise Timeout(f"VM {name} did not stop within {timeout:.0f}s")


async def delete_vm(cl: ClusterClient, name: str) -> None:
    spec = await cl.spec(name)
    owner, rev = await cl.owner(name)
    if vm_state(owner, await cl.status(name)) is not VmState.STOPPED:
        raise Conflict(f"VM {name} is not stopped; stop it first")
    ops: list[Put | Delete] = [Delete(cl.keys.vm_prefix(name), prefix=True)]
    ip = spec.nics[0].ip if spec.nics else None
    if ip is not None:
        ops.append(Delete(cl.keys.ip_claim(ip)))
    res = await cl.store.txn([Compare.unchanged(cl.keys.vm_owner(name), rev)], ops)
    if not res.succeeded:
        raise Conflict(f"VM {name} changed while deleting it; try again")
    try:
        remove_vm_files(await cl.volume(spec.volume), name)
    except NotFound:
        pass


async def destroy_vm(cl: ClusterClient, name: str) -> None:
    """Stop a VM at once if it runs, then delete it (``ferry vm delete --force``)."""
    owner, _ = await cl.owner(name)
    if vm_state(owner, await cl.status(name)) is not VmState.STOPPED:
        if owner.migration is None and owner.power is Power.ON:
            await stop_vm(cl, name, force=True)
        await wait_stopped(cl, name)
    await delete_vm(cl, name)


def save_config(volume: Volume, spec: VmSpec) -> None:
    write_config(volume, spec.name, codec.encode(spec))

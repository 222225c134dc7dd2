"""A cluster in a MemoryStore, as agents and ``lab up`` would leave it, for control tests.

Nodes are registered the way the agent does it (``agent/daemon.py``): ``nodes/<n>/info``
(NodeInfo JSON, persistent) and ``nodes/<n>/alive`` on the node's lease. A node goes down
when its lease is revoked, as when an agent dies and its lease expires.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ferry.control.client import ClusterClient
from ferry.control.vms import create_vm, start_vm
from ferry.model import codec
from ferry.model.cluster import BootImage, ClusterConfig, VmNetwork, Volume
from ferry.model.migration import MigrationRecord
from ferry.model.node import NetAddress, NodeInfo
from ferry.model.vm import Owner, Power, VmState, VmStatus
from ferry.store.keys import Keys
from ferry.store.memory import ManualClock, MemoryStore

SUBNET = "10.79.0.0/24"


@dataclass
class Cluster:
    store: MemoryStore
    clock: ManualClock
    keys: Keys
    cl: ClusterClient
    volume: Volume
    leases: dict[str, int] = field(default_factory=dict)

    @property
    def revision(self) -> int:
        return self.store.revision

    async def add_node(self, name: str, *, memory_mib: int = 8192, up: bool = True) -> NodeInfo:
        index = len(self.leases) + 11
        info = NodeInfo(
            name=name, cluster_address=f"10.77.0.{index}",
            migration_addresses=(NetAddress("migration", f"10.78.0.{index}"),),
            bridge="vmswitch", memory_mib=memory_mib, cpus=2, accel="tcg", version="0.1.0",
            started_at=1.0,
        )
        lease = await self.store.grant_lease(10)
        self.leases[name] = lease
        await self.store.put(self.keys.node_info(name), codec.encode(info))
        if up:
            await self.store.put(self.keys.node_alive(name), "1234", lease=lease)
        return info

    async def node_down(self, name: str) -> None:
        await self.store.revoke_lease(self.leases[name])

    async def set_owner(self, vm: str, owner: Owner) -> int:
        return await self.store.put(self.keys.vm_owner(vm), codec.encode(owner))

    async def owner(self, vm: str) -> Owner:
        e = await self.store.get(self.keys.vm_owner(vm))
        assert e is not None
        return codec.decode(Owner, e.value)

    async def report(self, vm: str, node: str, state: VmState = VmState.RUNNING,
                     *, token: int = 0, detail: str = "") -> None:
        """What the node's agent writes once its QEMU runs (on the node's lease)."""
        status = VmStatus(node=node, state=state, token=token, pid=4242, since=1.0,
                          detail=detail)
        await self.store.put(self.keys.vm_status(vm), codec.encode(status),
                             lease=self.leases[node])

    async def put_record(self, rec: MigrationRecord) -> int:
        return await self.store.put(self.keys.migration_record(rec.id), codec.encode(rec))


async def make_cluster(tmp_path: Path, *, vm_network: bool = True, boot: bool = False,
                       default_volume: bool = True) -> Cluster:
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    keys = Keys("test")
    volume_dir = tmp_path / "shared0"
    volume_dir.mkdir()
    volume = Volume(name="shared0", path=str(volume_dir))
    boot_image = None
    if boot:
        kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.gz"
        kernel.write_bytes(b"k")
        initrd.write_bytes(b"i")
        boot_image = BootImage(kernel=str(kernel), initrd=str(initrd), cmdline="console=ttyS0")
    config = ClusterConfig(
        name="test", default_volume="shared0" if default_volume else "",
        boot_image=boot_image,
        vm_network=VmNetwork(subnet=SUBNET, first_host=10) if vm_network else None,
    )
    await store.put(keys.cluster_config, codec.encode(config))
    await store.put(keys.volume("shared0"), codec.encode(volume))
    return Cluster(store=store, clock=clock, keys=keys, cl=ClusterClient(store, keys),
                   volume=volume)


async def running_vm(c: Cluster, name: str, node: str, *, memory_mib: int = 256) -> int:
    """A VM created, owned by ``node`` with power on, and reported running there; returns the
    owner revision (its token)."""
    await create_vm(c.cl, name, memory_mib=memory_mib, disk_size=1024**2)
    token = await start_vm(c.cl, name, node=node)
    await c.report(name, node, token=token)
    return token


def owner_on(node: str) -> Owner:
    return Owner(node=node, power=Power.ON)


async def cluster_with_vms(tmp_path: Path, vms: tuple[str, ...]) -> Cluster:
    """Nodes node1-3, and ``vms`` running on node1."""
    cluster = await make_cluster(tmp_path)
    for n in ("node1", "node2", "node3"):
        await cluster.add_node(n)
    for vm in vms:
        await running_vm(cluster, vm, "node1")
    return cluster

"""Pure: the names and addresses of a lab. Builds nothing.

    root namespace: bridges <tag>-cl (cluster network; the host has .1 there and runs the
                    three etcd members on it, client ports 2379/2381/2383, peer ports
                    2380/2382/2384, data under /dev/shm),
                    <tag>-mig and <tag>-mig2 (migration networks, no gateway; `ferry lab
                    net NODE NETWORK gateway` gives a node a default route through one),
                    <tag>-lan (the shared LAN that every node's vmswitch is uplinked to)
    <name>-nodeN:   cl0, mig0, mig1 (veths to the root bridges), vmswitch with uplink0
    <name>-client:  lan0 on the LAN; the prober runs here
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ferry.model.errors import LabError

LAB_ROOT = Path("/var/lib/ferry-lab")
SHM_ROOT = Path("/dev/shm/ferry-lab")
BRIDGE = "vmswitch"
ETCD_MEMBERS = 3  # the smallest cluster that keeps a quorum when one member dies
ETCD_CLIENT_PORT = 2379  # member i (0-based) listens on 2379 + 2i, its peers on 2380 + 2i


@dataclass(frozen=True)
class EtcdMember:
    index: int  # 0-based: the position in LabState.etcd_pids
    name: str  # etcd1, etcd2, ...
    client_url: str
    peer_url: str
    data_dir: Path

    @property
    def marker(self) -> str:
        """What its command line contains, and no other member's (the space ends the path)."""
        return f"{self.data_dir} "


@dataclass(frozen=True)
class Network:
    name: str
    role: str  # cluster | migration | vm
    bridge: str  # root-namespace bridge
    subnet_prefix: str  # "10.77.0"
    node_if: str  # interface name inside a node namespace
    gateway: bool = False

    def node_address(self, index: int) -> str:
        return f"{self.subnet_prefix}.{10 + index}"

    @property
    def subnet(self) -> str:
        return f"{self.subnet_prefix}.0/24"


@dataclass(frozen=True)
class LabLayout:
    name: str = "ferry"
    nodes: int = 3
    tag: str = "fy"  # short, for interface names in the root namespace (IFNAMSIZ is 15)
    octet: int = 77  # second octet of the first subnet; the lab uses four from here

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 9:
            raise LabError("a lab has 1 to 9 nodes")
        if not (self.tag.isalnum() and len(self.tag) <= 4):
            raise LabError("the lab tag must be 1-4 letters or digits")

    @staticmethod
    def for_name(name: str, *, nodes: int = 3) -> LabLayout:
        """The default lab keeps its addresses (tag fy, 10.77-80); any other name gets its
        own tag and subnets derived from the name, so two labs can be up side by side."""
        if name == "ferry":
            return LabLayout(name=name, nodes=nodes)
        digest = hashlib.sha1(name.encode()).digest()
        return LabLayout(name=name, nodes=nodes, tag="l" + digest.hex()[:3],
                         octet=104 + (digest[3] % 33) * 4)

    @property
    def dir(self) -> Path:
        return LAB_ROOT / self.name

    @property
    def shm_dir(self) -> Path:
        return SHM_ROOT / self.name

    @property
    def cluster(self) -> Network:
        return Network("cluster", "cluster", f"{self.tag}-cl", f"10.{self.octet}.0", "cl0")

    @property
    def migration_networks(self) -> tuple[Network, ...]:
        return (
            Network("migration", "migration", f"{self.tag}-mig", f"10.{self.octet + 1}.0", "mig0"),
            Network("migration2", "migration", f"{self.tag}-mig2", f"10.{self.octet + 3}.0",
                    "mig1"),
        )

    @property
    def lan(self) -> Network:
        return Network("lan", "vm", f"{self.tag}-lan", f"10.{self.octet + 2}.0", "uplink0")

    @property
    def networks(self) -> tuple[Network, ...]:
        return (self.cluster, *self.migration_networks, self.lan)

    @property
    def host_address(self) -> str:
        """The host's address on the cluster network: etcd listens here."""
        return f"{self.cluster.subnet_prefix}.1"

    @property
    def etcd_members(self) -> tuple[EtcdMember, ...]:
        h = self.host_address
        return tuple(
            EtcdMember(index=i, name=f"etcd{i + 1}",
                       client_url=f"http://{h}:{ETCD_CLIENT_PORT + 2 * i}",
                       peer_url=f"http://{h}:{ETCD_CLIENT_PORT + 2 * i + 1}",
                       data_dir=self.shm_dir / f"etcd{i + 1}")
            for i in range(ETCD_MEMBERS))

    @property
    def etcd_urls(self) -> list[str]:
        """Every member's client URL: what agents and the CLI are given."""
        return [m.client_url for m in self.etcd_members]

    def etcd_argv(self, member: EtcdMember) -> list[str]:
        """The member's command line. With a data dir from an earlier start, etcd ignores the
        --initial-* flags and rejoins as the member it was."""
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.etcd_members)
        return [
            "etcd", "--name", member.name, "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--initial-cluster-token", self.name,
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000",
        ]

    @property
    def client_ns(self) -> str:
        return f"{self.name}-client"

    @property
    def client_address(self) -> str:
        return f"{self.lan.subnet_prefix}.2"

    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def node_ns(self, node: str) -> str:
        return f"{self.name}-{node}"

    def node_index(self, node: str) -> int:
        if node not in self.node_names():
            raise LabError(f"the lab has no node {node!r} (nodes: {', '.join(self.node_names())})")
        return int(node[4:])

    def root_peer(self, index: int, net: Network) -> str:
        """The root-namespace end of node ``index``'s veth on ``net``."""
        short = {"cluster": "c", "migration": "m", "migration2": "n", "lan": "l"}[net.name]
        return f"{self.tag}{index}{short}"

    @property
    def client_peer(self) -> str:
        return f"{self.tag}0l"

    def config_path(self, node: str) -> Path:
        return self.dir / f"{node}.toml"

    def run_dir(self, node: str) -> Path:
        return self.dir / "run" / node

    def log_path(self, what: str) -> Path:
        return self.dir / "logs" / f"{what}.log"

    @property
    def volume_dir(self) -> Path:
        return self.dir / "volumes" / "shared0"

    @property
    def state_path(self) -> Path:
        return self.dir / "lab.json"

    def agent_config(self, node: str, *, cluster: str) -> str:
        """The node's agent configuration: the same file format as on a real host."""
        i = self.node_index(node)
        migs = "".join(
            f'\n[[network.migration]]\nname = "{n.name}"\naddress = "{n.node_address(i)}"\n'
            for n in self.migration_networks)
        endpoints = ", ".join(f'"{url}"' for url in self.etcd_urls)
        return (
            f'[node]\nname = "{node}"\ncluster = "{cluster}"\nbridge = "{BRIDGE}"\n'
            f'run_dir = "{self.run_dir(node)}"\n\n'
            f'[store]\nendpoints = [{endpoints}]\n\n'
            f'[network]\ncluster_address = "{self.cluster.node_address(i)}"\n{migs}\n'
            '[qemu]\naccel = "tcg"\n\n'
            '[timing]\nlease_ttl = 4\nresync_s = 2.0\nstop_timeout_s = 30.0\n'
        )

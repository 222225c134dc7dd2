"""Pure: the names and addresses of a lab. Builds nothing.

    root namespace: bridges <tag>-cl (cluster network, the host has .1 there and runs etcd),
                    <tag>-mig and <tag>-mig2 (migration networks, no gateway), <tag>-lan
                    (the shared LAN that every node's vmswitch is uplinked to)
    <name>-nodeN:   cl0, mig0, mig1 (veths to the root bridges), vmswitch with uplink0
    <name>-client:  lan0 on the LAN; the prober runs here
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ferry.model.errors import LabError

LAB_ROOT = Path("/var/lib/ferry-lab")
SHM_ROOT = Path("/dev/shm/ferry-lab")
BRIDGE = "vmswitch"


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
    def etcd_url(self) -> str:
        return f"http://{self.host_address}:2379"

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
        return (
            f'[node]\nname = "{node}"\ncluster = "{cluster}"\nbridge = "{BRIDGE}"\n'
            f'run_dir = "{self.run_dir(node)}"\n\n'
            f'[store]\nendpoints = ["{self.etcd_url}"]\n\n'
            f'[network]\ncluster_address = "{self.cluster.node_address(i)}"\n{migs}\n'
            '[qemu]\naccel = "tcg"\n\n'
            '[timing]\nlease_ttl = 4\nresync_s = 2.0\nstop_timeout_s = 30.0\n'
        )

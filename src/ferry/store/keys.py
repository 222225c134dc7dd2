"""The whole key layout of the cluster store, in one place.

    /ferry/<cluster>/
      vms/<vm>/spec                 VmSpec (persistent)
      vms/<vm>/owner                Owner; its mod_revision is the VM's fencing token
      vms/<vm>/status               VmStatus, written by the node running it, on its lease
      nodes/<node>/info             NodeInfo (persistent, so a down node is still listed)
      nodes/<node>/alive            on the node's lease: the node is up while it exists
      nodes/<node>/fenced           FenceRecord: the manager took the node's VMs away
      nodes/<node>/paused           exists while an operator paused the node (no placement)
      nodes/<node>/networks         NodeNetworks: its links to the cluster networks, on its
                                    lease, rewritten by the agent when a link changes
      manager                       the elected manager's node name, on its lease
      migrations/<id>/record        MigrationRecord (phases, timeline, outcome)
      migrations/<id>/progress      the latest MigrationProgress sample (frequent writes)
      migrations/<id>/cancel        exists once a cancel was requested (create-if-absent)
      config/cluster                ClusterConfig
      config/volumes/<name>         Volume
      ipam/<address>                the VM holding a static address (claimed in create's txn)
      config/networks/<name>        Network
      events/<revision-ordered id>  Event
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    cluster: str = "default"

    @property
    def root(self) -> str:
        return f"/ferry/{self.cluster}/"

    # -- VMs
    @property
    def vms(self) -> str:
        return self.root + "vms/"

    def vm_spec(self, vm: str) -> str:
        return f"{self.vms}{vm}/spec"

    def vm_owner(self, vm: str) -> str:
        return f"{self.vms}{vm}/owner"

    def vm_status(self, vm: str) -> str:
        return f"{self.vms}{vm}/status"

    def vm_prefix(self, vm: str) -> str:
        return f"{self.vms}{vm}/"

    # -- nodes
    @property
    def nodes(self) -> str:
        return self.root + "nodes/"

    def node_info(self, node: str) -> str:
        return f"{self.nodes}{node}/info"

    def node_alive(self, node: str) -> str:
        return f"{self.nodes}{node}/alive"

    def node_fenced(self, node: str) -> str:
        return f"{self.nodes}{node}/fenced"

    def node_paused(self, node: str) -> str:
        return f"{self.nodes}{node}/paused"

    def node_networks(self, node: str) -> str:
        return f"{self.nodes}{node}/networks"

    @property
    def manager(self) -> str:
        return self.root + "manager"

    # -- migrations
    @property
    def migrations(self) -> str:
        return self.root + "migrations/"

    def migration_record(self, mid: str) -> str:
        return f"{self.migrations}{mid}/record"

    def migration_progress(self, mid: str) -> str:
        return f"{self.migrations}{mid}/progress"

    def migration_cancel(self, mid: str) -> str:
        return f"{self.migrations}{mid}/cancel"

    def migration_prefix(self, mid: str) -> str:
        return f"{self.migrations}{mid}/"

    # -- configuration
    @property
    def cluster_config(self) -> str:
        return self.root + "config/cluster"

    def ip_claim(self, address: str) -> str:
        return f"{self.root}ipam/{address}"

    @property
    def ip_claims(self) -> str:
        return self.root + "ipam/"

    @property
    def volumes(self) -> str:
        return self.root + "config/volumes/"

    def volume(self, name: str) -> str:
        return self.volumes + name

    @property
    def networks(self) -> str:
        return self.root + "config/networks/"

    def network(self, name: str) -> str:
        return self.networks + name

    @property
    def events(self) -> str:
        return self.root + "events/"

    def event(self, at: float, origin: str) -> str:
        """Event keys sort by time: nanoseconds, zero-padded, then who wrote it."""
        return f"{self.events}{int(at * 1e9):020d}-{origin}"

    def parse(self, key: str) -> tuple[str, str, str] | None:
        """Split a key under root into (kind, name, leaf), e.g. ('vms', 'vm1', 'owner');
        configuration keys give ('volumes', 'vol0', '')."""
        if not key.startswith(self.root):
            return None
        parts = key[len(self.root) :].split("/")
        if parts[0] == "config" and len(parts) == 3:
            return parts[1], parts[2], ""
        if len(parts) == 3:
            return parts[0], parts[1], parts[2]
        if len(parts) == 2:
            return parts[0], parts[1], ""
        return None

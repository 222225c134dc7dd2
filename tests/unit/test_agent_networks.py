"""The agent publishes its links (on its lease, only on change) and step 1 chooses from them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest

from ferry.agent import networks as agent_networks
from ferry.agent.config import AgentConfig
from ferry.agent.context import AgentContext
from ferry.agent.networks import NetworkPublisher, choose_migration_network, configured
from ferry.agent.runtime import Runtime
from ferry.agent.view import StoreView
from ferry.model import codec
from ferry.model.cluster import ClusterConfig
from ferry.model.migration import MigrationOptions, MigrationPhase, MigrationRecord
from ferry.model.network import LinkState, NetworkLink, NetworkRole, NodeNetworks
from ferry.model.node import NetAddress, NodeInfo
from ferry.network.links import Wanted
from ferry.qemu.argv import Hardware
from ferry.store.keys import Keys
from ferry.store.memory import ManualClock, MemoryStore

KEYS = Keys("test")


def config(node: str, index: int) -> AgentConfig:
    return AgentConfig(
        node=node, cluster="test", endpoints=("http://x",), cluster_address=f"10.77.0.{index}",
        migration_networks=(NetAddress("migration", f"10.78.0.{index}"),
                            NetAddress("migration2", f"10.80.0.{index}")))


def context(store: MemoryStore, tmp_path: Path, node: str = "node1",
            index: int = 11) -> AgentContext:
    return AgentContext(
        config=config(node, index), store=store, keys=KEYS, view=StoreView(store, KEYS),
        runtime=Runtime(tmp_path / node, bridge="vmswitch", qemu_binary="qemu",
                        on_change=lambda: None),
        hardware=Hardware(accel="tcg", cpu_model="qemu64"))


class FakeLinks:
    """What `ip` would say: every wanted address up on its own interface, unless told."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.calls = 0

    async def __call__(self, wanted: Sequence[Wanted]) -> tuple[NetworkLink, ...]:
        self.calls += 1
        return tuple(NetworkLink(
            name=w.name, role=w.role, address=w.ip, interface=f"if-{w.name}",
            state=LinkState.DOWN if w.name in self.down else LinkState.UP)
            for w in wanted)


@pytest.fixture
def links(monkeypatch: pytest.MonkeyPatch) -> FakeLinks:
    fake = FakeLinks()
    monkeypatch.setattr(agent_networks, "read_links", fake)
    return fake


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(clock=ManualClock())


def test_the_cluster_network_first_then_the_migration_networks_in_order() -> None:
    assert configured(dataclasses.replace(config("node1", 11), cluster_network="backbone")) == (
        Wanted("backbone", NetworkRole.CLUSTER, "10.77.0.11"),
        Wanted("migration", NetworkRole.MIGRATION, "10.78.0.11"),
        Wanted("migration2", NetworkRole.MIGRATION, "10.80.0.11"))


async def test_links_are_published_on_the_lease_and_rewritten_only_on_change(
        store: MemoryStore, tmp_path: Path, links: FakeLinks) -> None:
    ctx = context(store, tmp_path)
    pub = NetworkPublisher(ctx)
    assert not await pub.publish_once()  # not registered yet: no lease to write on
    ctx.lease = await store.grant_lease(10)
    assert await pub.publish_once()
    await ctx.view.load()
    entry = await store.get(KEYS.node_networks("node1"))
    assert entry is not None and entry.lease == ctx.lease
    got = codec.decode(NodeNetworks, entry.value)
    assert [(n.name, n.state) for n in got.networks] == [
        ("cluster", LinkState.UP), ("migration", LinkState.UP), ("migration2", LinkState.UP)]

    assert not await pub.publish_once()  # nothing changed: no write
    assert store.revision == entry.mod_revision
    links.down.add("migration")
    assert await pub.publish_once()
    await ctx.view.load()
    got = codec.decode(NodeNetworks, ctx.view.entries[KEYS.node_networks("node1")].value)
    assert got.get("migration") is not None
    assert got.get("migration").state is LinkState.DOWN  # type: ignore[union-attr]


async def test_a_new_lease_or_a_vanished_key_is_written_again(
        store: MemoryStore, tmp_path: Path, links: FakeLinks) -> None:
    ctx = context(store, tmp_path)
    pub = NetworkPublisher(ctx)
    ctx.lease = await store.grant_lease(10)
    await pub.publish_once()
    await store.revoke_lease(ctx.lease)  # the node lost its lease; its keys went with it
    ctx.lease = await store.grant_lease(10)  # and registered again
    assert await pub.publish_once()
    entry = await store.get(KEYS.node_networks("node1"))
    assert entry is not None and entry.lease == ctx.lease
    await ctx.view.load()
    await store.delete(KEYS.node_networks("node1"))
    await ctx.view.load()
    assert await pub.publish_once()


# -- step 1 from the watch's copy


async def register(store: MemoryStore, tmp_path: Path, node: str, index: int,
                   links: FakeLinks, *, publish: bool = True) -> AgentContext:
    ctx = context(store, tmp_path, node, index)
    ctx.lease = await store.grant_lease(10)
    info = NodeInfo(name=node, cluster_address=ctx.config.cluster_address,
                    migration_addresses=ctx.config.migration_networks, bridge="vmswitch",
                    memory_mib=1024, cpus=1, accel="tcg", version="0", started_at=1.0)
    await store.put(KEYS.node_info(node), codec.encode(info))
    if publish:
        await NetworkPublisher(ctx).publish_once()
    return ctx


def record(options: MigrationOptions = MigrationOptions()) -> MigrationRecord:
    return MigrationRecord(id="m1", vm="vm1", source="node1", target="node2",
                           phase=MigrationPhase.QUEUED, created_at=1.0, options=options)


async def test_step_1_uses_the_published_links(store: MemoryStore, tmp_path: Path,
                                               links: FakeLinks) -> None:
    src = await register(store, tmp_path, "node1", 11, links)
    links.down.add("migration")
    await register(store, tmp_path, "node2", 12, links)
    await src.view.load()
    choice = choose_migration_network(src, record())
    assert (choice.network, choice.address) == ("migration2", "10.80.0.12")
    assert choice.skipped == ("migration: link down on node2",)


async def test_step_1_follows_the_cluster_priority_and_the_requested_network(
        store: MemoryStore, tmp_path: Path, links: FakeLinks) -> None:
    src = await register(store, tmp_path, "node1", 11, links)
    await register(store, tmp_path, "node2", 12, links)
    await store.put(KEYS.cluster_config, codec.encode(
        ClusterConfig(name="test", migration_networks=("migration2", "migration"))))
    await src.view.load()
    assert choose_migration_network(src, record()).network == "migration2"
    forced = choose_migration_network(src, record(MigrationOptions(network="migration")))
    assert (forced.network, forced.note) == ("migration", "as requested")


async def test_a_target_that_published_nothing_is_tried_on_its_registered_addresses(
        store: MemoryStore, tmp_path: Path, links: FakeLinks) -> None:
    src = await register(store, tmp_path, "node1", 11, links)
    await register(store, tmp_path, "node2", 12, links, publish=False)
    await src.view.load()
    choice = choose_migration_network(src, record())
    assert (choice.network, choice.address) == ("migration", "10.78.0.12")
    assert choice.note.endswith("link state unknown on node2")

"""This node's cluster networks: publishing its links, and choosing a migration's network.

``NetworkPublisher.run`` re-reads the links of the configured networks every few seconds
and writes ``nodes/<n>/networks`` on the node's lease only when something changed (so a
quiet cluster sees no writes, and a node that dies takes its links with it).
``choose_migration_network`` gathers the published state from the watch's copy and asks
the pure chooser (``ferry.network.choice``).
"""

from __future__ import annotations

import asyncio
import logging

from ferry.agent.config import AgentConfig
from ferry.agent.context import AgentContext
from ferry.model import codec
from ferry.model.cluster import ClusterConfig
from ferry.model.errors import FerryError, InvalidSpec
from ferry.model.migration import MigrationRecord
from ferry.model.network import (
    LinkState,
    NetworkChoice,
    NetworkLink,
    NetworkRole,
    NodeNetworks,
)
from ferry.network.choice import choose_network
from ferry.network.links import Wanted, read_links

log = logging.getLogger(__name__)

POLL_S = 2.0  # how stale a link state others see can be (a migration's step 1 reads it)


def configured(config: AgentConfig) -> tuple[Wanted, ...]:
    """The networks this node is configured on, the cluster network first, then the
    migration networks in their configured order (the default migration priority)."""
    return (Wanted(config.cluster_network, NetworkRole.CLUSTER, config.cluster_address),
            *(Wanted(n.network, NetworkRole.MIGRATION, n.address)
              for n in config.migration_networks))


def describe(link: NetworkLink) -> str:
    if link.state is LinkState.MISSING:
        return f"network {link.name}: no interface holds {link.address}"
    gw = f", default route via {link.gateway or link.interface}" if link.default_route else ""
    return (f"network {link.name}: {link.address} on {link.interface} ({link.subnet}),"
            f" link {link.state.value} (operstate {link.operstate},"
            f" carrier {'on' if link.carrier else 'off'}){gw}")


class NetworkPublisher:
    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.wanted = configured(ctx.config)
        self.written: tuple[int, str] | None = None  # (lease, value) last put
        self.links: tuple[NetworkLink, ...] = ()
        self.failing = False

    async def run(self) -> None:
        while True:
            try:
                await self.publish_once()
                if self.failing:
                    log.info("networks: publishing again")
                self.failing = False
            except FerryError as err:
                if not self.failing:  # once per outage, not every few seconds
                    log.warning("networks: cannot read or publish links: %s", err)
                self.failing = True
            await asyncio.sleep(POLL_S)

    async def publish_once(self) -> bool:
        """Read the links; write them if they, the lease, or the key changed. Whether it
        wrote."""
        ctx = self.ctx
        if not ctx.lease:
            return False
        links = await read_links(self.wanted)
        self._log_changes(links)
        value = codec.encode(NodeNetworks(node=ctx.node, networks=links))
        key = ctx.keys.node_networks(ctx.node)
        lease = ctx.lease
        # The key vanishes with an expired lease; the watch's copy tells us so.
        if self.written == (lease, value) and key in ctx.view.entries:
            return False
        await ctx.store.put(key, value, lease=lease)
        self.written = (lease, value)
        return True

    def _log_changes(self, links: tuple[NetworkLink, ...]) -> None:
        before = {link.name: link for link in self.links}
        for link in links:
            if before.get(link.name) != link:
                log.info("%s", describe(link))
        self.links = links


# -- step 1 of a migration


def published(ctx: AgentContext, node: str) -> NodeNetworks | None:
    entry = ctx.view.entries.get(ctx.keys.node_networks(node))
    if entry is None:
        return None
    try:
        return codec.decode(NodeNetworks, entry.value)
    except InvalidSpec as err:
        log.error("ignoring malformed networks of %s: %s", node, err)
        return None


def node_networks(ctx: AgentContext, node: str) -> NodeNetworks:
    """What ``node`` published, else its registered migration addresses, link unknown."""
    got = published(ctx, node)
    if got is not None:
        return got
    info = ctx.view.node_info(node)
    addresses = info.migration_addresses if info is not None else ()
    return NodeNetworks(node=node, networks=tuple(
        NetworkLink(name=a.network, role=NetworkRole.MIGRATION, address=a.address,
                    state=LinkState.UNKNOWN) for a in addresses))


def cluster_priority(ctx: AgentContext) -> tuple[str, ...]:
    entry = ctx.view.entries.get(ctx.keys.cluster_config)
    if entry is None:
        return ()
    try:
        return codec.decode(ClusterConfig, entry.value).migration_networks
    except InvalidSpec as err:
        log.error("ignoring the malformed cluster configuration: %s", err)
        return ()


def choose_migration_network(ctx: AgentContext, rec: MigrationRecord) -> NetworkChoice:
    everyone = [n for name in ctx.view.names(ctx.keys.nodes)
                if (n := published(ctx, name)) is not None]
    return choose_network(
        source=node_networks(ctx, rec.source), target=node_networks(ctx, rec.target),
        everyone=everyone, priority=cluster_priority(ctx),
        forced=rec.options.network, allow_gateway=rec.options.allow_gateway)

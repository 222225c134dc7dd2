"""ferry network list / priority."""

from __future__ import annotations

import asyncio

import click

from ferry.cli.connect import with_cluster
from ferry.cli.output import emit_json, table
from ferry.control import networks as nets
from ferry.model.network import NetworkMember, NetworkView


@click.group()
def network() -> None:
    """Cluster networks: every node's link on them, and the order migrations use them in."""


def _link(m: NetworkMember) -> str:
    text = m.state.value
    if not m.node_up:
        text += " (node down)"
    if m.default_route:
        text += f", default route via {m.gateway or m.interface or '?'}"
    return text


def _rows(v: NetworkView) -> list[list[object]]:
    head: list[object] = [v.name, v.role.value, ",".join(v.subnets) or None,
                          v.priority, "yes" if v.gateway else "no"]
    rows = []
    for m in v.members:
        rows.append(head + [m.node, m.address, m.interface or None, _link(m)])
        head = [""] * len(head)  # the network's columns once, on its first node's row
    return rows


def _order(result: nets.NetworkList) -> str:
    where = ("cluster setting" if result.cluster_priority else
             "each source node's configured order; set with `ferry network priority`")
    return f"migration order: {', '.join(result.priority) or '-'} ({where})"


@network.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def network_list(as_json: bool) -> None:
    """Networks: subnet, role, migration priority, default gateway, each node's link."""
    result = asyncio.run(with_cluster(nets.list_networks))
    if as_json:
        emit_json(result)
        return
    table(["NETWORK", "ROLE", "SUBNET", "PRIORITY", "GATEWAY", "NODE", "ADDRESS",
           "INTERFACE", "LINK"], [row for v in result.networks for row in _rows(v)])
    click.echo(_order(result))


@network.command("priority")
@click.argument("names", nargs=-1)
@click.option("--clear", is_flag=True, help="Use each source node's configured order again.")
def network_priority(names: tuple[str, ...], clear: bool) -> None:
    """Migrations try the networks NAMES in this order (networks not named are not used
    for migration). Without NAMES: show the order in effect."""
    if clear and names:
        raise click.UsageError("give network names or --clear, not both")
    if not clear and not names:
        click.echo(_order(asyncio.run(with_cluster(nets.list_networks))))
        return
    config = asyncio.run(with_cluster(
        lambda cl: nets.set_priority(cl, None if clear else names)))
    if config.migration_networks:
        click.echo(f"migration order: {', '.join(config.migration_networks)}")
    else:
        click.echo("migration order: each source node's configured order")

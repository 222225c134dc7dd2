"""ferry vm ha / vm set / node pause|resume / events."""

from __future__ import annotations

import asyncio

import click

from ferry.cli.connect import with_cluster
from ferry.cli.output import clock, emit_json, table
from ferry.cli.vm import json_opt, node, split_nodes, vm
from ferry.control import ha as ha_ctl
from ferry.control import nodes as nodes_ctl
from ferry.control.client import ClusterClient
from ferry.model.ha import Event, HaPriority, StartAction


@vm.group("ha")
def vm_ha() -> None:
    """High availability: restart a VM on another node when its node dies."""


@vm_ha.command("add")
@click.argument("name")
@click.option("--priority", type=click.Choice([p.value for p in HaPriority]), default="medium",
              show_default=True, help="Recovered first when not every VM fits: high.")
@click.option("--preferred-nodes", default="", help="Nodes to prefer, e.g. node2,node3.")
def ha_add(name: str, priority: str, preferred_nodes: str) -> None:
    """Make NAME highly available (or change its priority and preferred nodes)."""
    nodes = split_nodes(preferred_nodes)
    spec = asyncio.run(with_cluster(lambda cl: ha_ctl.set_ha(
        cl, name, priority=HaPriority(priority), preferred_nodes=nodes)))
    prefers = f", preferring {', '.join(nodes)}" if nodes else ""
    click.echo(f"{spec.name} is highly available ({priority} priority{prefers});"
               " start action: none")


@vm_ha.command("remove")
@click.argument("name")
def ha_remove(name: str) -> None:
    """NAME is no longer restarted elsewhere when its node dies."""
    asyncio.run(with_cluster(lambda cl: ha_ctl.remove_ha(cl, name)))
    click.echo(f"{name} is no longer highly available; start action: start")


@vm.command("set")
@click.argument("name")
@click.option("--start-action", type=click.Choice([a.value for a in StartAction]),
              required=True, help="What the node does with the VM when its agent starts.")
def vm_set(name: str, start_action: str) -> None:
    """Change a VM's settings."""
    spec = asyncio.run(with_cluster(lambda cl: ha_ctl.set_start_action(
        cl, name, StartAction(start_action))))
    click.echo(f"{spec.name}: start action {spec.start_action.value}")


@node.command("pause")
@click.argument("name")
def node_pause(name: str) -> None:
    """The cluster places no VM on NAME (new starts, HA recovery); its VMs keep running."""
    asyncio.run(with_cluster(lambda cl: nodes_ctl.pause_node(cl, name)))
    click.echo(f"{name} is paused")


@node.command("resume")
@click.argument("name")
def node_resume(name: str) -> None:
    """Undo pause."""
    asyncio.run(with_cluster(lambda cl: nodes_ctl.resume_node(cl, name)))
    click.echo(f"{name} is resumed")


def _row(ev: Event) -> list[object]:
    return [clock(ev.at), ev.kind.value, ev.node or None, ev.vm or None, ev.by, ev.message]


@click.command("events")
@click.option("--vm", "vm_name", default=None, help="Only events about this VM.")
@click.option("--node", "node_name", default=None, help="Only events about this node.")
@click.option("--limit", default=50, show_default=True, type=int)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@json_opt
def events(vm_name: str | None, node_name: str | None, limit: int, follow: bool,
           as_json: bool) -> None:
    """The cluster's decisions: nodes down and fenced, VMs recovered (and why)."""
    async def go(cl: ClusterClient) -> None:
        evs, rev = await ha_ctl.list_events(cl, limit=limit, vm=vm_name, node=node_name)
        if as_json and not follow:
            emit_json(evs)
            return
        table(["TIME", "EVENT", "NODE", "VM", "BY", "MESSAGE"], [_row(e) for e in evs])
        if follow:
            async for ev in ha_ctl.follow_events(cl, after=rev, vm=vm_name, node=node_name):
                click.echo("  ".join(str(x) for x in _row(ev) if x is not None))

    asyncio.run(with_cluster(go))

"""ferry lab: a real multi-node cluster on this machine."""

from __future__ import annotations

import asyncio
import os
import sys

import click

from ferry.cli.output import emit_json, table
from ferry.lab import faults, netsetup
from ferry.lab import lab as labmod
from ferry.lab.guest import build_guest_image
from ferry.model.errors import LabError


def _say(msg: str) -> None:
    click.echo(f"  {msg}")


def _state() -> labmod.LabState:
    state = labmod.load_state()
    if state is None:
        raise LabError(f"no lab {labmod.lab_name()!r} is up: run `ferry lab up`")
    return state


@click.group()
def lab() -> None:
    """A real cluster on this machine: node namespaces, etcd, agents, a client."""


@lab.command("up")
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 9))
def lab_up(nodes: int) -> None:
    """Build the lab (idempotent): namespaces, bridges, etcd, one agent per node."""
    click.echo(f"bringing up lab {labmod.lab_name()!r} with {nodes} nodes")
    state = labmod.up(labmod.current_layout(nodes=nodes), say=_say)
    click.echo(f"lab is up: etcd at {','.join(state.endpoints)},"
               f" nodes {', '.join(state.layout.node_names())}")


@lab.command("down")
def lab_down() -> None:
    """Remove every namespace, link, process and file the lab created."""
    labmod.down(labmod.lab_name(), say=_say)
    click.echo("lab is down")


@lab.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def lab_status(as_json: bool) -> None:
    """Processes, namespaces and drilled faults of the lab."""
    state = _state()
    members, nodes = labmod.health(state)
    if as_json:
        emit_json({"lab": state, "etcd_running": all(m.running for m in members),
                   "etcd": members, "nodes": nodes})
        return
    click.echo(f"lab {state.name}, cluster {state.cluster}")
    table(["ETCD", "URL", "PID", "STATE", "LEADER"],
          [[m.member, m.url, m.pid or None, "running" if m.running else "NOT RUNNING",
            None if m.leader is None else "yes" if m.leader else "no"] for m in members])
    click.echo()
    table(["NODE", "NAMESPACE", "POWER", "CLUSTER NET", "AGENT PID", "AGENT", "QEMUS"],
          [[n.node, state.layout.node_ns(n.node) if n.namespace else "MISSING",
            "off" if n.powered_off else "on", "ISOLATED" if n.isolated else "up",
            n.agent_pid, _agent_state(n), n.qemus] for n in nodes])


def _agent_state(n: labmod.NodeHealth) -> str:
    if n.agent_frozen:
        return "FROZEN"
    if n.agent_running:
        return "running"
    return "off" if n.powered_off else "NOT RUNNING"


@lab.command("fault")
@click.argument("target")
@click.argument("action")
def lab_fault(target: str, action: str) -> None:
    """Drill a failure. TARGET is a node (node1, ...) or etcd.

    \b
    NODE power-off      kill -9 every process on the node (agent, QEMUs, ...)
    NODE power-on       start the node's agent again
    NODE isolate        cut its cluster-network link (etcd, other nodes); storage stays
    NODE heal           restore that link
    NODE freeze-agent   SIGSTOP its agent;  thaw-agent: SIGCONT
    etcd kill-leader    kill -9 the etcd member that leads
    etcd start          start the members that are not running (they rejoin)

    `ferry lab up` undoes them all.
    """
    click.echo(faults.apply(_state(), target, action))


@lab.command("net")
@click.argument("node")
@click.argument("network")
@click.argument("action", type=click.Choice(netsetup.NET_ACTIONS))
def lab_net(node: str, network: str, action: str) -> None:
    """Change NODE's link to NETWORK (cluster, migration, migration2).

    \b
    down / up             the node sets its interface down or up
    cut / plug            its cable: the node sees no carrier
    gateway / no-gateway  the node's default route goes through NETWORK, or is removed

    `ferry network list` shows the effect within seconds.
    """
    click.echo(netsetup.net_action(_state().layout, node, network, action))


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("where")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def lab_exec(where: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside a node's namespace (or the client's): ferry lab exec node1 -- ip a"""
    argv = labmod.exec_argv(_state(), where, list(command))
    sys.stdout.flush()
    os.execvp(argv[0], argv)


@lab.command("image")
def lab_image() -> None:
    """Build (or find in the cache) the lab guest image."""
    image = build_guest_image(progress=_say)
    click.echo(f"guest image: {image.kernel} {image.initrd}")


@lab.command("demo")
@click.option("--vm", "vm_name", default="demo", show_default=True)
@click.option("--memory", default="256M", show_default=True)
def lab_demo(vm_name: str, memory: str) -> None:
    """The tour: lab up, a VM on shared storage, a client connected to it, and live
    migration node1 -> node2 -> node3 -> node1 with the client's view of each."""
    from ferry.cli.demo import run_demo

    asyncio.run(run_demo(vm_name=vm_name, memory=memory))

"""ferry lab: a real multi-node cluster on this machine."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import replace

import click

from ferry.cli.output import emit_json, table
from ferry.lab import lab as labmod
from ferry.lab.guest import build_guest_image
from ferry.lab.layout import LabLayout
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
    old = labmod.load_state()
    layout = LabLayout(name=labmod.lab_name(), nodes=nodes)
    if old is not None:  # keep its addresses; it may have been built with other ones
        layout = replace(old.layout, nodes=max(nodes, old.nodes))
    state = labmod.up(layout, say=_say)
    click.echo(f"lab is up: etcd at {state.endpoint}, nodes {', '.join(state.layout.node_names())}")


@lab.command("down")
def lab_down() -> None:
    """Remove every namespace, link, process and file the lab created."""
    labmod.down(labmod.lab_name(), say=_say)
    click.echo("lab is down")


@lab.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def lab_status(as_json: bool) -> None:
    """Processes and namespaces of the lab."""
    state = _state()
    etcd_ok, nodes = labmod.health(state)
    if as_json:
        emit_json({"lab": state, "etcd_running": etcd_ok, "nodes": nodes})
        return
    click.echo(f"lab {state.name}: etcd {state.endpoint} "
               f"{'running' if etcd_ok else 'NOT RUNNING'} (pid {state.etcd_pid})")
    table(["NODE", "NAMESPACE", "AGENT PID", "AGENT", "QEMUS"],
          [[n.node, state.layout.node_ns(n.node) if n.namespace else "MISSING", n.agent_pid,
            "running" if n.agent_running else "NOT RUNNING", n.qemus] for n in nodes])


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

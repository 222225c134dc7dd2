"""Drill failures in a lab: a node's power, its cluster-network cable, its agent; etcd's leader.

Each fault does what its real counterpart does to the processes and links, no more: a
powered-off node keeps its namespace (the machine) but loses every process, its taps and its
run directory (on a real host: tmpfs). Each one checks first and raises LabError without
changing anything when it cannot apply. The functions are synchronous (they use
``asyncio.run`` for etcd): call them from async code through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

from ferry.lab import lab as labmod
from ferry.lab import netsetup, procs
from ferry.lab.layout import BRIDGE, LabLayout
from ferry.model.errors import LabError
from ferry.store.base import StoreStatus

NODE_ACTIONS = ("power-off", "power-on", "isolate", "heal", "freeze-agent", "thaw-agent")
ETCD_ACTIONS = ("kill-leader", "start")


# -- pure helpers


def check(layout: LabLayout, target: str, action: str) -> None:
    """LabError unless ``target action`` names a fault this lab has."""
    if target == "etcd":
        if action not in ETCD_ACTIONS:
            raise LabError(f"no etcd fault {action!r}: use one of {', '.join(ETCD_ACTIONS)}")
        return
    if target not in layout.node_names():
        raise LabError(f"no fault target {target!r}: use etcd or one of"
                       f" {', '.join(layout.node_names())}")
    if action not in NODE_ACTIONS:
        raise LabError(f"no node fault {action!r}: use one of {', '.join(NODE_ACTIONS)}")


def volatile_links(names: Sequence[str], layout: LabLayout) -> list[str]:
    """Links of a node that a power-off takes away: all but its wiring (the veths to the lab's
    networks) and the switch its boot-time network configuration creates."""
    wired = {"lo", BRIDGE, *(net.node_if for net in layout.networks)}
    return [n for n in names if n not in wired]


def leader_index(statuses: Sequence[StoreStatus | None]) -> int | None:
    """The member (index into ``statuses``) that the answering members name as leader.

    A member cut off from the others may still believe in an old leader: the majority's
    view wins. None if nobody names a leader, or the named one did not answer.
    """
    votes = Counter(s.leader for s in statuses if s is not None and s.leader)
    if not votes:
        return None
    leader = votes.most_common(1)[0][0]
    return next((i for i, s in enumerate(statuses) if s is not None and s.member == leader),
                None)


# -- nodes


def _fresh(state: labmod.LabState) -> labmod.LabState:
    """The state on disk: another command may have changed it since ``state`` was read."""
    return labmod.load_state(state.name) or state


def _node_ns(state: labmod.LabState, node: str) -> str:
    ns = state.layout.node_ns(node)  # LabError for an unknown node
    if ns not in netsetup.namespaces():
        raise LabError(f"{node} has no namespace {ns}: run `ferry lab up`")
    return ns


def power_off(state: labmod.LabState, node: str) -> list[int]:
    """kill -9 every process in the node's namespace; returns their PIDs."""
    state = _fresh(state)
    ns = _node_ns(state, node)
    if node in state.powered_off:
        raise LabError(f"{node} is already powered off")
    killed = labmod.kill_namespace(ns)
    layout = state.layout
    for link in volatile_links(netsetup.link_names(ns), layout):
        netsetup.ip("link", "delete", "dev", link, ns=ns, check=False)
    shutil.rmtree(layout.run_dir(node), ignore_errors=True)
    labmod.save_state(replace(state, powered_off=(*state.powered_off, node)))
    return killed


def power_on(state: labmod.LabState, node: str) -> int:
    """Start the node's agent again (as its boot would); returns its PID."""
    state = _fresh(state)
    _node_ns(state, node)
    pid = state.agent_pids.get(node)
    if procs.is_running(pid, labmod.agent_marker(state.layout, node)):
        raise LabError(f"{node} is on: its agent runs (pid {pid})")
    pid = labmod.start_agent(state, node)
    labmod.save_state(replace(state, agent_pids={**state.agent_pids, node: pid},
                              powered_off=tuple(n for n in state.powered_off if n != node)))
    return pid


def _cluster_link(state: labmod.LabState, node: str) -> tuple[str, bool]:
    layout = state.layout
    peer = layout.root_peer(layout.node_index(node), layout.cluster)
    up = netsetup.link_is_up(peer)
    if up is None:
        raise LabError(f"{node} has no cluster link {peer}: run `ferry lab up`")
    return peer, up


def isolate(state: labmod.LabState, node: str) -> str:
    """Pull the node's cluster-network cable: the host's end of its veth goes down, so etcd
    and the other nodes' cluster addresses are out of reach (the shared volume, a host
    directory, is not). Returns the link's name."""
    peer, up = _cluster_link(state, node)
    if not up:
        raise LabError(f"{node} is already isolated ({peer} is down)")
    netsetup.set_link(state.layout, node, "cluster", up=False)
    return peer


def heal(state: labmod.LabState, node: str) -> str:
    """Plug the cable back in. The node's own end kept its address and routes."""
    peer, up = _cluster_link(state, node)
    if up:
        raise LabError(f"{node} is not isolated ({peer} is up)")
    netsetup.set_link(state.layout, node, "cluster", up=True)
    return peer


def _signal_agent(state: labmod.LabState, node: str, *, freeze: bool) -> int:
    state = _fresh(state)
    state.layout.node_index(node)
    if node in state.powered_off:
        raise LabError(f"{node} is powered off")
    pid, marker = state.agent_pids.get(node), labmod.agent_marker(state.layout, node)
    if pid is None or not procs.is_running(pid, marker):
        raise LabError(f"{node}'s agent is not running")
    if procs.is_stopped(pid, marker) == freeze:
        raise LabError(f"{node}'s agent (pid {pid}) is {'already' if freeze else 'not'} frozen")
    procs.kill(pid, marker, sig=signal.SIGSTOP if freeze else signal.SIGCONT)
    _until(lambda: procs.is_stopped(pid, marker) == freeze,
           f"{node}'s agent (pid {pid}) to {'stop' if freeze else 'continue'}")
    return pid


def freeze_agent(state: labmod.LabState, node: str) -> int:
    """SIGSTOP the node's agent (a hung daemon: its lease runs out, its QEMUs run on)."""
    return _signal_agent(state, node, freeze=True)


def thaw_agent(state: labmod.LabState, node: str) -> int:
    return _signal_agent(state, node, freeze=False)


def _until(done: Callable[[], bool], what: str, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise LabError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- etcd


def kill_etcd_leader(state: labmod.LabState) -> int:
    """kill -9 the member that currently leads; returns its index (see layout.etcd_members)."""
    state = _fresh(state)
    index = asyncio.run(_current_leader(state))
    if index is None:
        raise LabError("etcd has no leader (is a majority of its members running?)")
    member = state.layout.etcd_members[index]
    if not procs.kill(state.etcd_member_pid(index), member.marker):
        raise LabError(f"the etcd leader {member.name} is not a process this lab started")
    return index


async def _current_leader(state: labmod.LabState, *, timeout: float = 5.0) -> int | None:
    """The leader's index; right after a leader died the others take an election timeout
    or two (1 s each) to agree on the next one, so ask again for a while."""
    deadline = time.monotonic() + timeout
    while (index := leader_index(await labmod.etcd_statuses(state))) is None:
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.1)
    return index


def start_etcd(state: labmod.LabState) -> list[int]:
    """Start every member that is not running (each rejoins with its data dir), then wait
    until all have a leader; returns the indexes started."""
    state = _fresh(state)
    stopped = [m for m in state.layout.etcd_members
               if not procs.is_running(state.etcd_member_pid(m.index), m.marker)]
    if not stopped:
        raise LabError("every etcd member is running")
    for member in stopped:
        state = labmod.start_etcd_member(state, member)
    labmod.save_state(state)
    asyncio.run(labmod.wait_etcd_leader(state))
    return [m.index for m in stopped]


# -- one entry point for the command line


def apply(state: labmod.LabState, target: str, action: str) -> str:
    """Do ``action`` to ``target`` (etcd or a node); returns one line saying what was done."""
    check(state.layout, target, action)
    if target == "etcd":
        return _apply_etcd(state, action)
    node = target
    if action == "power-off":
        killed = power_off(state, node)
        return (f"{node}: powered off (killed {len(killed)} processes:"
                f" {' '.join(map(str, killed)) or 'none'})")
    if action == "power-on":
        return f"{node}: powered on (agent pid {power_on(state, node)})"
    if action == "isolate":
        return f"{node}: isolated from the cluster network ({isolate(state, node)} down)"
    if action == "heal":
        return f"{node}: back on the cluster network ({heal(state, node)} up)"
    if action == "freeze-agent":
        return f"{node}: agent pid {freeze_agent(state, node)} frozen (SIGSTOP)"
    return f"{node}: agent pid {thaw_agent(state, node)} thawed (SIGCONT)"


def _apply_etcd(state: labmod.LabState, action: str) -> str:
    members = state.layout.etcd_members
    if action == "kill-leader":
        m = members[kill_etcd_leader(state)]
        pid = _fresh(state).etcd_member_pid(m.index)  # the state keeps a killed member's pid
        return f"etcd: killed the leader {m.name} (pid {pid}, {m.client_url})"
    started = start_etcd(state)
    fresh = _fresh(state)
    return "etcd: started " + ", ".join(
        f"{members[i].name} (pid {fresh.etcd_member_pid(i)})" for i in started)

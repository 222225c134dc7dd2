"""Bring a lab up (idempotently), look at it, and take it down without leftovers."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ferry.lab import netsetup, procs
from ferry.lab.guest import BOOT_PARAMS, build_guest_image
from ferry.lab.layout import LAB_ROOT, EtcdMember, LabLayout
from ferry.model import codec
from ferry.model.cluster import BootImage, ClusterConfig, VmNetwork, Volume
from ferry.model.errors import FerryError, LabError
from ferry.store.base import StoreStatus
from ferry.store.etcd import EtcdStore
from ferry.store.keys import Keys

Say = Callable[[str], None]
DEFAULT_LAB = "ferry"


@dataclass(frozen=True)
class LabState:
    name: str
    nodes: int
    tag: str
    octet: int
    cluster: str
    etcd_pids: tuple[int, ...] = ()  # by member index; 0 for one never started
    agent_pids: dict[str, int] = field(default_factory=dict)
    powered_off: tuple[str, ...] = ()  # nodes `ferry lab fault NODE power-off` turned off
    prober_pids: tuple[int, ...] = ()
    kernel: str = ""
    initrd: str = ""
    created_at: float = 0.0

    @property
    def layout(self) -> LabLayout:
        return LabLayout(name=self.name, nodes=self.nodes, tag=self.tag, octet=self.octet)

    @property
    def endpoints(self) -> list[str]:
        return self.layout.etcd_urls

    def etcd_member_pid(self, index: int) -> int:
        return self.etcd_pids[index] if index < len(self.etcd_pids) else 0


def lab_name() -> str:
    return os.environ.get("FERRY_LAB", DEFAULT_LAB)


def current_layout(*, nodes: int = 3) -> LabLayout:
    """The layout of the lab named by $FERRY_LAB: as built if it exists (it keeps its
    addresses), else the one its name gets."""
    old = load_state()
    if old is not None:
        return replace(old.layout, nodes=max(nodes, old.nodes))
    return LabLayout.for_name(lab_name(), nodes=nodes)


def load_state(name: str | None = None) -> LabState | None:
    path = LAB_ROOT / (name or lab_name()) / "lab.json"
    try:
        return codec.decode(LabState, path.read_text())
    except OSError:
        return None


def save_state(state: LabState) -> None:
    path = state.layout.state_path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(codec.encode(state))
    tmp.replace(path)


def agent_marker(layout: LabLayout, node: str) -> str:
    return str(layout.config_path(node))


def up(layout: LabLayout, *, say: Say) -> LabState:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (namespaces, bridges, taps)")
    old = load_state(layout.name)
    if old is not None and (old.tag, old.octet) != (layout.tag, layout.octet):
        raise LabError(f"lab {layout.name} exists with other addresses; `ferry lab down` first")
    state = old or LabState(name=layout.name, nodes=layout.nodes, tag=layout.tag,
                            octet=layout.octet, cluster=layout.name, created_at=time.time())
    if state.nodes != layout.nodes:
        state = replace(state, nodes=max(state.nodes, layout.nodes))
    layout = state.layout
    image = build_guest_image(progress=lambda m: say(f"guest image: {m}"))
    state = replace(state, kernel=str(image.kernel), initrd=str(image.initrd))
    for d in (layout.dir, layout.volume_dir, layout.shm_dir):
        d.mkdir(parents=True, exist_ok=True)
    save_state(state)  # from here on `lab down` knows the addresses and tag to remove
    say(f"network: {layout.nodes} node namespaces, client namespace, bridges")
    netsetup.build(layout)
    state = _ensure_etcd(state, say=say)
    asyncio.run(_configure_cluster(state))
    state = _ensure_agents(state, say=say)
    save_state(state)
    asyncio.run(_wait_nodes_up(state, say=say))
    return state


def _ensure_etcd(state: LabState, *, say: Say) -> LabState:
    """Start every member that is not running, then wait until the cluster has a leader."""
    started = []
    for member in state.layout.etcd_members:
        if not procs.is_running(state.etcd_member_pid(member.index), member.marker):
            state = start_etcd_member(state, member)
            save_state(state)  # so that `lab down` stops it even if the wait below fails
            started.append(member)
            say(f"etcd: {member.name} started (pid {state.etcd_member_pid(member.index)})"
                f" at {member.client_url}")
    if started:
        asyncio.run(wait_etcd_leader(state))
    return state


def start_etcd_member(state: LabState, member: EtcdMember) -> LabState:
    """Start one member (it rejoins with its data dir if it has one); returns the new state."""
    layout = state.layout
    pid = procs.start_detached(layout.etcd_argv(member), log=layout.log_path(member.name))
    pids = [state.etcd_member_pid(m.index) for m in layout.etcd_members]
    pids[member.index] = pid
    return replace(state, etcd_pids=tuple(pids))


async def etcd_statuses(state: LabState) -> list[StoreStatus | None]:
    """Each member's own view (by member index); None for one that does not answer."""
    async def one(url: str) -> StoreStatus | None:
        store = EtcdStore([url], timeout=1.0)
        try:
            return await store.status()
        except FerryError:
            return None
        finally:
            await store.close()

    return list(await asyncio.gather(*(one(u) for u in state.endpoints)))


async def wait_etcd_leader(state: LabState, *, timeout: float = 20.0) -> None:
    """Until every running member answers and knows a leader (a member that just started
    has none until it has joined)."""
    layout = state.layout
    deadline = time.monotonic() + timeout
    while True:
        running = [m for m in layout.etcd_members
                   if procs.is_running(state.etcd_member_pid(m.index), m.marker)]
        started = {m.index for m in layout.etcd_members if state.etcd_member_pid(m.index)}
        dead = [m for m in layout.etcd_members if m.index in started and m not in running]
        if dead:
            raise LabError(f"etcd {dead[0].name} exited; see {layout.log_path(dead[0].name)}")
        statuses = await etcd_statuses(state)
        if running and all((s := statuses[m.index]) is not None and s.leader
                           for m in running):
            return
        if time.monotonic() > deadline:
            raise LabError(f"etcd has no leader after {timeout:.0f}s; see"
                           f" {layout.dir / 'logs'}")
        await asyncio.sleep(0.1)


async def _configure_cluster(state: LabState) -> None:
    layout = state.layout
    keys = Keys(state.cluster)
    config = ClusterConfig(
        name=state.cluster, default_volume="shared0",
        boot_image=BootImage(kernel=state.kernel, initrd=state.initrd,
                             cmdline=" ".join(BOOT_PARAMS)),
        vm_network=VmNetwork(subnet=layout.lan.subnet, first_host=10),
    )
    store = EtcdStore(state.endpoints)
    try:
        await store.put(keys.cluster_config, codec.encode(config))
        await store.put(keys.volume("shared0"),
                        codec.encode(Volume(name="shared0", path=str(layout.volume_dir))))
    finally:
        await store.close()


def _ensure_agents(state: LabState, *, say: Say) -> LabState:
    """Every node on, with a running agent: this also powers on nodes a fault powered off
    and continues frozen agents."""
    layout = state.layout
    pids = dict(state.agent_pids)
    for node in layout.node_names():
        marker = agent_marker(layout, node)
        if procs.is_stopped(pids.get(node), marker):
            procs.kill(pids[node], marker, sig=signal.SIGCONT)
            say(f"{node}: agent continued (pid {pids[node]})")
        if procs.is_running(pids.get(node), marker):
            continue
        pids[node] = start_agent(state, node)
        say(f"{node}: agent started (pid {pids[node]})")
    return replace(state, agent_pids=pids, powered_off=())


def start_agent(state: LabState, node: str) -> int:
    """Start a node's agent as an operator would: `ferry agent --config FILE` on the node."""
    layout = state.layout
    path = layout.config_path(node)
    path.write_text(layout.agent_config(node, cluster=state.cluster))
    layout.run_dir(node).mkdir(parents=True, exist_ok=True)
    argv = ["ip", "netns", "exec", layout.node_ns(node),
            sys.executable, "-m", "ferry", "agent", "--config", str(path)]
    return procs.start_detached(argv, log=layout.log_path(node))


async def _wait_nodes_up(state: LabState, *, say: Say, timeout: float = 30) -> None:
    keys = Keys(state.cluster)
    store = EtcdStore(state.endpoints)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            missing = [n for n in state.layout.node_names()
                       if await store.get(keys.node_alive(n)) is None]
            if not missing:
                say(f"cluster {state.cluster}: {state.nodes} nodes up")
                return
            await asyncio.sleep(0.2)
        raise LabError(f"nodes did not come up: {', '.join(missing)} (see"
                       f" {state.layout.dir / 'logs'})")
    finally:
        await store.close()


def down(name: str, *, say: Say) -> None:
    state = load_state(name)
    layout = state.layout if state else LabLayout(name=name)
    if state is not None:
        for pid in state.prober_pids:
            procs.stop(pid, "ferry.lab.prober")
        for node, pid in state.agent_pids.items():
            if procs.stop(pid, agent_marker(layout, node)):
                say(f"{node}: agent stopped")
    for node_dir in sorted((layout.dir / "run").glob("node*")):
        for pid in procs.qemu_pids(node_dir):
            procs.kill(pid, str(node_dir))
            say(f"{node_dir.name}: QEMU pid {pid} killed")
    # Whatever else runs in the lab's namespaces (`lab exec` commands, a test's helpers)
    # would otherwise outlive them.
    for ns in netsetup.lab_namespaces(layout):
        for pid in kill_namespace(ns):
            say(f"{ns}: pid {pid} killed")
    for member in layout.etcd_members:
        if state is not None and procs.stop(state.etcd_member_pid(member.index), member.marker):
            say(f"etcd: {member.name} stopped")
    for what in netsetup.teardown(layout):
        say(f"removed {what}")
    for d in (layout.dir, layout.shm_dir):
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
            say(f"removed {d}")


def kill_namespace(ns: str, *, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process in namespace ``ns`` until none is left (a dying agent may just
    have forked a QEMU); returns the PIDs killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while pids := netsetup.namespace_pids(ns):
        killed += [p for p in procs.kill_all(pids) if p not in killed]
        if time.monotonic() > deadline:
            raise LabError(f"processes in {ns} survive SIGKILL: {pids}")
        time.sleep(0.02)
    return killed


@dataclass(frozen=True)
class EtcdHealth:
    member: str
    url: str
    pid: int
    running: bool
    leader: bool | None  # None: it did not answer


@dataclass(frozen=True)
class NodeHealth:
    node: str
    namespace: bool
    powered_off: bool
    isolated: bool  # its cluster-network link is down
    agent_pid: int | None
    agent_running: bool
    agent_frozen: bool
    qemus: int


def health(state: LabState) -> tuple[list[EtcdHealth], list[NodeHealth]]:
    """What runs and what is broken, for `lab status` (synchronous: asks etcd via asyncio.run,
    so call it from async code through asyncio.to_thread)."""
    layout = state.layout
    statuses = asyncio.run(etcd_statuses(state))
    members = [
        EtcdHealth(member=m.name, url=m.client_url, pid=state.etcd_member_pid(m.index),
                   running=procs.is_running(state.etcd_member_pid(m.index), m.marker),
                   leader=None if (st := statuses[m.index]) is None else st.leader == st.member)
        for m in layout.etcd_members
    ]
    present = netsetup.namespaces()
    nodes = [
        NodeHealth(node=n, namespace=layout.node_ns(n) in present,
                   powered_off=n in state.powered_off,
                   isolated=netsetup.link_is_up(
                       layout.root_peer(layout.node_index(n), layout.cluster)) is False,
                   agent_pid=state.agent_pids.get(n),
                   agent_running=procs.is_running(state.agent_pids.get(n),
                                                  agent_marker(layout, n)),
                   agent_frozen=procs.is_stopped(state.agent_pids.get(n),
                                                 agent_marker(layout, n)),
                   qemus=len(procs.qemu_pids(layout.run_dir(n))))
        for n in layout.node_names()
    ]
    return members, nodes


def exec_argv(state: LabState, where: str, command: list[str]) -> list[str]:
    layout = state.layout
    ns = layout.client_ns if where == "client" else layout.node_ns(
        where if where in layout.node_names() else _bad_node(layout, where))
    return ["ip", "netns", "exec", ns, *command]


def _bad_node(layout: LabLayout, where: str) -> str:
    raise LabError(f"no lab node {where!r}: use client or one of {', '.join(layout.node_names())}")


def default_root() -> Path:
    return LAB_ROOT


def start_prober(state: LabState, target: str, *, interval_ms: float = 5.0,
                 tag: str = "prober") -> tuple[int, Path]:
    """Start a prober in the client namespace against ``target``; returns (pid, its log)."""
    log = state.layout.dir / "probes" / f"{tag}-{target}-{int(time.time() * 1000)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.touch()
    argv = ["ip", "netns", "exec", state.layout.client_ns, sys.executable, "-m",
            "ferry.lab.prober", "--target", target, "--interval-ms", str(interval_ms),
            "--out", str(log)]
    pid = procs.start_detached(argv, log=state.layout.log_path(f"prober-{target}"))
    fresh = load_state(state.name) or state
    save_state(replace(fresh, prober_pids=fresh.prober_pids + (pid,)))
    return pid, log


def stop_prober(state: LabState, pid: int) -> None:
    procs.stop(pid, "ferry.lab.prober")
    fresh = load_state(state.name) or state
    save_state(replace(fresh, prober_pids=tuple(p for p in fresh.prober_pids if p != pid)))

"""Bring a lab up (idempotently), look at it, and take it down without leftovers."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ferry.lab import netsetup, procs
from ferry.lab.guest import BOOT_PARAMS, build_guest_image
from ferry.lab.layout import LAB_ROOT, LabLayout
from ferry.model import codec
from ferry.model.cluster import BootImage, ClusterConfig, VmNetwork, Volume
from ferry.model.errors import FerryError, LabError
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
    etcd_pid: int = 0
    agent_pids: dict[str, int] = field(default_factory=dict)
    prober_pids: tuple[int, ...] = ()
    kernel: str = ""
    initrd: str = ""
    created_at: float = 0.0

    @property
    def layout(self) -> LabLayout:
        return LabLayout(name=self.name, nodes=self.nodes, tag=self.tag, octet=self.octet)

    @property
    def endpoint(self) -> str:
        return self.layout.etcd_url


def lab_name() -> str:
    return os.environ.get("FERRY_LAB", DEFAULT_LAB)


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


def _etcd_marker(layout: LabLayout) -> str:
    return str(layout.shm_dir / "etcd")


def _agent_marker(layout: LabLayout, node: str) -> str:
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
    say(f"network: {layout.nodes} node namespaces, client namespace, bridges")
    netsetup.build(layout)
    for d in (layout.dir, layout.volume_dir, layout.shm_dir):
        d.mkdir(parents=True, exist_ok=True)
    state = _ensure_etcd(state, say=say)
    save_state(state)
    asyncio.run(_configure_cluster(state))
    state = _ensure_agents(state, say=say)
    save_state(state)
    asyncio.run(_wait_nodes_up(state, say=say))
    return state


def _ensure_etcd(state: LabState, *, say: Say) -> LabState:
    layout = state.layout
    if procs.is_running(state.etcd_pid, _etcd_marker(layout)):
        return state
    h = layout.host_address
    argv = [
        "etcd", "--name", layout.name, "--data-dir", _etcd_marker(layout),
        "--listen-client-urls", f"http://{h}:2379", "--advertise-client-urls", f"http://{h}:2379",
        "--listen-peer-urls", f"http://{h}:2380",
        "--initial-advertise-peer-urls", f"http://{h}:2380",
        "--initial-cluster", f"{layout.name}=http://{h}:2380",
        "--initial-cluster-token", layout.name,
        "--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000",
    ]
    pid = procs.start_detached(argv, log=layout.log_path("etcd"))
    say(f"etcd: started (pid {pid}) at {layout.etcd_url}")
    asyncio.run(_wait_etcd(layout.etcd_url, pid, layout))
    return replace(state, etcd_pid=pid)


async def _wait_etcd(url: str, pid: int, layout: LabLayout) -> None:
    store = EtcdStore([url], timeout=1.0)
    try:
        for _ in range(100):
            try:
                await store.status()
                return
            except FerryError:
                if not procs.is_running(pid, _etcd_marker(layout)):
                    raise LabError(f"etcd exited; see {layout.log_path('etcd')}") from None
                await asyncio.sleep(0.1)
        raise LabError(f"etcd did not answer at {url} within 10s")
    finally:
        await store.close()


async def _configure_cluster(state: LabState) -> None:
    layout = state.layout
    keys = Keys(state.cluster)
    config = ClusterConfig(
        name=state.cluster, default_volume="shared0",
        boot_image=BootImage(kernel=state.kernel, initrd=state.initrd,
                             cmdline=" ".join(BOOT_PARAMS)),
        vm_network=VmNetwork(subnet=layout.lan.subnet, first_host=10),
    )
    store = EtcdStore([state.endpoint])
    try:
        await store.put(keys.cluster_config, codec.encode(config))
        await store.put(keys.volume("shared0"),
                        codec.encode(Volume(name="shared0", path=str(layout.volume_dir))))
    finally:
        await store.close()


def _ensure_agents(state: LabState, *, say: Say) -> LabState:
    layout = state.layout
    pids = dict(state.agent_pids)
    for node in layout.node_names():
        if procs.is_running(pids.get(node), _agent_marker(layout, node)):
            continue
        pids[node] = start_agent(state, node)
        say(f"{node}: agent started (pid {pids[node]})")
    return replace(state, agent_pids=pids)


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
    store = EtcdStore([state.endpoint])
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
            if procs.stop(pid, _agent_marker(layout, node)):
                say(f"{node}: agent stopped")
    for node_dir in sorted((layout.dir / "run").glob("node*")):
        for pid in procs.qemu_pids(node_dir):
            procs.kill(pid, str(node_dir))
            say(f"{node_dir.name}: QEMU pid {pid} killed")
    if state is not None and procs.stop(state.etcd_pid, _etcd_marker(layout)):
        say("etcd stopped")
    for what in netsetup.teardown(layout):
        say(f"removed {what}")
    for d in (layout.dir, layout.shm_dir):
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
            say(f"removed {d}")


@dataclass(frozen=True)
class NodeHealth:
    node: str
    namespace: bool
    agent_pid: int | None
    agent_running: bool
    qemus: int


def health(state: LabState) -> tuple[bool, list[NodeHealth]]:
    layout = state.layout
    present = netsetup.namespaces()
    nodes = [
        NodeHealth(node=n, namespace=layout.node_ns(n) in present,
                   agent_pid=state.agent_pids.get(n),
                   agent_running=procs.is_running(state.agent_pids.get(n),
                                                  _agent_marker(layout, n)),
                   qemus=len(procs.qemu_pids(layout.run_dir(n))))
        for n in layout.node_names()
    ]
    return procs.is_running(state.etcd_pid, _etcd_marker(layout)), nodes


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

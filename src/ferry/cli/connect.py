"""Finding the cluster: $FERRY_ENDPOINTS, else the running lab, else /etc/ferry/ferry.toml."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from ferry.agent.config import load_config
from ferry.control.client import ClusterClient
from ferry.lab.lab import lab_name, load_state
from ferry.model.errors import FerryError, Unavailable
from ferry.store.etcd import EtcdStore
from ferry.store.keys import Keys

T = TypeVar("T")
HOST_CONFIG = Path("/etc/ferry/ferry.toml")


def resolve() -> tuple[list[str], str]:
    env = os.environ.get("FERRY_ENDPOINTS")
    if env:
        return [e.strip() for e in env.split(",") if e.strip()], os.environ.get(
            "FERRY_CLUSTER", "default")
    state = load_state()
    if state is not None:
        return list(state.endpoints), state.cluster
    if HOST_CONFIG.exists():
        cfg = load_config(HOST_CONFIG)
        return list(cfg.endpoints), cfg.cluster
    raise Unavailable(f"no cluster found: no lab {lab_name()!r} is up (`ferry lab up`),"
                      f" no {HOST_CONFIG}, and FERRY_ENDPOINTS is not set")


async def with_cluster(fn: Callable[[ClusterClient], Awaitable[T]]) -> T:
    endpoints, cluster = resolve()
    store = EtcdStore(endpoints)
    try:
        return await fn(ClusterClient(store=store, keys=Keys(cluster)))
    finally:
        try:
            await store.close()
        except FerryError:
            pass

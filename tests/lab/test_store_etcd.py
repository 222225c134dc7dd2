"""The store contract against a real etcd 3.4, plus what only EtcdStore does (failover).

Each etcd runs with its data under /dev/shm and its client and peer URLs on free loopback
ports; it is killed by PID and its data removed when the fixture ends, pass or fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from ferry.model.errors import LeaseExpired, StoreError
from ferry.store.base import ClusterStore, Compare, EventType, Put, WatchEvent
from ferry.store.etcd import EtcdStore, TlsConfig
from tests.store_contract import StoreContract, collect, eventually

pytestmark = pytest.mark.lab

PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # If pytest itself is killed, take etcd along instead of leaving it running.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class EtcdCluster:
    root: Path
    names: list[str]
    client_ports: list[int]
    peer_ports: list[int]
    tls: TlsConfig | None = None
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def urls(self) -> list[str]:
        scheme = "https" if self.tls else "http"
        return [f"{scheme}://127.0.0.1:{port}" for port in self.client_ports]

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            "--trusted-ca-file", str(self.tls.ca_file), "--client-cert-auth",
            "--cert-file", str(self.root / "server.crt"),
            "--key-file", str(self.root / "server.key"),
        ]  # fmt: skip

    def start(self, index: int) -> None:
        name, peer = self.names[index], f"http://127.0.0.1:{self.peer_ports[index]}"
        initial = ",".join(
            f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports, strict=True)
        )
        log = open(self.root / f"{name}.log", "ab")
        self.procs[index] = subprocess.Popen(
            ["etcd", "--name", name, "--data-dir", str(self.root / name),
             "--listen-client-urls", self.urls[index], "--advertise-client-urls", self.urls[index],
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", initial, "--initial-cluster-state", "new",
             "--initial-cluster-token", self.root.name, *self._tls_args()],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,  # noqa: PLW1509 - started before any thread
        )  # fmt: skip
        log.close()

    def kill(self, index: int) -> None:
        proc = self.procs.pop(index, None)
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        if proc is not None:
            proc.wait()

    def wait_healthy(self, indexes: list[int], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        for index in indexes:
            while not self._healthy(index):
                proc = self.procs[index]
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.root / f"{self.names[index]}.log").read_text()[-2000:]
                    raise RuntimeError(f"etcd {self.names[index]} did not come up:\n{log}")
                time.sleep(0.05)

    def _healthy(self, index: int) -> bool:
        verify: ssl.SSLContext | bool = self.tls.context() if self.tls else True
        try:
            answer = httpx.get(self.urls[index] + "/health", timeout=1, verify=verify)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200 and answer.json().get("health") == "true"


@contextlib.contextmanager
def running_etcd(size: int = 1, *, tls: bool = False) -> Iterator[EtcdCluster]:
    root = Path(tempfile.mkdtemp(prefix="ferry-etcd-test-", dir="/dev/shm"))
    cluster = EtcdCluster(
        root,
        [f"m{i}" for i in range(size)],
        [free_port() for _ in range(size)],
        [free_port() for _ in range(size)],
    )
    try:
        if tls:
            cluster.tls = make_certificates(root)
        for index in range(size):
            cluster.start(index)
        cluster.wait_healthy(list(range(size)))
        yield cluster
    finally:
        for index in list(cluster.procs):
            cluster.kill(index)
        shutil.rmtree(root, ignore_errors=True)


def make_certificates(root: Path) -> TlsConfig:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all in ``root``."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=ferry test CA")  # fmt: skip
    # etcd's JSON gateway dials etcd's own gRPC port with the server certificate as its client
    # certificate: without clientAuth in it, every gateway call fails (and /health passes).
    for name, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        (root / f"{name}.ext").write_text(
            f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"
        )
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=ferry test {name}")  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "1", "-out", f"{name}.crt",
                "-extfile", f"{name}.ext")  # fmt: skip
    return TlsConfig(str(root / "ca.crt"), str(root / "client.crt"), str(root / "client.key"))


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    with running_etcd() as cluster:
        yield cluster


@dataclass
class EtcdHarness:
    store: EtcdStore
    url: str
    prefix: str
    ttl: int = 2  # etcd's smallest TTL with the default election timeout (asking 1 gives 2)
    expiry_slack: float = 1.0  # etcd looks for expired leases every 500 ms

    async def elapse(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def open_watches(self) -> int:
        return await watcher_count(self.url)


async def watcher_count(url: str) -> int:
    async with httpx.AsyncClient() as client:
        text = (await client.get(url + "/metrics")).text
    for line in text.splitlines():
        if line.startswith("etcd_debugging_mvcc_watcher_total "):
            return int(float(line.split()[1]))
    raise AssertionError("etcd has no watcher gauge")


async def revoke_all_leases(url: str) -> None:
    """So that no lease of one test expires in the middle of the next one."""
    async with httpx.AsyncClient() as client:
        leases = (await client.post(url + "/v3/lease/leases", json={})).json().get("leases", [])
        for lease in leases:
            await client.post(url + "/v3/lease/revoke", json={"ID": lease["ID"]})


@pytest.fixture
async def h(etcd: EtcdCluster) -> AsyncIterator[EtcdHarness]:
    store = EtcdStore(etcd.urls)
    yield EtcdHarness(store, etcd.urls[0], f"/test/{uuid.uuid4().hex[:8]}/")
    await store.close()
    await revoke_all_leases(etcd.urls[0])


class TestEtcdStore(StoreContract):
    pass


def test_etcd_store_is_a_cluster_store() -> None:
    store: ClusterStore = EtcdStore(["http://127.0.0.1:1"])
    assert store is not None


# -- etcd only


async def test_etcd_raises_a_short_ttl(h: EtcdHarness) -> None:
    lease = await h.store.grant_lease(1)
    assert await h.store.keepalive(lease) == 2


async def test_fails_over_to_a_live_endpoint(etcd: EtcdCluster) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    store = EtcdStore([dead, etcd.urls[0]], timeout=2)
    try:
        revision = await store.put("/failover/k", "v")
        assert store.endpoint == etcd.urls[0]
        assert (await store.status()).revision == revision
        events = await collect(store.watch("/failover/", start_revision=revision), 1)
        assert [e.value for e in events] == ["v"]
    finally:
        await store.close()


async def test_clear_error_when_nothing_answers() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    store = EtcdStore([dead], timeout=1)
    try:
        with pytest.raises(StoreError) as caught:
            await store.get("/k")
        assert str(caught.value) == f"etcd at {dead}: connection refused"
        with pytest.raises(StoreError, match="connection refused"):
            await store.txn([Compare.absent("/k")], [Put("/k", "v")])
        with pytest.raises(StoreError, match="connection refused"):
            await collect(store.watch("/", start_revision=0), 1)
    finally:
        await store.close()
    other = f"http://127.0.0.1:{free_port()}"
    both = EtcdStore([dead, other], timeout=1)
    with pytest.raises(StoreError) as caught:
        await both.put("/k", "v")
    assert str(caught.value) == (
        f"etcd at {dead}: connection refused; etcd at {other}: connection refused"
    )
    await both.close()


def test_etcd_is_killed_and_removed_even_if_the_test_fails() -> None:
    with pytest.raises(RuntimeError, match="boom"), running_etcd() as cluster:
        pid, root = cluster.procs[0].pid, cluster.root
        assert httpx.get(cluster.urls[0] + "/health").status_code == 200
        raise RuntimeError("boom")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not root.exists()


async def test_three_members_failover_and_quorum_loss() -> None:
    with running_etcd(3) as cluster:
        store = EtcdStore(cluster.urls, timeout=3)
        try:
            await _member_loss_is_invisible(store, cluster)
            await _quorum_loss_fails_fast(store, cluster)
        finally:
            await store.close()


async def _member_loss_is_invisible(store: EtcdStore, cluster: EtcdCluster) -> None:
    start = await store.put("/ha/k", "0")
    assert store.endpoint == cluster.urls[0]
    events: list[WatchEvent] = []

    async def follow() -> None:
        async for batch in store.watch("/ha/", start_revision=start):
            events.extend(batch)

    watcher = asyncio.create_task(follow())
    await eventually(lambda: _has(events, 1))
    cluster.kill(0)  # the member serving both the requests and the watch stream
    for i in range(1, 6):
        await store.put("/ha/k", str(i))
    assert store.endpoint != cluster.urls[0]
    await eventually(lambda: _has(events, 6), timeout=10)
    assert [e.value for e in events] == [str(i) for i in range(6)]  # no gap, no repeat
    assert not watcher.done()
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


async def _quorum_loss_fails_fast(store: EtcdStore, cluster: EtcdCluster) -> None:
    lease = await store.grant_lease(30)
    survivor = cluster.urls.index(store.endpoint)
    watch = asyncio.create_task(collect(store.watch("/ha/", start_revision=0), 1, timeout=30))
    await asyncio.sleep(0.5)
    cluster.kill(next(i for i in list(cluster.procs) if i != survivor))
    await asyncio.sleep(2.0)  # past the election timeout: the survivor knows it has no leader
    quick = EtcdStore([cluster.urls[survivor]], timeout=1)
    try:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: quick.get("/ha/k"),
            lambda: quick.put("/ha/k", "x"),
            lambda: quick.keepalive(lease),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreError, match="no leader"):
                await call()
            # Within our timeout: etcd on its own would hold a request for its 7 s timeout.
            assert time.monotonic() - started < 1.5
        status = await quick.status()
        assert status.leader == 0
    finally:
        await quick.close()
    with pytest.raises(StoreError, match="no leader"):
        await watch


async def _has(events: list[WatchEvent], count: int) -> bool:
    return len(events) >= count


async def test_lease_expiry_deletes_are_watch_events(h: EtcdHarness) -> None:
    lease = await h.store.grant_lease(2)
    revision = await h.store.put(h.prefix + "alive", "yes", lease=lease)
    events = await collect(h.store.watch(h.prefix, start_revision=revision + 1), 1, timeout=5)
    assert [(e.type, e.key) for e in events] == [(EventType.DELETE, h.prefix + "alive")]
    with pytest.raises(LeaseExpired):
        await h.store.keepalive(lease)


async def test_tls_with_client_certificate() -> None:
    with running_etcd(tls=True) as cluster:
        assert cluster.tls is not None and cluster.urls[0].startswith("https://")
        store = EtcdStore(cluster.urls, tls=cluster.tls)
        try:
            revision = await store.put("/tls/k", "v")
            events = await collect(store.watch("/tls/", start_revision=revision), 1)
            assert [e.value for e in events] == ["v"]
        finally:
            await store.close()
        anonymous = EtcdStore(cluster.urls, tls=TlsConfig(ca_file=cluster.tls.ca_file))
        with pytest.raises(StoreError):
            await anonymous.get("/tls/k")
        await anonymous.close()

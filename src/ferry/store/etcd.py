"""ClusterStore over etcd 3.4's JSON gateway (grpc-gateway), with endpoint failover.

What this relies on, checked against etcd 3.4.23:
- Keys and values are base64; int64 fields are JSON strings; fields holding their default
  (0, false, the PUT event type, an empty list) are left out of answers.
- Errors answer non-200 with ``{"error", "message", "code"}`` (gRPC code); the streaming
  endpoints (watch, lease keepalive) wrap answers in ``{"result": …}`` and errors in
  ``{"error": {"grpc_code", "message", …}}``.
- The header ``Grpc-Metadata-hasleader: true`` reaches etcd as gRPC metadata and makes a
  member without a leader refuse at once ("no leader", 503) instead of hanging until its
  request timeout (7 s), and cancel open watches ~3 s after losing its leader instead of
  keeping them open and silent forever. Every request except ``status`` sends it.
- A keepalive of a dead lease answers 200 without ``TTL``; a put (also inside a txn) on a
  dead lease answers code 5 "requested lease not found". ``/v3/lease/revoke`` is served (as
  is the older ``/v3/kv/lease/revoke``).
- A watch stream sends ``created`` first; a compacted start revision then arrives as
  ``canceled`` with ``compact_revision`` while the HTTP stream stays open.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from ferry.model.errors import Compacted, LeaseExpired, StoreError
from ferry.store.base import (
    Compare,
    Delete,
    Entry,
    EventType,
    Put,
    StoreStatus,
    Target,
    TxnOp,
    TxnResult,
    WatchEvent,
)

T = TypeVar("T")

_REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}

# Answers meaning etcd did not take the request in, so any request may go to another member.
_REFUSALS = ("no leader", "not capable", "too many requests", "unhealthy cluster")

# gRPC codes after which a write may or may not have been applied: Canceled, Unknown,
# DeadlineExceeded, Unavailable (e.g. "request timed out", "leader changed").
_AMBIGUOUS_CODES = frozenset({1, 2, 4, 14})

_COMPARE_FIELDS = {
    Target.VALUE: "value",
    Target.MOD: "mod_revision",
    Target.CREATE: "create_revision",
    Target.VERSION: "version",
    Target.LEASE: "lease",
}

# A dead etcd host sends no RST; TCP keepalive notices it on an idle watch stream in ~11 s.
_KEEPALIVE_OPTIONS = [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
]


@dataclass(frozen=True)
class TlsConfig:
    """Client TLS: the CA that signed etcd's certificate, and optionally a client cert."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


class _Unsent(Exception):
    """The request never reached etcd, or etcd refused it unprocessed: safe to resend."""


class _Busy(_Unsent):
    """A member refused for now (no leader yet, overloaded): worth asking again shortly."""


class _Unknown(Exception):
    """The request was sent but its outcome is unknown: only an idempotent one may be resent."""


class _WatchBroken(Exception):
    """A watch stream ended or was canceled for a reason other than compaction."""


class EtcdStore:
    """A ClusterStore talking to one etcd cluster through any of its members.

    A request goes to the member that answered last; when that one cannot be reached or
    says it cannot serve (no leader, unavailable), the next member is tried. Puts, deletes,
    reads and lease calls are also resent after an answer was lost, since applying them twice
    ends in the same state; a txn is not, and raises StoreError saying it may have applied.
    """

    def __init__(
        self, endpoints: Sequence[str], *, timeout: float = 5.0, tls: TlsConfig | None = None
    ) -> None:
        if not endpoints:
            raise StoreError("no etcd endpoints given")
        self._endpoints = [e.rstrip("/") for e in endpoints]
        self._current = 0
        self._timeout = timeout
        try:
            verify: ssl.SSLContext | bool = tls.context() if tls else True
        except OSError as err:  # ssl.SSLError is one too
            raise StoreError(f"etcd TLS configuration: {err}") from err
        self._client = httpx.AsyncClient(timeout=timeout, verify=verify)
        # Watch streams are idle for as long as nothing changes: no read timeout for them.
        watch_transport = httpx.AsyncHTTPTransport(
            verify=verify,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            socket_options=_KEEPALIVE_OPTIONS,
        )
        self._watch_client = httpx.AsyncClient(
            transport=watch_transport, timeout=httpx.Timeout(timeout, read=None)
        )

    @property
    def endpoint(self) -> str:
        """The member that answered last (the first one tried next)."""
        return self._endpoints[self._current]

    # -- keys

    async def get(self, key: str) -> Entry | None:
        data = await self._call("/v3/kv/range", {"key": _b64(key)})
        kvs = data.get("kvs", [])
        return _entry(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str) -> tuple[list[Entry], int]:
        data = await self._call("/v3/kv/range", _range(prefix, prefix=True))
        entries = [_entry(kv) for kv in data.get("kvs", [])]
        return entries, _revision(data)

    async def put(self, key: str, value: str, *, lease: int = 0) -> int:
        data = await self._call("/v3/kv/put", _put(Put(key, value, lease)))
        return _revision(data)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        data = await self._call("/v3/kv/deleterange", _range(key, prefix=prefix))
        return int(data.get("deleted", 0))

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult:
        body = {
            "compare": [_compare(c) for c in compares],
            "success": [_request_op(op) for op in success],
            "failure": [_request_op(op) for op in failure],
        }
        data = await self._call("/v3/kv/txn", body, idempotent=False)
        return TxnResult(succeeded=bool(data.get("succeeded", False)), revision=_revision(data))

    async def compact(self, revision: int) -> None:
        """Forget history before ``revision``; watches from earlier raise Compacted."""
        await self._call("/v3/kv/compaction", {"revision": str(revision)})

    # -- leases

    async def grant_lease(self, ttl: int) -> int:
        data = await self._call("/v3/lease/grant", {"TTL": str(ttl)})
        if data.get("error"):
            raise StoreError(f"etcd at {self.endpoint}: lease grant: {data['error']}")
        return int(data["ID"])

    async def keepalive(self, lease: int) -> int:
        data = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        ttl = int(data.get("TTL", 0))
        if ttl <= 0:
            raise LeaseExpired(f"lease {lease:x} has expired")
        return ttl

    async def revoke_lease(self, lease: int) -> None:
        with contextlib.suppress(LeaseExpired):
            await self._call("/v3/lease/revoke", {"ID": str(lease)})

    # -- cluster

    async def status(self) -> StoreStatus:
        # Without the leader requirement, so that a member without a leader still reports.
        data = await self._call("/v3/maintenance/status", {}, require_leader=False)
        header = data.get("header", {})
        return StoreStatus(
            endpoint=self.endpoint,
            version=str(data.get("version", "")),
            revision=int(header.get("revision", 0)),
            leader=int(data.get("leader", 0)),
            member=int(header.get("member_id", 0)),
            db_size=int(data.get("dbSize", 0)),
        )

    async def close(self) -> None:
        await self._client.aclose()
        await self._watch_client.aclose()

    # -- watch

    async def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """See ClusterStore.watch; 0 means from the next revision on.

        A stream that breaks is reopened (on another member if need be) from the revision
        after the last event delivered, so the consumer sees no gap; StoreError only when no
        member will serve it.
        """
        next_revision = start_revision
        failures = 0
        while True:
            endpoint, response = await self._failover(
                functools.partial(self._open_watch, prefix=prefix, start_revision=next_revision),
                idempotent=True,
            )
            try:
                async for line in response.aiter_lines():
                    result = _watch_result(line, endpoint=endpoint, next_revision=next_revision)
                    if result.get("created"):
                        failures = 0
                        if next_revision == 0:
                            next_revision = _revision(result) + 1
                    events = [_event(e) for e in result.get("events", [])]
                    if events:
                        next_revision = events[-1].mod_revision + 1
                        yield events
                reason = "stream ended"
            except (httpx.HTTPError, OSError, _WatchBroken) as err:
                reason = _describe(err)
            finally:
                await response.aclose()
            failures += 1
            if failures > len(self._endpoints):
                raise StoreError(f"etcd at {endpoint}: watch of {prefix!r} failed: {reason}")
            await asyncio.sleep(0.1 * failures)

    async def _open_watch(
        self, endpoint: str, prefix: str, *, start_revision: int
    ) -> tuple[str, httpx.Response]:
        create: dict[str, Any] = _range(prefix, prefix=True)
        if start_revision > 0:
            create["start_revision"] = str(start_revision)
        request = self._watch_client.build_request(
            "POST",
            endpoint + "/v3/watch",
            json={"create_request": create},
            headers=_REQUIRE_LEADER,
        )
        response = await _send(self._watch_client, request, stream=True)
        if response.status_code == 200:
            return endpoint, response
        try:
            await response.aread()
        except (httpx.HTTPError, OSError) as err:
            raise _Unknown(_describe(err)) from err
        finally:
            await response.aclose()
        _payload(response, endpoint)
        raise _Unknown(f"HTTP {response.status_code}")  # _payload raises for any non-200

    # -- requests and failover

    async def _call(
        self,
        path: str,
        body: dict[str, Any],
        *,
        idempotent: bool = True,
        require_leader: bool = True,
    ) -> dict[str, Any]:
        headers = _REQUIRE_LEADER if require_leader else {}

        async def attempt(endpoint: str) -> dict[str, Any]:
            request = self._client.build_request(
                "POST", endpoint + path, json=body, headers=headers
            )
            return _payload(await _send(self._client, request), endpoint)

        return await self._failover(attempt, idempotent=idempotent)

    async def _failover(self, attempt: Callable[[str], Awaitable[T]], *, idempotent: bool) -> T:
        """Ask each member in turn, from the last one that answered.

        While some member is up but busy (typically: electing a leader, ~1-2 s), ask around
        again until ``timeout`` has passed; when none is reachable, fail at once.
        """
        deadline = time.monotonic() + self._timeout
        pause = 0.05
        count = len(self._endpoints)
        while True:
            reasons: list[str] = []
            busy = False
            for index in [(self._current + i) % count for i in range(count)]:
                endpoint = self._endpoints[index]
                try:
                    result = await attempt(endpoint)
                except _Unsent as err:
                    busy = busy or isinstance(err, _Busy)
                    reasons.append(f"etcd at {endpoint}: {err}")
                    continue
                except _Unknown as err:
                    if not idempotent:
                        raise StoreError(
                            f"etcd at {endpoint}: {err} (the transaction may have been applied)"
                        ) from None
                    reasons.append(f"etcd at {endpoint}: {err}")
                    # Doing it again ends in the same state: worth another round (e.g. the
                    # gateway's "transport is closing" when a peer dropped its connection).
                    busy = True
                    continue
                self._current = index
                return result
            if not busy or time.monotonic() + pause > deadline:
                raise StoreError("; ".join(reasons))
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)


async def _send(
    client: httpx.AsyncClient, request: httpx.Request, *, stream: bool = False
) -> httpx.Response:
    if client.is_closed:
        raise StoreError("etcd store is closed")
    try:
        return await client.send(request, stream=stream)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as err:
        raise _Unsent(_describe(err)) from err
    except httpx.TimeoutException as err:
        raise _Unknown(f"timed out ({type(err).__name__})") from err
    except (httpx.HTTPError, OSError) as err:
        # OSError: with TLS 1.3 a rejected client certificate shows up as a bare SSLError
        # on the first read, unwrapped by httpx.
        raise _Unknown(_describe(err)) from err


def _payload(response: httpx.Response, endpoint: str) -> dict[str, Any]:
    """The answer's body, or the exception its error stands for."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("result"), dict):
        data = data["result"]
    error = _error_of(data)
    if response.status_code == 200 and error is None and isinstance(data, dict):
        return data
    if error is None:
        text = response.text.strip().splitlines()
        error = (0, f"HTTP {response.status_code} {text[0][:200] if text else ''}".strip())
    raise _exception(response.status_code, error, endpoint=endpoint)


def _error_of(data: object) -> tuple[int, str] | None:
    if not isinstance(data, dict) or "error" not in data:
        return None
    error = data["error"]
    if isinstance(error, dict):  # the streaming endpoints' shape
        return int(error.get("grpc_code", 0)), str(error.get("message", error))
    return int(data.get("code", 0)), str(data.get("message") or error)


def _exception(status: int, error: tuple[int, str], *, endpoint: str) -> Exception:
    code, message = error
    message = message.removeprefix("etcdserver: ")
    if code == 5 and "lease not found" in message:
        return LeaseExpired(f"etcd at {endpoint}: {message}")
    if code == 11 and "compacted" in message:
        return Compacted(f"etcd at {endpoint}: {message}")
    if any(refusal in message for refusal in _REFUSALS):
        return _Busy(message)
    if status >= 500 or code in _AMBIGUOUS_CODES:
        return _Unknown(message)
    return StoreError(f"etcd at {endpoint}: {message}")


def _describe(err: BaseException) -> str:
    """A short reason: the OS error under httpx's wrapping if there is one."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {cause.reason or cause}".lower()
        if isinstance(cause, OSError) and cause.errno:
            if cause.errno > 0:
                return os.strerror(cause.errno).lower()
            return str(cause.strerror or cause).lower()
        cause = cause.__cause__ or cause.__context__
    return str(err) or type(err).__name__


def _watch_result(line: str, *, endpoint: str, next_revision: int) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError:
        raise _WatchBroken(f"unreadable watch message {line[:100]!r}") from None
    error = _error_of(message)
    if error is not None:
        raise _WatchBroken(error[1].removeprefix("etcdserver: "))
    result = message.get("result") if isinstance(message, dict) else None
    if not isinstance(result, dict):
        raise _WatchBroken(f"unexpected watch message {line[:100]!r}")
    compacted = int(result.get("compact_revision", 0))
    if compacted:
        raise Compacted(
            f"etcd at {endpoint}: watch from revision {next_revision} is compacted "
            f"(history starts at {compacted})"
        )
    if result.get("canceled"):
        raise _WatchBroken(str(result.get("cancel_reason") or "watch canceled"))
    return result


# -- the gateway's JSON


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _b64_bytes(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix`` (b"\\0": no upper bound)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _range(key: str, *, prefix: bool) -> dict[str, Any]:
    if not prefix:
        return {"key": _b64(key)}
    raw = key.encode()
    # etcd reads key "\0" with range_end "\0" as "every key".
    return {"key": _b64_bytes(raw or b"\0"), "range_end": _b64_bytes(_prefix_end(raw))}


def _put(op: Put) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(op.key), "value": _b64(op.value)}
    if op.lease:
        body["lease"] = str(op.lease)
    return body


def _request_op(op: TxnOp) -> dict[str, Any]:
    if isinstance(op, Put):
        return {"request_put": _put(op)}
    if isinstance(op, Delete):
        return {"request_delete_range": _range(op.key, prefix=op.prefix)}
    raise TypeError(f"not a txn op: {op!r}")


def _compare(c: Compare) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(c.key), "target": c.target.value, "result": c.op.value}
    if c.target is Target.VALUE:
        if not isinstance(c.value, str):
            raise TypeError(f"a VALUE compare needs a str, got {c.value!r}")
        body["value"] = _b64(c.value)
    else:
        if not isinstance(c.value, int):
            raise TypeError(f"a {c.target.value} compare needs an int, got {c.value!r}")
        body[_COMPARE_FIELDS[c.target]] = str(c.value)
    return body


def _revision(data: dict[str, Any]) -> int:
    return int(data.get("header", {}).get("revision", 0))


def _entry(kv: dict[str, Any]) -> Entry:
    return Entry(
        key=_unb64(kv["key"]),
        value=_unb64(kv.get("value", "")),
        create_revision=int(kv.get("create_revision", 0)),
        mod_revision=int(kv.get("mod_revision", 0)),
        version=int(kv.get("version", 0)),
        lease=int(kv.get("lease", 0)),
    )


def _event(event: dict[str, Any]) -> WatchEvent:
    kv = event["kv"]
    return WatchEvent(
        type=EventType.DELETE if event.get("type") == "DELETE" else EventType.PUT,
        key=_unb64(kv["key"]),
        value=_unb64(kv.get("value", "")),
        mod_revision=int(kv.get("mod_revision", 0)),
        create_revision=int(kv.get("create_revision", 0)),
    )

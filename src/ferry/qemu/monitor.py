"""A typed wrapper over qemu.qmp: the commands Ferry uses, with QEMU's errors as QemuError.

QMP answers are parsed here, at the boundary, into small dataclasses; nothing above this
module sees QMP's raw dictionaries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate

from ferry.model.errors import QemuError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QmpEvent:
    name: str
    timestamp: float  # host wall clock when QEMU emitted it
    status: str = ""  # MIGRATION's status, SHUTDOWN's reason
    pass_: int = 0  # MIGRATION_PASS's pass number


@dataclass(frozen=True)
class MigrateInfo:
    """query-migrate, flattened. Absent fields are 0.

    ``status`` is what QEMU says; ``outgoing`` is the state of this process's outgoing
    migration. They differ in a QEMU that was itself a migration target: QEMU 7.2 reports
    the incoming migration's status ("completed") for the rest of its life, so the outgoing
    state is inferred from the fields only the outgoing side fills in."""

    status: str
    outgoing: str = "none"
    total_time_ms: int = 0
    downtime_ms: int = 0
    expected_downtime_ms: int = 0
    setup_time_ms: int = 0
    ram_total: int = 0
    ram_transferred: int = 0
    ram_remaining: int = 0
    ram_mbps: float = 0.0
    dirty_pages_rate: float = 0.0
    page_size: int = 4096
    dirty_sync_count: int = 0
    throttle_pct: int = 0
    postcopy_blocktime_ms: int = 0
    error: str = ""


@dataclass(frozen=True)
class MigrationParameters:
    """query-migrate-parameters: the ones Ferry steers a migration with."""

    downtime_limit_ms: int = 300
    max_bandwidth: int = 0
    throttle_trigger_threshold: int = 50
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    max_cpu_throttle: int = 99


def parse_migrate_parameters(raw: object) -> MigrationParameters:
    if not isinstance(raw, dict):
        raise QemuError(f"query-migrate-parameters: unexpected answer {raw!r}")
    return MigrationParameters(
        downtime_limit_ms=_int(raw, "downtime-limit"),
        max_bandwidth=_int(raw, "max-bandwidth"),
        throttle_trigger_threshold=_int(raw, "throttle-trigger-threshold"),
        cpu_throttle_initial=_int(raw, "cpu-throttle-initial"),
        cpu_throttle_increment=_int(raw, "cpu-throttle-increment"),
        max_cpu_throttle=_int(raw, "max-cpu-throttle"),
    )


def _int(d: Mapping[str, object], key: str) -> int:
    v = d.get(key, 0)
    return int(v) if isinstance(v, (int, float)) else 0


def _float(d: Mapping[str, object], key: str) -> float:
    v = d.get(key, 0.0)
    return float(v) if isinstance(v, (int, float)) else 0.0


OUTGOING_ACTIVE = ("setup", "active", "device", "pre-switchover", "cancelling",
                   "postcopy-active", "postcopy-paused", "postcopy-recover", "wait-unplug")


def outgoing_status(raw: Mapping[str, object]) -> str:
    """The outgoing migration's state from query-migrate's fields (see MigrateInfo)."""
    status = str(raw.get("status", "none"))
    if status.startswith("postcopy") and "ram" in raw:
        return status  # the switch to post-copy already reports the downtime it took
    if "downtime" in raw:
        return "completed"  # otherwise only a completed outgoing migration reports it
    if "ram" in raw:
        return status if status in OUTGOING_ACTIVE else "active"
    if "error-desc" in raw:
        return "failed"
    if status in ("setup", "cancelled", "cancelling", "failed"):
        return status
    return "none"


def parse_migrate_info(raw: object) -> MigrateInfo:
    if not isinstance(raw, dict):
        raise QemuError(f"query-migrate: unexpected answer {raw!r}")
    ram = raw.get("ram")
    ram = ram if isinstance(ram, dict) else {}
    return MigrateInfo(
        status=str(raw.get("status", "none")),
        outgoing=outgoing_status(raw),
        total_time_ms=_int(raw, "total-time"),
        downtime_ms=_int(raw, "downtime"),
        expected_downtime_ms=_int(raw, "expected-downtime"),
        setup_time_ms=_int(raw, "setup-time"),
        ram_total=_int(ram, "total"),
        ram_transferred=_int(ram, "transferred"),
        ram_remaining=_int(ram, "remaining"),
        ram_mbps=_float(ram, "mbps"),
        dirty_pages_rate=_float(ram, "dirty-pages-rate"),
        page_size=_int(ram, "page-size") or 4096,
        dirty_sync_count=_int(ram, "dirty-sync-count"),
        throttle_pct=_int(raw, "cpu-throttle-percentage"),
        postcopy_blocktime_ms=_int(raw, "postcopy-blocktime"),
        error=str(raw.get("error-desc", "")),
    )


def parse_event(msg: Mapping[str, object]) -> QmpEvent:
    ts = msg.get("timestamp")
    when = 0.0
    if isinstance(ts, dict):
        when = _int(ts, "seconds") + _int(ts, "microseconds") / 1e6
    data = msg.get("data")
    data = data if isinstance(data, dict) else {}
    status = data.get("status", data.get("reason", ""))
    return QmpEvent(
        name=str(msg.get("event", "")),
        timestamp=when,
        status=str(status),
        pass_=_int(data, "pass"),
    )


class EventStream:
    """Events of some names, queued from the moment it was opened."""

    def __init__(self, listener: EventListener) -> None:
        self._listener = listener

    async def get(self, *, timeout: float | None = None) -> QmpEvent:
        try:
            msg = await asyncio.wait_for(self._listener.get(), timeout)
        except TimeoutError as err:
            raise QemuError(f"no QMP event within {timeout:.1f}s") from err
        return parse_event(msg)

    async def wait_for(
        self, name: str, *, statuses: Sequence[str] = (), timeout: float | None = None
    ) -> QmpEvent:
        """The next event called ``name`` (with one of ``statuses``, if given)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            ev = await self.get(timeout=left)
            if ev.name == name and (not statuses or ev.status in statuses):
                return ev


class Monitor:
    """One QMP session with one QEMU process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._qmp = QMPClient(name)
        # The library's default listener would queue every event forever (nobody reads it,
        # and it cannot be removed): make it accept none.
        self._qmp.events.accept = lambda event: False  # type: ignore[method-assign]

    async def connect(self, path: Path, *, timeout: float = 10.0) -> None:
        """Connect, retrying while QEMU is still creating its socket."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await self._qmp.connect(str(path))
                return
            except QMPError as err:
                if loop.time() >= deadline:
                    raise QemuError(f"{self.name}: cannot connect to QMP at {path}: {err}") from err
            await asyncio.sleep(0.02)

    @property
    def connected(self) -> bool:
        return self._qmp.runstate == Runstate.RUNNING

    async def close(self) -> None:
        try:
            await self._qmp.disconnect()
        except (QMPError, OSError, EOFError) as err:
            log.debug("%s: disconnect: %s", self.name, err)

    async def execute(self, cmd: str, args: Mapping[str, object] | None = None, *,
                      oob: bool = False) -> object:
        """``oob``: out of band, answered even while QEMU's main loop is blocked (the few
        commands that allow it)."""
        try:
            return await self._qmp.execute(cmd, args, oob=oob)
        except ExecuteError as err:
            raise QemuError(f"{self.name}: {cmd}: {err.error.error.desc}") from err
        except (QMPError, OSError, EOFError) as err:
            raise QemuError(f"{self.name}: {cmd}: monitor connection lost ({err})") from err

    @contextmanager
    def events(self, *names: str) -> Iterator[EventStream]:
        """Queue events of ``names`` (all if none) while the block runs."""
        with self._qmp.listener(names) as listener:
            yield EventStream(listener)

    async def run_state(self) -> str:
        raw = await self.execute("query-status")
        if not isinstance(raw, dict):
            raise QemuError(f"{self.name}: query-status: unexpected answer {raw!r}")
        return str(raw.get("status", "unknown"))

    async def query_migrate(self) -> MigrateInfo:
        return parse_migrate_info(await self.execute("query-migrate"))

    async def completed_migrate_info(self) -> MigrateInfo:
        """query-migrate once the outgoing migration has completed. QEMU marks it completed
        a moment before it computes total time and downtime: wait (up to 1 s) for them."""
        info = await self.query_migrate()
        for _ in range(100):
            if info.total_time_ms > 0:
                break
            await asyncio.sleep(0.01)
            info = await self.query_migrate()
        return info

    async def incoming_port(self) -> int:
        """The TCP port an incoming migration listens on (after migrate-incoming ...:0)."""
        raw = await self.execute("query-migrate")
        addrs = raw.get("socket-address") if isinstance(raw, dict) else None
        if isinstance(addrs, list):
            for a in addrs:
                if isinstance(a, dict) and str(a.get("port", "")).isdigit():
                    return int(a["port"])
        raise QemuError(f"{self.name}: QEMU did not report its incoming port: {raw!r}")

    async def set_capabilities(self, caps: Mapping[str, bool]) -> None:
        await self.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
        )

    async def set_parameters(self, params: Mapping[str, int | str | bool]) -> None:
        if params:
            await self.execute("migrate-set-parameters", dict(params))

    async def query_parameters(self) -> MigrationParameters:
        return parse_migrate_parameters(await self.execute("query-migrate-parameters"))

    async def migrate(self, uri: str, *, resume: bool = False) -> None:
        """Start an outgoing migration; ``resume``: reconnect a paused post-copy."""
        args: dict[str, object] = {"uri": uri}
        if resume:
            args["resume"] = True
        await self.execute("migrate", args)

    async def migrate_start_postcopy(self) -> None:
        """Switch to post-copy at the end of the current pass (needs postcopy-ram on both
        sides, set before the migration started)."""
        await self.execute("migrate-start-postcopy")

    async def migrate_pause(self) -> None:
        """Break a post-copy stream on purpose: both sides wait in postcopy-paused."""
        await self.execute("migrate-pause")

    async def migrate_recover(self, uri: str) -> None:
        """On a target in postcopy-paused: listen at ``uri`` for the source to resume. Out of
        band: the main loop may be blocked on a page that has not arrived."""
        await self.execute("migrate-recover", {"uri": uri}, oob=True)

    async def migrate_incoming(self, uri: str) -> None:
        await self.execute("migrate-incoming", {"uri": uri})

    async def migrate_cancel(self) -> None:
        await self.execute("migrate_cancel")

    async def cont(self) -> None:
        await self.execute("cont")

    async def stop(self) -> None:
        await self.execute("stop")

    async def powerdown(self) -> None:
        await self.execute("system_powerdown")

    async def announce(self, *, initial_ms: int = 0, rounds: int = 5, step_ms: int = 50) -> None:
        await self.execute(
            "announce-self",
            {"initial": initial_ms, "max": max(initial_ms, step_ms * rounds), "rounds": rounds,
             "step": step_ms},
        )

    async def quit(self) -> None:
        """Ask QEMU to exit; the connection dropping as it goes is expected."""
        try:
            await self._qmp.execute("quit")
        except ExecuteError as err:
            raise QemuError(f"{self.name}: quit: {err.error.error.desc}") from err
        except (QMPError, OSError, EOFError):
            pass

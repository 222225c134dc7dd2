"""Post-copy: the switch, its point of no return, and recovery of a broken stream.

The switch (source): stop the guest, so that nothing runs anywhere; move ownership to the
target in one transaction, guarded like the target's own commit (the owner record is the
one the migration started with, no cancel was requested) and recording ``postcopy_at``;
only then ``migrate-start-postcopy``. The target sees the commit, resumes its QEMU (which
starts once it has the device state) and pulls the pages it lacks while the source pushes
the rest. If the transaction fails, the guest resumes on the source: nothing ran elsewhere.

From the commit on, the source's QEMU holds pages the VM needs: it is neither cancelled nor
killed until QEMU says the post-copy completed. A broken stream leaves both QEMUs in
postcopy-paused (the guest waits for its missing pages instead of being lost): the target
listens again (``migrate-recover``) and publishes where; the source reconnects there
(``migrate`` with resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time

from ferry.agent.context import AgentContext
from ferry.agent.runtime import LocalVm
from ferry.model import codec
from ferry.model.errors import FerryError, QemuError
from ferry.model.migration import MigrationRecord
from ferry.model.vm import Owner, Power
from ferry.qemu.monitor import EventStream
from ferry.store.base import Compare, Entry, Put

log = logging.getLogger(__name__)

# If QEMU refuses the switch after the commit, the stopped guest is finished in pre-copy:
# any downtime limit will do, nothing dirties memory any more.
FALLBACK_DOWNTIME_MS = 60_000
POLL_S = 0.25


async def start_postcopy(ctx: AgentContext, mid: str, local: LocalVm, *, decision: str,
                         left: str) -> str | None:
    """Switch to post-copy; None when done, else why not (and the guest runs here again),
    e.g. because a cancel was requested first. ``decision`` (the policy's note) is written
    with the commit: the guest is stopped, every store round trip is part of its pause."""
    mon = local.monitor
    await mon.stop()
    try:
        why_not = await _commit(ctx, mid, decision=decision, left=left)
    except FerryError:
        await mon.cont()  # the store did not answer: nothing moved, the guest goes on here
        raise
    if why_not is not None:
        await mon.cont()
        await _note(ctx, mid, f"{decision} — not started: {why_not}")
        return why_not
    try:
        await mon.migrate_start_postcopy()
    except QemuError as err:
        # Committed: the target must get the VM. The guest is stopped, so pre-copy finishes.
        await mon.set_parameters({"downtime-limit": FALLBACK_DOWNTIME_MS})
        await _note(ctx, mid, f"QEMU refused post-copy ({err}); the paused guest is finished"
                              " in pre-copy instead")
    return None


async def _commit(ctx: AgentContext, mid: str, *, decision: str, left: str) -> str | None:
    """Ownership to the target and ``postcopy_at`` in one transaction; None when done,
    else why not. The first try uses the watch's copies (usually current: one round trip);
    the transaction's guards make a stale copy harmless."""
    for attempt in range(20):
        got = _cached(ctx, mid) if attempt == 0 else None
        if got is None:
            rec, rec_rev = await ctx.read_record(mid)
            entry = await ctx.store.get(ctx.keys.vm_owner(rec.vm))
        else:
            rec, rec_rev, entry = got
        owner = codec.decode(Owner, entry.value) if entry is not None else None
        if rec.phase.terminal or entry is None or owner is None or owner.migration != mid:
            return "the migration is no longer in progress"
        now = time.time()
        new = rec.note(at=now, node=ctx.node, note=decision).note(at=now, node=ctx.node, note=(
            f"post-copy: ownership moved to {rec.target} (point of no return); the VM resumes"
            f" there and pulls what it lacks ({left})"))
        owner_key = ctx.keys.vm_owner(rec.vm)
        res = await ctx.store.txn(
            [Compare.unchanged(owner_key, entry.mod_revision),
             Compare.unchanged(ctx.keys.migration_record(mid), rec_rev),
             Compare.absent(ctx.keys.migration_cancel(mid))],
            [Put(owner_key, codec.encode(Owner(node=rec.target, power=Power.ON, ha=owner.ha))),
             Put(ctx.keys.migration_record(mid), codec.encode(
                 dataclasses.replace(new, postcopy_at=now, committed_at=now)))])
        if res.succeeded:
            return None
        if await ctx.store.get(ctx.keys.migration_cancel(mid)) is not None:
            return "a cancel was requested"
        await asyncio.sleep(0.005)
    return "the migration's record changed too often"


def _cached(ctx: AgentContext, mid: str) -> tuple[MigrationRecord, int, Entry | None] | None:
    rec = ctx.view.migration(mid)
    rec_entry = ctx.view.entries.get(ctx.keys.migration_record(mid))
    if rec is None or rec_entry is None:
        return None
    return rec, rec_entry.mod_revision, ctx.view.entries.get(ctx.keys.vm_owner(rec.vm))


async def _note(ctx: AgentContext, mid: str, text: str) -> None:
    log.info("migration %s: %s", mid, text)
    with contextlib.suppress(FerryError):
        await ctx.update_record(mid, lambda r: r.note(at=time.time(), node=ctx.node, note=text))


# -- recovery


async def resume_source(ctx: AgentContext, rec: MigrationRecord, local: LocalVm,
                        used_uri: str) -> str:
    """The source's QEMU is in postcopy-paused: wait until the target listens again at a new
    address, reconnect there; returns that address. Waits as long as it takes: the VM's
    memory is split between the two QEMUs, and giving up would lose it."""
    mid = rec.id

    def new_uri() -> str | None:
        r = ctx.view.migration(mid)
        return r.target_uri if r is not None and r.target_uri != used_uri else None

    await _note(ctx, mid, "post-copy stream broken: both sides wait (postcopy-paused) for"
                          " the target to listen again")
    while True:
        with contextlib.suppress(FerryError):
            uri = await ctx.view.wait_for(new_uri, timeout=30)
            await local.monitor.migrate(uri, resume=True)
            await _note(ctx, mid, f"post-copy resumed to {uri}")
            return uri
        log.warning("migration %s: still waiting to resume post-copy", mid)


async def await_switch(local: LocalVm) -> None:
    """On the target, once the source committed: wait until the source's QEMU has switched
    (it released the disks and sends the device state) before resuming, which takes the
    disks. As long as it takes: the source finishes in pre-copy if it cannot switch."""
    while not local.exited.is_set():
        info = await local.monitor.query_migrate()
        if info.status.startswith("postcopy") or info.status == "completed":
            return
        await asyncio.sleep(0.01)
    raise QemuError("the target QEMU exited before the switch to post-copy")


async def follow_target(ctx: AgentContext, mid: str, local: LocalVm,
                        events: EventStream) -> int:
    """On the target after the switch: wait until every page has arrived, answering a
    broken stream by listening again and publishing where. Returns the guest's vCPU
    blocktime (ms): the real cost of post-copy to the guest.

    While the stream is broken, QEMU's main loop may block on a missing page (a device
    touching guest memory), and with it every ordinary QMP command: the state comes from
    MIGRATION events, and ``migrate-recover`` goes out of band."""
    status = await _incoming_status(local)
    listening = False
    while status != "completed":
        if local.exited.is_set():
            raise QemuError("the target QEMU exited before every page had arrived")
        if status == "postcopy-paused" and not listening:
            try:
                await _listen_again(ctx, mid, local)
                listening = True
            except FerryError as err:  # e.g. QEMU not quite paused yet: try again
                log.warning("migration %s: cannot listen again yet: %s", mid, err)
        elif status not in ("postcopy-paused", ""):
            listening = False
        try:
            status = (await events.get(timeout=POLL_S)).status
        except QemuError:  # no event: look (a blocked main loop answers nothing)
            if status != "postcopy-paused":
                status = await _incoming_status(local) or status
    info = await local.monitor.query_migrate()
    return info.postcopy_blocktime_ms


async def _incoming_status(local: LocalVm) -> str:
    """The incoming migration's state, or "" if QEMU does not answer in time."""
    try:
        return (await asyncio.wait_for(local.monitor.query_migrate(), 2.0)).status
    except (TimeoutError, QemuError):
        return ""


async def _listen_again(ctx: AgentContext, mid: str, local: LocalVm) -> None:
    rec = ctx.view.migration(mid)
    address = ctx.migration_address(rec.network) if rec is not None else None
    if address is None:
        log.error("migration %s: target has no migration address to recover on", mid)
        return
    uri = f"tcp:{address}:{_free_port(address)}"
    await local.monitor.migrate_recover(uri)
    await ctx.update_record(mid, lambda r: dataclasses.replace(r.note(
        at=time.time(), node=ctx.node, note=f"target listens again at {uri} to resume"
                                            " post-copy"), target_uri=uri))


def _free_port(address: str) -> int:
    """A port free on ``address`` now (QEMU binds it a moment later; the agent runs in the
    node's network namespace, as QEMU does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])

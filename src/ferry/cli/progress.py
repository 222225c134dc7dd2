"""Live display of a migration: phase, percent, rate, dirty rate; then a summary line."""

from __future__ import annotations

import sys
import time

import click

from ferry.cli.output import rate, size
from ferry.control.client import ClusterClient
from ferry.control.migrations import MigrationView, follow
from ferry.model.errors import NotFound
from ferry.model.migration import MigrationPhase, MigrationRecord


def progress_line(view: MigrationView) -> str:
    rec = view.record
    step = rec.phase.step
    text = f"[{step}/7] {rec.phase.value:<18}" if 1 <= step <= 7 else f"{rec.phase.value:<24}"
    p = view.progress
    if p is not None and rec.phase in (MigrationPhase.COPYING_MEMORY,
                                       MigrationPhase.HANDING_OVER_DISKS):
        text += (f" {p.percent:5.1f}%  {rate(p.throughput_bps):>11}"
                 f"  dirty {rate(p.dirty_rate_bps):>11}"
                 f"  pass {p.iterations}  expected downtime {p.expected_downtime_ms} ms")
    if view.cancel_requested and not rec.phase.terminal:
        text += "  (cancelling)"
    return text


def summary_line(rec: MigrationRecord) -> str:
    if rec.phase is not MigrationPhase.COMPLETED:
        return f"migration {rec.id} {rec.phase.value}: {rec.error or 'no reason given'}" + (
            f"; {rec.vm} keeps running on {rec.source}")
    s = rec.summary
    if s is None:
        return f"migration {rec.id} completed"
    switch = f", switchover {s.switchover_ms:.0f} ms" if s.switchover_ms is not None else ""
    return (f"{rec.vm}: {rec.source} -> {rec.target} in {s.total_s:.2f} s"
            f" (QEMU {s.qemu_total_ms} ms), QEMU downtime {s.downtime_ms} ms{switch},"
            f" {size(s.bytes_sent)} sent")


async def watch(cl: ClusterClient, mid: str, *, quiet: bool = False) -> MigrationRecord:
    """Follow a migration to its end, drawing progress; returns the final record. On a
    terminal one line is redrawn; otherwise a line per phase and every half second."""
    tty = sys.stdout.isatty()
    last_phase: MigrationPhase | None = None
    last_print = 0.0
    rec: MigrationRecord | None = None
    async for view in follow(cl, mid):
        rec = view.record
        if quiet:
            continue
        line = progress_line(view)
        if tty:
            click.echo("\r\x1b[2K  " + line, nl=False)
        elif rec.phase is not last_phase or time.monotonic() - last_print > 0.5:
            click.echo("  " + line)
            last_print = time.monotonic()
        last_phase = rec.phase
    if tty and not quiet:
        click.echo()
    if rec is None:
        raise NotFound(f"migration {mid} not found")
    return rec

"""ferry bench: benchmarks that print tables."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import click

from ferry.cli.output import table


@click.group()
def bench() -> None:
    """Benchmarks (they print tables; they are not tests)."""


@bench.command("migrate")
@click.option("--runs", default=5, show_default=True, type=click.IntRange(1, 100))
@click.option("--memory", default="256M", show_default=True)
@click.option("--downtime-ms", default=50, show_default=True, type=int,
              help="Downtime limit for Ferry and the direct run.")
@click.option("--bandwidth", default=None,
              help="max-bandwidth for Ferry and the direct run, e.g. 1G (default: no limit).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Also write every run as JSON here.")
def bench_migrate_cmd(runs: int, memory: str, downtime_ms: int, bandwidth: str | None,
                      out: Path | None) -> None:
    """Ferry's live migration vs. the same migration driven directly on two QEMUs."""
    from ferry.bench.migrate import bench_migrate, summarize
    from ferry.model.vm import parse_size

    out = out or Path("artifacts") / f"bench-migrate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results = asyncio.run(bench_migrate(
        runs=runs, memory_mib=parse_size(memory) // 2**20, downtime_ms=downtime_ms,
        bandwidth=parse_size(bandwidth) if bandwidth else 0,
        say=lambda m: click.echo(f"  {m}"), out=out))
    rows = summarize(results)
    click.echo(f"\nmedians over {runs} runs, {memory} idle guest, TCG:")
    table(["MODE", "OK", "TOTAL S", "QEMU DOWNTIME MS", "SWITCHOVER MS", "CLIENT OUTAGE MS",
           "TCP GAP MS", "TCP SURVIVED"],
          [[s.mode, f"{s.ok}/{s.runs}", f"{s.total_s:.3f}", f"{s.downtime_ms:.0f}",
            f"{s.switchover_ms:.0f}", f"{s.outage_ms:.0f}", f"{s.tcp_gap_ms:.0f}",
            f"{s.tcp_survived}/{s.ok}"] for s in rows])
    by = {s.mode: s for s in rows}
    ratio = by["ferry"].total_s / by["direct"].total_s
    click.echo(f"\nFerry overhead: total time {ratio:.2f}x the direct migration"
               f" (target <= 1.5x); client outage median {by['ferry'].outage_ms:.0f} ms"
               f" (target < 50 ms); QEMU defaults: {by['qemu-defaults'].outage_ms:.0f} ms.")
    click.echo(f"runs written to {out}")

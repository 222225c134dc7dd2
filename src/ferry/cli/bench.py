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


@bench.command("failover")
@click.option("--runs", default=5, show_default=True, type=click.IntRange(1, 50))
@click.option("--memory", default="256M", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Also write every run as JSON here.")
def bench_failover_cmd(runs: int, memory: str, out: Path | None) -> None:
    """Power off the node of an HA VM; time until the VM answers on another node."""
    from ferry.bench.failover import bench_failover
    from ferry.model.vm import parse_size

    out = out or Path("artifacts") / f"bench-failover-{time.strftime('%Y%m%d-%H%M%S')}.json"
    r = asyncio.run(bench_failover(runs=runs, memory_mib=parse_size(memory) // 2**20,
                                   say=lambda m: click.echo(f"  {m}"), out=out))
    click.echo(f"\n{runs} failovers, {memory} guest, TCG; timings: lease TTL {r.lease_ttl}s,"
               f" watchdog {r.watchdog_s:g}s, fence delay {r.fence_delay_s:g}s")
    table(["RUN", "FROM", "TO", "LEASE GONE S", "DECIDED S", "QEMU UP S", "ANSWERS S"],
          [[x.index, x.source, x.target, f"{x.lease_gone_s:.1f}", f"{x.decided_s:.1f}",
            f"{x.qemu_up_s:.1f}", f"{x.answers_s:.1f}"] for x in r.runs]
          + [["median", "", "", f"{r.median('lease_gone_s'):.1f}", f"{r.median('decided_s'):.1f}",
              f"{r.median('qemu_up_s'):.1f}", f"{r.median('answers_s'):.1f}"]])
    answers, cold = r.median("answers_s"), r.cold_start_s
    click.echo(f"\nbaseline: cold start to answering, median {cold:.1f}s over {runs} runs")
    click.echo(f"failover median {answers:.1f}s (target < 15 s) = {answers / cold:.2f}x a cold"
               f" start; detection and fencing add {answers - cold:.1f}s"
               f" (lease expiry {r.median('lease_gone_s'):.1f}s + fence delay).")
    click.echo(f"runs written to {out}")

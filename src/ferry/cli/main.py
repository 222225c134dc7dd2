"""Entry point: the command groups, and the one place errors become one line and an exit code."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import click

from ferry import __version__
from ferry.cli.ha import events
from ferry.cli.lab import lab
from ferry.cli.network import network
from ferry.cli.vm import migration, node, vm
from ferry.model.errors import FerryError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ferry")
def cli() -> None:
    """Ferry: QEMU/KVM virtual machines on a cluster, live migration and failover."""


@cli.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              default=Path("/etc/ferry/ferry.toml"), show_default=True)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def agent(config_path: Path, log_level: str) -> None:
    """Run this node's agent (in the foreground)."""
    from ferry.agent.config import load_config
    from ferry.agent.daemon import run_agent
    from ferry.store.etcd import EtcdStore

    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = load_config(config_path)
    store = EtcdStore(list(config.endpoints), timeout=config.timings.store_timeout_s)
    asyncio.run(run_agent(config, store))


@cli.command(hidden=True)
@click.option("--run-dir", type=click.Path(path_type=Path), required=True)
@click.option("--timeout", type=float, required=True, help="Seconds without food.")
@click.option("--device", type=click.Path(path_type=Path), default=None,
              help="A hardware watchdog to keep fed while this process runs.")
def watchdog(run_dir: Path, timeout: float, device: Path | None) -> None:
    """The node watchdog (the agent starts it): kills HA QEMUs when the agent goes silent."""
    from ferry.ha.watchdog import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run(run_dir, timeout=timeout, hw_device=device)


cli.add_command(events)
cli.add_command(lab)
cli.add_command(node)
cli.add_command(vm)
cli.add_command(migration)
cli.add_command(network)


def _register_optional() -> None:
    from ferry.cli.bench import bench

    cli.add_command(bench)


def main() -> None:
    _register_optional()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except FerryError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # a bug: one line for the user, the trace on request
        if os.environ.get("FERRY_DEBUG"):
            raise
        click.echo(f"internal error (a bug in ferry): {type(err).__name__}: {err}"
                   " (set FERRY_DEBUG=1 for the traceback)", err=True)
        sys.exit(70)

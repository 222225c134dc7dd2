"""ferry bench: benchmarks that print tables."""

from __future__ import annotations

import click


@click.group()
def bench() -> None:
    """Benchmarks (they print tables; they are not tests)."""

"""Running system commands (ip, qemu-img, ...): one place that turns failures into FerryErrors."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence

from ferry.model.errors import FerryError


class CommandFailed(FerryError):
    def __init__(self, argv: Sequence[str], code: int, stderr: str) -> None:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {code}"
        super().__init__(f"{' '.join(argv[:4])}{' ...' if len(argv) > 4 else ''}: {last}")
        self.argv = list(argv)
        self.code = code
        self.stderr = stderr


async def run(*argv: str, check: bool = True, timeout: float = 60.0) -> str:
    """Run a command; return its stdout. CommandFailed if it fails and ``check``."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as err:
        raise CommandFailed(argv, 127, f"{argv[0]} is not installed") from err
    try:
        out, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise CommandFailed(argv, -1, f"timed out after {timeout:.0f}s") from exc
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode or 0, stderr.decode(errors="replace"))
    return out.decode(errors="replace")


def run_sync(*argv: str, check: bool = True, timeout: float = 300.0) -> str:
    """The same, for code that is not in an event loop (the lab, set-up)."""
    try:
        res = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except FileNotFoundError as err:
        raise CommandFailed(argv, 127, f"{argv[0]} is not installed") from err
    except subprocess.TimeoutExpired as err:
        raise CommandFailed(argv, -1, f"timed out after {timeout:.0f}s") from err
    if check and res.returncode != 0:
        raise CommandFailed(argv, res.returncode, res.stderr.decode(errors="replace"))
    return res.stdout.decode(errors="replace")

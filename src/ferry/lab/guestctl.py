"""Talking to a lab guest's HTTP endpoint from the lab's client namespace."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from ferry.model.errors import LabError
from ferry.shell import CommandFailed, run


async def guest_get(client_ns: str, ip: str, path: str, *, timeout: float = 5.0) -> Any:
    """GET http://ip/path from the client namespace; the guest's JSON answer."""
    try:
        # busybox wget's own -T timeout crashes (busybox 1.35): bound it from outside.
        out = await run("ip", "netns", "exec", client_ns, "busybox", "wget", "-q", "-O", "-",
                        f"http://{ip}{path}", timeout=timeout)
    except CommandFailed as err:
        raise LabError(f"guest {ip}{path}: {err}") from err
    try:
        return json.loads(out)
    except json.JSONDecodeError as err:
        raise LabError(f"guest {ip}{path}: not JSON: {out[:200]!r}") from err


async def wait_guest(client_ns: str, ip: str, *, timeout: float = 90.0) -> Any:
    """Wait until the guest answers its status endpoint; return the status."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return await guest_get(client_ns, ip, "/cgi-bin/status", timeout=2)
        except LabError as err:
            last = err
            await asyncio.sleep(0.5)
    raise LabError(f"guest {ip} did not answer within {timeout:.0f}s: {last}")

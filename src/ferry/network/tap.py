"""VM taps on the node's virtual switch.

The tap named in QEMU's ``ifname=`` must exist on the switch before QEMU starts: otherwise
QEMU silently creates a tap that is attached to nothing.
"""

from __future__ import annotations

from ferry.shell import CommandFailed, run


async def link_exists(name: str) -> bool:
    try:
        await run("ip", "-o", "link", "show", "dev", name)
    except CommandFailed:
        return False
    return True


async def ensure_tap(name: str, *, bridge: str) -> None:
    """Create tap ``name`` on ``bridge`` and bring it up; fine if it exists already."""
    try:
        await run("ip", "tuntap", "add", "dev", name, "mode", "tap")
    except CommandFailed:
        if not await link_exists(name):  # "exists" is fine; anything else is not
            raise
    await run("ip", "link", "set", "dev", name, "master", bridge, "up")


async def delete_tap(name: str) -> None:
    if await link_exists(name):
        await run("ip", "link", "delete", "dev", name, check=False)

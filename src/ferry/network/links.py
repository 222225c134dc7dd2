"""A node's links to its configured networks, read from iproute2's JSON output.

``links_from`` is pure (it gets what ``ip -j addr`` and ``ip -j route`` printed);
``read_links`` runs the two commands. Only the kernel's own view counts: the interface that
holds the configured address, its operstate and carrier, and the default route.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ferry.model.errors import FerryError
from ferry.model.network import LinkState, NetworkLink, NetworkRole
from ferry.shell import run


@dataclass(frozen=True)
class Wanted:
    """A network from the agent's configuration."""

    name: str
    role: NetworkRole
    address: str  # the node's address on it (a prefix length, if given, is ignored)

    @property
    def ip(self) -> str:
        return self.address.split("/", 1)[0]


@dataclass(frozen=True)
class _Held:
    """An interface holding an address."""

    ifname: str
    subnet: str
    operstate: str
    flags: frozenset[str]


def _dicts(data: Any) -> list[dict[str, Any]]:
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def _addresses(addrs: Any) -> dict[str, _Held]:
    """address -> the interface holding it, from ``ip -j addr``."""
    held: dict[str, _Held] = {}
    for link in _dicts(addrs):
        flags = frozenset(f for f in link.get("flags", []) if isinstance(f, str))
        for a in _dicts(link.get("addr_info")):
            local, plen = a.get("local"), a.get("prefixlen")
            if not isinstance(local, str) or not isinstance(plen, int):
                continue
            try:
                subnet = str(ipaddress.ip_interface(f"{local}/{plen}").network)
            except ValueError:
                continue
            held[local] = _Held(ifname=str(link.get("ifname", "")), subnet=subnet,
                                operstate=str(link.get("operstate", "")).lower(), flags=flags)
    return held


def _defaults(routes: Any) -> dict[str, str]:
    """interface -> next hop ("" for a direct route) of every default route, including
    each hop of a multipath one."""
    out: dict[str, str] = {}
    for r in _dicts(routes):
        if r.get("dst") != "default":
            continue
        for hop in [r, *_dicts(r.get("nexthops"))]:
            dev = hop.get("dev")
            if isinstance(dev, str):
                out.setdefault(dev, str(hop.get("gateway", "")))
    return out


def link_state(operstate: str, flags: frozenset[str]) -> LinkState:
    """Up only if administratively up and with a carrier. Virtual links without carrier
    tracking report operstate "unknown"; their LOWER_UP flag then decides."""
    if "UP" not in flags:
        return LinkState.DOWN
    if operstate == "up" or (operstate == "unknown" and "LOWER_UP" in flags):
        return LinkState.UP
    return LinkState.DOWN


def links_from(wanted: Sequence[Wanted], addrs: Any, routes: Any) -> tuple[NetworkLink, ...]:
    held = _addresses(addrs)
    defaults = _defaults(routes)
    links = []
    for w in wanted:
        h = held.get(w.ip)
        if h is None:
            links.append(NetworkLink(name=w.name, role=w.role, address=w.ip,
                                     state=LinkState.MISSING))
            continue
        gateway = defaults.get(h.ifname)
        links.append(NetworkLink(
            name=w.name, role=w.role, address=w.ip, state=link_state(h.operstate, h.flags),
            interface=h.ifname, subnet=h.subnet, operstate=h.operstate,
            carrier="LOWER_UP" in h.flags, gateway=gateway or "",
            default_route=gateway is not None))
    return tuple(links)


async def read_links(wanted: Sequence[Wanted]) -> tuple[NetworkLink, ...]:
    """This namespace's links to ``wanted``; FerryError if ip fails or prints nonsense."""
    addrs = await run("ip", "-j", "-4", "addr", "show", timeout=10)
    routes = await run("ip", "-j", "-4", "route", "show", "default", timeout=10)
    try:
        return links_from(wanted, json.loads(addrs or "[]"), json.loads(routes or "[]"))
    except json.JSONDecodeError as err:
        raise FerryError(f"ip printed no JSON: {err}") from err

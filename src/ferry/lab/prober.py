"""The client's view of a VM: a prober that runs in the lab's client namespace.

It sends an ICMP echo request every ``interval`` and, over one TCP connection to the
guest's echo service, a small numbered message every ``interval``. Each answer's arrival
time (CLOCK_MONOTONIC, the same in every namespace) goes to a log file, one line each:

    i <t>          ICMP echo reply
    t <t>          TCP echo answer
    x <t> <why>    the TCP connection broke

``outage(log, t0, t1)`` then reads the longest gap between answers around a time window:
what a client of the VM saw during a migration.

Run: ``ip netns exec <client-ns> python -m ferry.lab.prober --target IP --out FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

ICMP_ECHO = 8
ICMP_REPLY = 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return int(~s & 0xFFFF)


def icmp_packet(ident: int, seq: int) -> bytes:
    payload = struct.pack("!d", time.monotonic())
    header = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, ident, seq)
    csum = _checksum(header + payload)
    return struct.pack("!BBHHH", ICMP_ECHO, 0, csum, ident, seq) + payload


class Prober:
    def __init__(self, target: str, *, port: int, interval: float, out: Path) -> None:
        self.target = target
        self.port = port
        self.interval = interval
        self.out = open(out, "a", buffering=1)
        self.ident = os.getpid() & 0xFFFF

    def _log(self, kind: str, extra: str = "") -> None:
        self.out.write(f"{kind} {time.monotonic():.6f}{(' ' + extra) if extra else ''}\n")

    async def run(self) -> None:
        await asyncio.gather(self._icmp(), self._tcp())

    async def _icmp(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()

        def readable() -> None:
            while True:
                try:
                    data = sock.recv(2048)
                except BlockingIOError:
                    return
                ihl = (data[0] & 0x0F) * 4
                kind, _, _, ident, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                if kind == ICMP_REPLY and ident == self.ident:
                    self._log("i")

        loop.add_reader(sock.fileno(), readable)
        seq = 0
        while True:
            seq = (seq + 1) & 0xFFFF
            try:
                sock.sendto(icmp_packet(self.ident, seq), (self.target, 0))
            except OSError:
                pass  # no route or buffer full during the blackout: the gap shows it
            await asyncio.sleep(self.interval)

    async def _tcp(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.target, self.port), 5)
            except (OSError, TimeoutError) as err:
                self._log("x", f"connect: {err}")
                await asyncio.sleep(0.5)
                continue
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await asyncio.gather(self._tcp_send(writer), self._tcp_recv(reader))
            except (OSError, EOFError, asyncio.IncompleteReadError) as err:
                self._log("x", f"broken: {err!r}")
            writer.close()
            await asyncio.sleep(0.5)

    async def _tcp_send(self, writer: asyncio.StreamWriter) -> None:
        n = 0
        while True:
            n += 1
            writer.write(f"{n}\n".encode())
            await writer.drain()
            await asyncio.sleep(self.interval)

    async def _tcp_recv(self, reader: asyncio.StreamReader) -> None:
        while True:
            line = await reader.readline()
            if not line:
                raise EOFError("connection closed by the guest")
            self._log("t")


@dataclass(frozen=True)
class Outage:
    icmp_gap_ms: float  # longest gap between ICMP answers around the window
    tcp_gap_ms: float  # the same for TCP echo answers
    tcp_survived: bool  # no break, and answers both before and after the window
    icmp_answers: int


def _max_gap(times: list[float], t0: float, t1: float) -> float:
    """Longest gap between consecutive answers, counting the last answer before t0 and the
    first after t1 (an answer missing for the whole window counts as one gap)."""
    before = [t for t in times if t < t0]
    inside = [t for t in times if t0 <= t <= t1]
    after = [t for t in times if t > t1]
    seq = ([before[-1]] if before else [t0]) + inside + ([after[0]] if after else [t1])
    return max((b - a for a, b in itertools.pairwise(seq)), default=0.0) * 1000


def outage(log: Path, t0: float, t1: float) -> Outage:
    icmp: list[float] = []
    tcp: list[float] = []
    broken = False
    for line in log.read_text().splitlines():
        parts = line.split(" ", 2)
        if len(parts) < 2:
            continue
        try:
            t = float(parts[1])
        except ValueError:
            continue
        if parts[0] == "i":
            icmp.append(t)
        elif parts[0] == "t":
            tcp.append(t)
        elif parts[0] == "x" and t0 <= t <= t1 + 1:
            broken = True
    survived = not broken and any(t < t0 for t in tcp) and any(t > t1 for t in tcp)
    return Outage(icmp_gap_ms=_max_gap(icmp, t0, t1), tcp_gap_ms=_max_gap(tcp, t0, t1),
                  tcp_survived=survived, icmp_answers=sum(1 for t in icmp if t0 <= t <= t1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--target", required=True)
    ap.add_argument("--port", type=int, default=7)
    ap.add_argument("--interval-ms", type=float, default=5.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    prober = Prober(args.target, port=args.port, interval=args.interval_ms / 1000, out=args.out)
    try:
        asyncio.run(prober.run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

"""The prober's pure parts: reading its log into an outage, and its ICMP packets."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from ferry.lab.prober import ICMP_ECHO, Outage, _checksum, icmp_packet, outage

T0, T1 = 100.0, 101.0  # the window: e.g. a migration's switchover


def write_log(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "probe.log"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def every(kind: str, start: float, stop: float, step: float = 0.005) -> list[str]:
    n = round((stop - start) / step)
    return [f"{kind} {start + k * step:.6f}" for k in range(n + 1)]


def test_steady_answers_give_the_probe_interval(tmp_path: Path) -> None:
    log = write_log(tmp_path, every("i", 99.0, 102.0) + every("t", 99.0, 102.0))
    out = outage(log, T0, T1)
    assert out.icmp_gap_ms == pytest.approx(5.0, abs=0.01)
    assert out.tcp_gap_ms == pytest.approx(5.0, abs=0.01)
    assert out.tcp_survived
    assert out.icmp_answers == 201


def test_gap_inside_the_window(tmp_path: Path) -> None:
    answers = every("i", 99.0, 100.3) + every("i", 100.38, 102.0)
    tcp = every("t", 99.0, 100.3) + every("t", 100.42, 102.0)
    out = outage(write_log(tmp_path, sorted(answers + tcp, key=lambda s: float(s.split()[1]))),
                 T0, T1)
    assert out.icmp_gap_ms == pytest.approx(80.0, abs=0.01)
    assert out.tcp_gap_ms == pytest.approx(120.0, abs=0.01)
    assert out.tcp_survived


def test_gap_spanning_the_window_start_counts_from_the_last_answer_before(
    tmp_path: Path,
) -> None:
    log = write_log(tmp_path, every("i", 99.0, 99.9) + every("i", 100.1, 102.0))
    assert outage(log, T0, T1).icmp_gap_ms == pytest.approx(200.0, abs=0.01)


def test_gaps_outside_the_window_do_not_count(tmp_path: Path) -> None:
    lines = every("i", 90.0, 95.0) + every("i", 99.0, 102.0) + every("i", 105.0, 106.0)
    assert outage(write_log(tmp_path, lines), T0, T1).icmp_gap_ms == pytest.approx(5.0, abs=0.01)


def test_window_without_answers_is_one_gap_from_the_last_to_the_next(tmp_path: Path) -> None:
    lines = every("i", 99.0, 99.99) + every("i", 101.01, 102.0)
    out = outage(write_log(tmp_path, lines), T0, T1)
    assert out.icmp_gap_ms == pytest.approx(1020.0, abs=0.01)
    assert out.icmp_answers == 0


def test_no_answers_at_all_is_the_whole_window(tmp_path: Path) -> None:
    out = outage(write_log(tmp_path, []), T0, T1)
    assert out == Outage(icmp_gap_ms=1000.0, tcp_gap_ms=1000.0, tcp_survived=False,
                         icmp_answers=0)


def test_no_answer_after_the_window_runs_to_its_end(tmp_path: Path) -> None:
    out = outage(write_log(tmp_path, every("i", 99.0, 100.5)), T0, T1)
    assert out.icmp_gap_ms == pytest.approx(500.0, abs=0.01)


def test_broken_tcp_connection_did_not_survive(tmp_path: Path) -> None:
    lines = (every("t", 99.0, 102.0)
             + ["x 100.500000 broken: ConnectionResetError(104, 'Connection reset by peer')"])
    out = outage(write_log(tmp_path, lines), T0, T1)
    assert not out.tcp_survived


def test_a_break_shortly_after_the_window_counts(tmp_path: Path) -> None:
    lines = every("t", 99.0, 103.0) + ["x 101.900000 broken: EOFError()"]
    assert not outage(write_log(tmp_path, lines), T0, T1).tcp_survived


def test_a_break_long_before_the_window_does_not_count(tmp_path: Path) -> None:
    lines = ["x 50.000000 connect: refused"] + every("t", 99.0, 102.0)
    assert outage(write_log(tmp_path, lines), T0, T1).tcp_survived


def test_tcp_that_never_answers_again_did_not_survive(tmp_path: Path) -> None:
    out = outage(write_log(tmp_path, every("t", 99.0, 100.5)), T0, T1)
    assert not out.tcp_survived


def test_tcp_that_only_started_after_the_window_did_not_survive(tmp_path: Path) -> None:
    out = outage(write_log(tmp_path, every("t", 100.5, 102.0)), T0, T1)
    assert not out.tcp_survived


def test_garbage_lines_are_skipped(tmp_path: Path) -> None:
    lines = ["", "i", "i notanumber", "junk 100.5", "t"] + every("i", 99.0, 102.0)
    out = outage(write_log(tmp_path, lines), T0, T1)
    assert out.icmp_gap_ms == pytest.approx(5.0, abs=0.01)
    assert out.tcp_gap_ms == pytest.approx(1000.0)


# --- ICMP ----------------------------------------------------------------------------


@pytest.mark.parametrize(("ident", "seq"), [(0, 0), (1, 1), (0xFFFF, 0xFFFF), (4242, 17)])
def test_icmp_packet_checksum_is_valid(ident: int, seq: int) -> None:
    packet = icmp_packet(ident, seq)
    # The one's-complement sum over a packet including its checksum is 0xFFFF, so the
    # checksum recomputed over the whole packet is 0.
    assert _checksum(packet) == 0
    kind, code, csum, got_ident, got_seq = struct.unpack("!BBHHH", packet[:8])
    assert (kind, code, got_ident, got_seq) == (ICMP_ECHO, 0, ident, seq)
    zeroed = packet[:2] + b"\0\0" + packet[4:]
    assert _reference_checksum(zeroed) == csum


def test_icmp_packet_carries_a_timestamp() -> None:
    packet = icmp_packet(1, 2)
    assert len(packet) == 16
    (sent,) = struct.unpack("!d", packet[8:])
    assert sent > 0


def _reference_checksum(data: bytes) -> int:
    """RFC 1071, written out independently of the prober's."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@pytest.mark.parametrize("data", [b"", b"\x01", b"\xff\xff", b"\x45\x00\x00\x73\x00\x00",
                                  bytes(range(255)), b"\xff" * 1001])
def test_checksum_matches_rfc_1071(data: bytes) -> None:
    assert _checksum(data) == _reference_checksum(data)

"""The lab guest's pure parts: command line, cpio packing, cache hits, disk records.

Nothing here downloads or boots; the one test that compiles the guest's disk writer (to
check that C and Python agree on the record format) needs gcc, which the set-up installs.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import uuid
from pathlib import Path
from stat import S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG
from typing import Any

import pytest

from ferry.lab import guest
from ferry.lab.diskrecords import (
    RECORD_SIZE,
    DiskRecord,
    check_records,
    decode_record,
    encode_record,
    parse_records,
    read_records,
)
from ferry.lab.guest import (
    CpioEntry,
    build_guest_image,
    guest_cmdline,
    gzip_deterministic,
    pack_cpio,
)
from ferry.model.errors import LabError

BOOT = str(uuid.UUID(int=0x1234))


# --- command line -------------------------------------------------------------------


def test_cmdline_carries_network_and_boot_params() -> None:
    line = guest_cmdline(ip="10.79.0.10", hostname="vm1").split()
    assert "ferry.ip=10.79.0.10/24" in line
    assert "ferry.hostname=vm1" in line
    for param in ("console=ttyS0", "quiet", "panic=-1", "ipv6.disable=1"):
        assert param in line


def test_cmdline_options() -> None:
    line = guest_cmdline(ip="192.0.2.5", prefix_len=16, hostname="web-1", extra="ferry.shell=1",
                         gateway="192.0.2.1", diskwriter_rate=2.5, tag="node-a:17")
    assert line.endswith(" ferry.shell=1")
    for param in ("ferry.ip=192.0.2.5/16", "ferry.gw=192.0.2.1", "ferry.diskwriter=2.5",
                  "ferry.tag=node-a:17"):
        assert param in line.split()


@pytest.mark.parametrize("kwargs", [
    {"ip": "10.0.0.256", "hostname": "vm1"},
    {"ip": "fe80::1", "hostname": "vm1"},
    {"ip": "10.0.0.1", "hostname": "vm 1"},
    {"ip": "10.0.0.1", "hostname": "-vm"},
    {"ip": "10.0.0.1", "hostname": "vm1", "prefix_len": 33},
    {"ip": "10.0.0.1", "hostname": "vm1", "tag": "has space"},
    {"ip": "10.0.0.1", "hostname": "vm1", "tag": "x" * 65},
    {"ip": "10.0.0.1", "hostname": "vm1", "diskwriter_rate": -1},
])
def test_cmdline_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(LabError):
        guest_cmdline(**kwargs)


# --- cpio ---------------------------------------------------------------------------


def parse_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int], int]]:
    """(path, mode, data, rdev, mtime) of every member, in archive order."""
    out: list[tuple[str, int, bytes, tuple[int, int], int]] = []
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos:pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(data)
            return out
        out.append((name, fields[1], body, (fields[9], fields[10]), fields[5]))


def sample_entries() -> list[CpioEntry]:
    return [
        CpioEntry("usr/bin/tool", S_IFREG | 0o755, b"\x7fELF binary"),
        CpioEntry("/init", S_IFREG | 0o755, b"#!/bin/sh\n"),
        CpioEntry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("bin/sh", S_IFLNK | 0o777, b"/bin/busybox"),
        CpioEntry("tmp", S_IFDIR | 0o1777),
    ]


def test_cpio_round_trip_adds_parents_and_sorts() -> None:
    members = parse_newc(pack_cpio(sample_entries()))
    names = [m[0] for m in members]
    assert names == sorted(names)
    assert names == ["bin", "bin/sh", "dev", "dev/console", "init", "tmp", "usr", "usr/bin",
                     "usr/bin/tool"]
    by_name = {m[0]: m for m in members}
    assert by_name["usr/bin/tool"][1:3] == (S_IFREG | 0o755, b"\x7fELF binary")
    assert by_name["bin/sh"][2] == b"/bin/busybox"
    assert by_name["dev/console"][3] == (5, 1)
    assert by_name["usr"][1] == S_IFDIR | 0o755
    assert all(m[4] == 0 for m in members)


def test_cpio_and_gzip_are_deterministic() -> None:
    first = gzip_deterministic(pack_cpio(sample_entries()))
    second = gzip_deterministic(pack_cpio(list(reversed(sample_entries()))))
    assert first == second
    assert parse_newc(gzip.decompress(first))


def test_cpio_tool_reads_the_archive() -> None:
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=pack_cpio(sample_entries()),
                             capture_output=True, check=True).stdout.decode().split()
    assert "usr/bin/tool" in listing and "dev/console" in listing


def test_cpio_rejects_empty_path() -> None:
    with pytest.raises(LabError):
        pack_cpio([CpioEntry("/", S_IFDIR | 0o755)])


# --- the cache ----------------------------------------------------------------------


def test_cached_image_returns_without_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = guest._KernelPackage("linux-image-9.9.9-1-cloud-amd64", "9.9.9-1",
                                   "linux-image-9.9.9-1-cloud-amd64_9.9.9-1_amd64.deb")
    monkeypatch.setattr(guest, "_kernel_package", lambda _cache: package)

    def no_build(*_args: object) -> None:
        raise AssertionError("the cached image was rebuilt")

    monkeypatch.setattr(guest, "_ensure_deb", no_build)
    key = guest._cache_key(package)
    (tmp_path / key).mkdir()
    for name in ("vmlinuz", "initrd.img"):
        (tmp_path / key / name).write_bytes(b"x")
    said: list[str] = []
    image = build_guest_image(tmp_path, progress=said.append)
    assert image.key == key
    assert image.kernel == tmp_path / key / "vmlinuz"
    assert said == [f"cached at {tmp_path / key}"]


def test_cache_key_follows_the_kernel_package() -> None:
    a = guest._KernelPackage("p", "1", "p_1_amd64.deb")
    b = guest._KernelPackage("p", "2", "p_2_amd64.deb")
    assert guest._cache_key(a) == guest._cache_key(a)
    assert guest._cache_key(a) != guest._cache_key(b)


# --- disk records -------------------------------------------------------------------


def write_disk(path: Path, blocks: list[bytes], tail_zero_blocks: int = 4) -> Path:
    path.write_bytes(b"".join(blocks) + bytes(RECORD_SIZE * tail_zero_blocks))
    return path


def test_record_encode_decode() -> None:
    block = encode_record(42, BOOT, 1700000000.25, "node-a:7")
    assert len(block) == RECORD_SIZE
    assert decode_record(block) == DiskRecord(42, BOOT, 1700000000.25, "node-a:7", True)
    damaged = bytearray(block)
    damaged[60] ^= 1
    assert not decode_record(bytes(damaged)).valid


def test_continuous_records(tmp_path: Path) -> None:
    disk = write_disk(tmp_path / "d.raw",
                      [encode_record(n, BOOT, 1.0 * n, "a" if n <= 3 else "b")
                       for n in range(1, 7)])
    records = parse_records(disk)
    assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6]
    check = check_records(records)
    assert (check.continuous, check.count, check.first, check.last) == (True, 6, 1, 6)
    assert (check.gaps, check.bad) == ([], 0)
    assert [(s.first, s.last, s.tag) for s in check.segments] == [(1, 3, "a"), (4, 6, "b")]


def test_gap_damage_and_stop_at_zero(tmp_path: Path) -> None:
    blocks = [encode_record(n, BOOT, 0.0, "t") for n in (1, 2, 5, 6)]
    blocks.insert(2, b"\xff" * RECORD_SIZE)
    after_zero = encode_record(99, BOOT, 0.0, "t")
    disk = write_disk(tmp_path / "d.raw", [*blocks, bytes(RECORD_SIZE), after_zero])
    check = check_records(parse_records(disk))
    assert not check.continuous
    assert (check.count, check.last, check.bad, check.gaps) == (4, 6, 1, [(2, 5)])


def test_empty_disk(tmp_path: Path) -> None:
    check = check_records(parse_records(write_disk(tmp_path / "d.raw", [])))
    assert (check.continuous, check.count, check.first, check.last) == (True, 0, None, None)


def test_read_records_from_qcow2(tmp_path: Path) -> None:
    raw = write_disk(tmp_path / "d.raw", [encode_record(n, BOOT, 0.0, "q") for n in (1, 2, 3)])
    subprocess.run(["truncate", "-s", "1M", str(raw)], check=True)
    qcow = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(qcow)], check=True)
    assert [r.seq for r in read_records(qcow)] == [1, 2, 3]
    with pytest.raises(LabError):
        read_records(tmp_path / "missing.qcow2")


def test_guest_disk_writer_and_host_reader_agree(tmp_path: Path) -> None:
    tool = tmp_path / "diskwriter"
    subprocess.run(["gcc", "-O2", "-o", str(tool), str(guest.GUEST_SRC / "diskwriter.c")],
                   check=True)
    disk = write_disk(tmp_path / "d.raw", [encode_record(n, BOOT, 0.0, "host") for n in (1, 2)],
                      tail_zero_blocks=2048)
    status = tmp_path / "status.json"
    # Rate 0 writes as fast as it can; the timeout's SIGTERM ends it cleanly.
    subprocess.run(["timeout", "0.5", str(tool), "write", str(disk), "0", 'guest "x"',
                    str(status)], check=False)
    check = check_records(parse_records(disk))
    assert check.continuous and check.count > 2
    assert check.segments[0].tag == "host" and check.segments[1].tag == 'guest "x"'
    verify = subprocess.run([str(tool), "verify", str(disk)], capture_output=True, text=True,
                            check=True).stdout
    summary = json.loads(verify)
    assert (summary["records"], summary["last"], summary["continuous"]) == (
        check.count, check.last, True)
    assert json.loads(status.read_text())["last_seq"] == check.last

"""Reads the lab guest's disk-writer records from a VM disk on the host.

The guest's ``diskwriter`` (``ferry/lab/guest/diskwriter.c``) writes 512-byte records to
the raw virtual disk, record ``N`` at byte ``(N-1)*512``:

    0 magic "FERRYDW1" | 8 u64 seq | 16 boot_id[16] | 32 i64 wall-clock ns |
    40 u32 version | 44 u32 tag length | 48 tag[64] | 112 zero | 508 u32 CRC-32 of 0..507

all little-endian; the CRC is zlib's. Records end at the first all-zero block. With these
a test proves, from the host and after the VM has stopped, that every acknowledged write
is there once, in order, and which node (tag) and boot wrote it.
"""

from __future__ import annotations

import itertools
import struct
import subprocess
import tempfile
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ferry.model.errors import LabError

RECORD_SIZE = 512
MAGIC = b"FERRYDW1"
_HEADER = struct.Struct("<8sQ16sqII64s")
_CRC_OFFSET = 508
_TAG_MAX = 64
_ZERO = bytes(RECORD_SIZE)
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class DiskRecord:
    """One block of the written area. ``valid`` is False for a damaged or foreign block,
    whose other fields are then zero or empty."""

    seq: int
    boot_id: str
    timestamp: float
    tag: str
    valid: bool


@dataclass(frozen=True)
class Segment:
    """A run of consecutive records written by one writer (one tag, one boot)."""

    first: int
    last: int
    tag: str
    boot_id: str


@dataclass(frozen=True)
class RecordCheck:
    continuous: bool
    count: int
    first: int | None
    last: int | None
    gaps: list[tuple[int, int]] = field(default_factory=list)
    bad: int = 0
    segments: list[Segment] = field(default_factory=list)


def encode_record(seq: int, boot_id: str, timestamp: float, tag: str) -> bytes:
    """A record exactly as the guest writes it (tests use it to make synthetic disks)."""
    raw_tag = tag.encode("ascii")
    if len(raw_tag) > _TAG_MAX:
        raise LabError(f"record tag longer than {_TAG_MAX} bytes: {tag!r}")
    whole = int(timestamp // 1)
    ns = whole * 1_000_000_000 + round((timestamp - whole) * 1e9)
    body = _HEADER.pack(MAGIC, seq, uuid.UUID(boot_id).bytes, ns, 1, len(raw_tag), raw_tag)
    body = body.ljust(_CRC_OFFSET, b"\0")
    return body + struct.pack("<I", zlib.crc32(body))


def decode_record(block: bytes) -> DiskRecord:
    if len(block) != RECORD_SIZE:
        raise LabError(f"a record is {RECORD_SIZE} bytes, not {len(block)}")
    magic, seq, boot, ns, _version, tag_len, tag = _HEADER.unpack_from(block)
    (crc,) = struct.unpack_from("<I", block, _CRC_OFFSET)
    if magic != MAGIC or tag_len > _TAG_MAX or crc != zlib.crc32(block[:_CRC_OFFSET]):
        return DiskRecord(0, "", 0.0, "", False)
    # Whole seconds apart: a float cannot hold today's time in nanoseconds exactly.
    seconds = ns // 1_000_000_000 + (ns % 1_000_000_000) / 1e9
    return DiskRecord(seq, str(uuid.UUID(bytes=boot)), seconds,
                      tag[:tag_len].decode("ascii", errors="replace"), True)


def parse_records(raw: Path) -> list[DiskRecord]:
    """The records of a raw disk image, up to the first all-zero block."""
    return list(_iter_records(raw))


def _iter_records(raw: Path) -> Iterator[DiskRecord]:
    with raw.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            for off in range(0, len(chunk) - RECORD_SIZE + 1, RECORD_SIZE):
                block = chunk[off:off + RECORD_SIZE]
                if block == _ZERO:
                    return
                yield decode_record(block)


def read_records(disk_path: Path, *, force_share: bool = False) -> list[DiskRecord]:
    """The records on a VM disk of any format QEMU reads (qcow2, raw, ...).

    The disk should belong to a stopped VM: QEMU's image lock refuses a running one
    unless ``force_share`` is set, and then the result may be a torn snapshot.
    """
    disk_path = Path(disk_path)
    if not disk_path.exists():
        raise LabError(f"disk {disk_path} does not exist")
    with tempfile.TemporaryDirectory(prefix="ferry-records-") as tmp:
        raw = Path(tmp) / "disk.raw"
        args = ["qemu-img", "convert", "-O", "raw", str(disk_path), str(raw)]
        if force_share:
            args.insert(2, "-U")
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
        except FileNotFoundError:
            raise LabError("qemu-img is not installed (apt-get install qemu-utils)") from None
        except subprocess.TimeoutExpired:
            raise LabError(f"qemu-img convert of {disk_path} took longer than 300 s") from None
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
            raise LabError(f"cannot read {disk_path}: {lines[-1]}")
        return parse_records(raw)


def check_records(records: Sequence[DiskRecord]) -> RecordCheck:
    """Whether the valid records count 1, 2, 3, ... without a gap, repeat or damage."""
    valid = [r for r in records if r.valid]
    gaps = [(a.seq, b.seq) for a, b in itertools.pairwise(valid) if b.seq != a.seq + 1]
    bad = len(records) - len(valid)
    first = valid[0].seq if valid else None
    continuous = not gaps and bad == 0 and first in (None, 1)
    return RecordCheck(continuous=continuous, count=len(valid), first=first,
                       last=valid[-1].seq if valid else None, gaps=gaps, bad=bad,
                       segments=_segments(valid))


def _segments(valid: Sequence[DiskRecord]) -> list[Segment]:
    segments: list[Segment] = []
    for rec in valid:
        cur = segments[-1] if segments else None
        if cur and (cur.tag, cur.boot_id) == (rec.tag, rec.boot_id) and rec.seq == cur.last + 1:
            segments[-1] = Segment(cur.first, rec.seq, cur.tag, cur.boot_id)
        else:
            segments.append(Segment(rec.seq, rec.seq, rec.tag, rec.boot_id))
    return segments

"""The lab guest: a small Linux built from Debian packages, cached by a hash of its inputs.

The image is Debian's cloud kernel (``linux-image-cloud-amd64``) plus an initramfs with
busybox (Debian's busybox-static), the virtio modules, two static C tools and a few
scripts; the sources of everything that runs in the guest live in ``ferry/lab/guest/``.
It boots in a few seconds under TCG with 256 MB of RAM and needs no disk to run.

Boot it with ``-kernel vmlinuz -initrd initrd.img -append guest_cmdline(...)``, a
virtio-net NIC and, for the disk writer, a virtio-blk disk (``/dev/vda``, raw: no
filesystem). At boot the guest mounts its pseudo filesystems, loads the virtio modules,
configures eth0 from ``ferry.ip=`` (no IPv6), sets its hostname and runs, under busybox
init:

- ICMP echo (the kernel) and a TCP echo service on port 7;
- busybox httpd on port 80 with the endpoints below;
- busybox acpid, so the ACPI power button (QMP ``system_powerdown``) powers the guest
  off in an orderly way: the tools are stopped, then the guest powers off and QEMU exits.

HTTP endpoints (all GET, all answer one JSON object; 400 on bad parameters, 500 when a
tool fails). ``/cgi-bin/status`` is the canonical path; ``/`` serves the same JSON, and
``/status`` redirects (302) to ``/status/``, which does too:

``/cgi-bin/status``
    ``{"hostname", "uptime" (float s, /proc/uptime), "boot_id" (uuid), "ip",
    "diskwriter": {...}, "memdirty": {...}, "echo_connections" (established on port 7)}``;
    a tool that never ran shows ``{"running": false}``, one that ended keeps its last
    figures with ``"running": false``.
``/cgi-bin/memdirty?op=start&mib=W&rate=R``
    Start (or restart) the memory load: working set W MiB, R MiB/s (0 = unlimited).
    Answers its status: ``{"running", "pid", "working_set_mib", "target_rate_mibps",
    "passes", "mib_dirtied", "rate_mibps" (last ~200 ms), "avg_rate_mibps", "elapsed",
    "error"}``. Without ``op`` (or ``op=status``) it only answers the status. A MiB
    counts as dirtied when each of its pages got one 8-byte write, which is what a
    migration sees; so with rate 0 the figures are large (hundreds of GiB/s under TCG).
    With 256 MB of RAM a working set of about 200 MiB is the most that fits; more fails
    with 500 and ``"error": "mmap ...: Cannot allocate memory"``.
``/cgi-bin/memdirty?op=stop``
    Stop it; answers the final status.
``/cgi-bin/diskwriter?op=start&rate=N&tag=T``
    Start (or restart) the disk writer: N records per second (0 = as fast as the disk
    allows), tag T (printable ASCII, at most 64 bytes, e.g. ``node-a:42``). It continues
    the sequence found on the disk. Answers ``{"running", "pid", "device", "tag",
    "target_rate", "rate", "first_seq", "last_seq", "written" (this run), "errors",
    "elapsed", "last_error"}``.
``/cgi-bin/diskwriter?op=stop``
    Stop it after the record in flight; answers the final status.
``/cgi-bin/verify``
    Scan the disk and answer ``{"records", "first", "last", "continuous", "bad_crc",
    "blocks", "gaps": [[after, next], ...], "gaps_truncated", "segments": [{"first",
    "last", "tag", "boot_id"}, ...], "segments_truncated"}``. A segment is a run of
    consecutive records with one tag and boot id: who wrote what.

Kernel command line parameters read by the guest's init (see ``guest_cmdline``):
``ferry.ip=A.B.C.D/N``, ``ferry.gw=A.B.C.D``, ``ferry.hostname=NAME``,
``ferry.disk=/dev/vda``, ``ferry.diskwriter=RATE`` (start the disk writer at boot),
``ferry.tag=TAG`` (its tag), ``ferry.shell=1`` (a shell on the serial console).

On the serial console the boot prints ``ferry-guest: up <uptime> s host=... ip=...
boot_id=...`` once the network is configured, then ``ferry-guest: ready <uptime> s`` once
the echo and HTTP services listen.
"""

from __future__ import annotations

import gzip
import hashlib
import ipaddress
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ferry.model.errors import LabError

DEFAULT_CACHE_DIR = Path("/var/cache/ferry/guest")
# Bump whenever the build itself changes in a way the hashed inputs do not show.
BUILDER_VERSION = "1"
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
APT_LISTS = Path("/var/lib/apt/lists")
GUEST_SRC = Path(__file__).resolve().parent / "guest"
C_TOOLS = ("diskwriter", "memdirty")

# Dependency order, measured on Debian 12's cloud kernel: insmod does not resolve it.
VIRTIO_MODULES = (
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
    "failover", "net_failover", "virtio_net", "virtio_blk",
)
# The ACPI power button reaches busybox acpid as a key press on an evdev device.
POWER_MODULES = ("evdev", "button")
REQUIRED_MODULES = ("virtio_pci", "virtio_net", "virtio_blk")

# The guest's fixed kernel parameters: a serial console; panic=-1 reboots at once instead
# of hanging; no IPv6, whose router solicitations would re-teach switches and mask
# announce tests. The rest skip work that only costs boot time under TCG (about 0.2 s of
# the ~1.8 s from QEMU's start to the first ping answered, measured).
BOOT_PARAMS = (
    "console=ttyS0", "quiet", "panic=-1", "ipv6.disable=1", "tsc=reliable",
    "no_timer_check", "mitigations=off", "8250.nr_uarts=1", "i8042.noaux",
    "cryptomgr.notests",
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class GuestImage:
    """A built guest: boot ``kernel`` with ``initrd``; ``key`` names the build's inputs."""

    kernel: Path
    initrd: Path
    key: str


@dataclass(frozen=True)
class CpioEntry:
    """One initramfs member. ``data`` is a file's content or a symlink's target."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class _KernelPackage:
    name: str
    version: str
    filename: str


@dataclass(frozen=True)
class _KernelFiles:
    release: str
    vmlinuz: bytes
    modules: dict[str, bytes]
    builtin: frozenset[str]


def guest_cmdline(
    *,
    ip: str,
    prefix_len: int = 24,
    hostname: str,
    extra: str = "",
    gateway: str | None = None,
    diskwriter_rate: float | None = None,
    tag: str | None = None,
) -> str:
    """The kernel command line for a lab guest at ``ip/prefix_len`` named ``hostname``.

    ``diskwriter_rate`` starts the disk writer at boot (records/s, 0 = unlimited) with
    ``tag``; ``extra`` is appended verbatim.
    """
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        raise LabError(f"guest ip {ip!r} is not an IPv4 address") from None
    if not 0 < prefix_len <= 32:
        raise LabError(f"guest prefix length {prefix_len} is not in 1..32")
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,61}[A-Za-z0-9])?", hostname):
        raise LabError(f"guest hostname {hostname!r} is not a valid host name")
    params = [*BOOT_PARAMS, f"ferry.ip={addr}/{prefix_len}", f"ferry.hostname={hostname}"]
    if gateway is not None:
        try:
            params.append(f"ferry.gw={ipaddress.IPv4Address(gateway)}")
        except ValueError:
            raise LabError(f"guest gateway {gateway!r} is not an IPv4 address") from None
    if diskwriter_rate is not None:
        if diskwriter_rate < 0:
            raise LabError(f"disk writer rate {diskwriter_rate} is negative")
        params.append(f"ferry.diskwriter={diskwriter_rate:g}")
    if tag is not None:
        # A space would end the parameter; the writer takes printable ASCII only.
        if not re.fullmatch(r"[\x21-\x7e]{0,64}", tag):
            raise LabError(f"tag {tag!r}: at most 64 printable ASCII characters, no spaces")
        params.append(f"ferry.tag={tag}")
    if extra.strip():
        params.append(extra.strip())
    return " ".join(params)


def build_guest_image(
    cache_dir: Path = DEFAULT_CACHE_DIR, *, progress: Progress | None = None
) -> GuestImage:
    """Build the lab guest, or return the cached build for the same inputs at once."""
    say: Progress = progress or (lambda _msg: None)
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LabError(f"cannot create the guest cache {cache_dir}: {err.strerror}") from None
    package = _kernel_package(cache_dir)
    key = _cache_key(package)
    final = cache_dir / key
    image = GuestImage(final / "vmlinuz", final / "initrd.img", key)
    if image.kernel.is_file() and image.initrd.is_file():
        say(f"cached at {final}")
        return image
    _remove_stale_builds(cache_dir)
    deb = _ensure_deb(cache_dir, package, say)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
    try:
        _build_into(work, deb, package, key, say)
        _publish(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"cached at {final}")
    return image


def _build_into(work: Path, deb: Path, package: _KernelPackage, key: str, say: Progress) -> None:
    started = time.monotonic()
    say(f"extracting {deb.name}")
    kernel = _extract_kernel(deb)
    say("compiling guest tools")
    tools = {name: _compile(GUEST_SRC / f"{name}.c", work / name) for name in C_TOOLS}
    say("packing initramfs")
    load_order = [m for m in (*VIRTIO_MODULES, *POWER_MODULES) if m in kernel.modules]
    entries = _guest_entries(kernel, load_order, tools)
    initrd = gzip_deterministic(pack_cpio(entries))
    out = work / "out"
    out.mkdir()
    (out / "vmlinuz").write_bytes(kernel.vmlinuz)
    (out / "initrd.img").write_bytes(initrd)
    manifest = {
        "key": key, "builder_version": BUILDER_VERSION, "kernel_package": package.filename,
        "kernel_release": kernel.release, "modules": load_order,
        "builtin": sorted(m for m in (*VIRTIO_MODULES, *POWER_MODULES) if m in kernel.builtin),
        "busybox_sha256": _sha256(BUSYBOX.read_bytes()), "initrd_bytes": len(initrd),
        "vmlinuz_bytes": len(kernel.vmlinuz), "build_seconds": round(time.monotonic() - started, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _publish(work: Path, final: Path) -> None:
    """Moves a finished build into place in one rename; a concurrent builder of the same
    key may have won the race, and its identical result stands."""
    try:
        os.rename(work / "out", final)
    except OSError:
        if not (final / "initrd.img").is_file():
            raise LabError(f"cannot store the guest image in {final}") from None


def _remove_stale_builds(cache_dir: Path) -> None:
    # Left behind by a builder that was killed; an hour is far longer than any build.
    for path in cache_dir.glob(".build-*"):
        try:
            if time.time() - path.stat().st_mtime > 3600:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _run(args: list[str], what: str, *, cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(
            args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise LabError(f"{what}: {args[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{what}: {args[0]} took longer than {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("W:")]
        detail = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise LabError(f"{what}: {detail}")
    return proc.stdout


def _kernel_package(cache_dir: Path) -> _KernelPackage:
    """The cloud kernel that apt offers now. The answer is remembered until apt's lists
    change (apt-cache alone takes half a second, far more than a cache hit should)."""
    memo = cache_dir / "kernel-package.json"
    try:
        lists = f"{APT_LISTS.stat().st_mtime_ns}"
    except OSError:
        lists = ""
    try:
        saved = json.loads(memo.read_text())
        if lists and saved["lists"] == lists:
            return _KernelPackage(saved["name"], saved["version"], saved["filename"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    package = _ask_apt(cache_dir)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"lists": lists, "name": package.name,
                               "version": package.version, "filename": package.filename}))
    os.replace(tmp, memo)
    return package


def _ask_apt(cache_dir: Path) -> _KernelPackage:
    """apt's current cloud kernel; without apt data, the newest one already downloaded,
    so a machine without package lists can still build."""
    try:
        out = _run(["apt-cache", "show", "--no-all-versions", KERNEL_METAPACKAGE],
                   "looking up the guest kernel")
    except LabError as err:
        cached = sorted((cache_dir / "debs").glob("linux-image-*-cloud-amd64_*.deb"))
        if not cached:
            raise LabError(f"{err} (run apt-get update)") from None
        name, version, _arch = cached[-1].name.split("_")
        return _KernelPackage(name, version.replace("%3a", ":"), cached[-1].name)
    depends = r"^Depends:.*?(linux-image-[\w.+-]+-cloud-amd64) \(= ([^)]+)\)"
    match = re.search(depends, out, re.MULTILINE)
    if not match:
        raise LabError(f"{KERNEL_METAPACKAGE} names no kernel package (run apt-get update)")
    name, version = match.group(1), match.group(2)
    # apt-get download names files like this, an epoch's colon escaped.
    return _KernelPackage(name, version, f"{name}_{version.replace(':', '%3a')}_amd64.deb")


def _ensure_deb(cache_dir: Path, package: _KernelPackage, say: Progress) -> Path:
    debs = cache_dir / "debs"
    debs.mkdir(exist_ok=True)
    deb = debs / package.filename
    if deb.is_file():
        return deb
    say(f"downloading {package.name} {package.version}")
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_dir))
    try:
        # apt's download sandbox user cannot write to a root-owned temporary directory.
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        _run(["apt-get", *sandbox, "download", f"{package.name}={package.version}"],
             f"downloading {package.name}", cwd=tmp)
        got = list(tmp.glob("*.deb"))
        if len(got) != 1:
            raise LabError(f"downloading {package.name}: apt-get left {len(got)} files")
        os.replace(got[0], deb)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return deb


def _cache_key(package: _KernelPackage) -> str:
    digest = hashlib.sha256()

    def feed(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    feed("builder", BUILDER_VERSION.encode())
    # The builder's own source too: a change to what it packs must not hit an old build.
    feed("builder-source", Path(__file__).read_bytes())
    feed("kernel", package.filename.encode())
    feed("modules", " ".join((*VIRTIO_MODULES, *POWER_MODULES)).encode())
    feed("busybox", _busybox().read_bytes())
    for path in sorted(GUEST_SRC.iterdir()):
        if path.is_file():
            feed(f"src/{path.name}", path.read_bytes())
    return digest.hexdigest()[:16]


def _busybox() -> Path:
    if not BUSYBOX.is_file():
        raise LabError(f"{BUSYBOX} is missing (apt-get install busybox-static)")
    return BUSYBOX


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _extract_kernel(deb: Path) -> _KernelFiles:
    """Streams the package's data tarball and keeps only vmlinuz and the wanted modules,
    instead of unpacking ~100 MB of modules to disk."""
    wanted = set(VIRTIO_MODULES) | set(POWER_MODULES)
    vmlinuz: bytes | None = None
    release = ""
    modules: dict[str, bytes] = {}
    builtin_text = ""
    mod_re = re.compile(r"(?:usr/)?lib/modules/[^/]+/kernel/.*/([\w-]+)\.ko(\.xz|\.zst|\.gz)?")
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if not member.isfile():
                    continue
                if re.fullmatch(r"boot/vmlinuz-.+", name):
                    vmlinuz, release = _read_member(tar, member), name[len("boot/vmlinuz-"):]
                elif (m := mod_re.fullmatch(name)) and m.group(1).replace("-", "_") in wanted:
                    raw = _read_member(tar, member)
                    modules[m.group(1).replace("-", "_")] = _decompress(raw, m.group(2), name)
                elif re.fullmatch(r"(?:usr/)?lib/modules/[^/]+/modules\.builtin", name):
                    builtin_text = _read_member(tar, member).decode()
        if proc.wait() != 0:
            raise LabError(f"dpkg-deb cannot read {deb.name}; delete it to download it again")
    if vmlinuz is None:
        raise LabError(f"{deb.name} holds no boot/vmlinuz-*")
    builtin = frozenset(Path(line).name.split(".")[0].replace("-", "_")
                        for line in builtin_text.split())
    missing = [m for m in REQUIRED_MODULES if m not in modules and m not in builtin]
    if missing:
        raise LabError(f"kernel {release} has no {', '.join(missing)}")
    return _KernelFiles(release, vmlinuz, modules, builtin)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:
        raise LabError(f"cannot read {member.name} from the kernel package")
    return handle.read()


def _decompress(data: bytes, suffix: str | None, name: str) -> bytes:
    # The guest's busybox insmod takes plain .ko files only.
    if not suffix:
        return data
    if suffix == ".xz":
        return lzma.decompress(data)
    if suffix == ".gz":
        return gzip.decompress(data)
    try:
        proc = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        raise LabError(f"cannot decompress {name}: install zstd") from None
    return proc.stdout


def _compile(source: Path, out: Path) -> bytes:
    _run(["gcc", "-static", "-O2", "-s", "-Wall", "-o", str(out), str(source)],
         f"compiling {source.name} (needs gcc and libc6-dev)")
    return out.read_bytes()


def _guest_entries(
    kernel: _KernelFiles, load_order: list[str], tools: dict[str, bytes]
) -> list[CpioEntry]:
    def src(name: str) -> bytes:
        return (GUEST_SRC / name).read_bytes()

    entries = [
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("tmp", stat.S_IFDIR | 0o1777),
        *(CpioEntry(d, stat.S_IFDIR | 0o755) for d in ("proc", "sys", "run", "root", "www/status")),
        CpioEntry("init", stat.S_IFREG | 0o755, src("init")),
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, _busybox().read_bytes()),
        CpioEntry("usr/bin/ferryctl", stat.S_IFREG | 0o755, src("ferryctl")),
        CpioEntry("usr/lib/ferry/cgi", stat.S_IFREG | 0o755, src("cgi")),
        CpioEntry("etc/acpi/PWRF/00000080", stat.S_IFREG | 0o755, src("power-button")),
        CpioEntry("etc/hosts", stat.S_IFREG | 0o644, b"127.0.0.1\tlocalhost\n"),
        CpioEntry("lib/modules/ferry/load-order", stat.S_IFREG | 0o644,
                  "".join(f"{m}\n" for m in load_order).encode()),
    ]
    entries += [CpioEntry(f"usr/bin/{name}", stat.S_IFREG | 0o755, data)
                for name, data in tools.items()]
    entries += [CpioEntry(f"lib/modules/ferry/{m}.ko", stat.S_IFREG | 0o644, kernel.modules[m])
                for m in load_order]
    entries += [CpioEntry(f"www/cgi-bin/{name}", stat.S_IFLNK | 0o777, b"/usr/lib/ferry/cgi")
                for name in ("status", "memdirty", "diskwriter", "verify", "index.cgi")]
    entries += [CpioEntry(link, stat.S_IFLNK | 0o777, b"/bin/busybox")
                for link in _busybox_links()]
    return entries


def _busybox_links() -> list[str]:
    out = _run([str(_busybox()), "--list-full"], "listing busybox applets")
    taken = {"init", "bin/busybox"}
    return [ln for ln in out.split() if ln not in taken and "/" in ln]


def pack_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """An uncompressed cpio archive in the kernel's "newc" format, byte-for-byte
    reproducible: sorted paths, parents added, zero mtimes and owners."""
    by_path: dict[str, CpioEntry] = {}
    for entry in entries:
        path = entry.path.strip("/")
        if not path:
            raise LabError("cpio entry with an empty path")
        by_path[path] = CpioEntry(path, entry.mode, entry.data, entry.rdev)
        parent = Path(path).parent
        while str(parent) != ".":
            by_path.setdefault(str(parent), CpioEntry(str(parent), stat.S_IFDIR | 0o755))
            parent = parent.parent
    out = bytearray()
    for ino, path in enumerate(sorted(by_path), start=1):
        entry = by_path[path]
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        out += _cpio_member(path, entry.mode, entry.data, ino, nlink, entry.rdev)
    out += _cpio_member("TRAILER!!!", 0, b"", 0, 1, (0, 0))
    return bytes(out)


def _cpio_member(path: str, mode: int, data: bytes, ino: int, nlink: int,
                 rdev: tuple[int, int]) -> bytes:
    name = path.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    member = bytearray(header + name)
    member += b"\0" * (-len(member) % 4)
    member += data
    member += b"\0" * (-len(member) % 4)
    return bytes(member)


def gzip_deterministic(data: bytes) -> bytes:
    """gzip without a timestamp or file name, so equal inputs give equal bytes."""
    return gzip.compress(data, compresslevel=9, mtime=0)

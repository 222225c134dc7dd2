"""Pure: a VM spec and a node's runtime choices -> QEMU's argv. Runs nothing.

The source and the target of a migration must build identical devices; both call this with
the same spec and the same ``Hardware``, and only ``incoming`` differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ferry.model.vm import VmSpec


@dataclass(frozen=True)
class Hardware:
    """What a node decides about running a VM: the same on both ends of a migration."""

    accel: str  # "kvm" or "tcg"
    cpu_model: str  # a QEMU CPU model: "host" under KVM, a named model otherwise
    vhost: bool = False


@dataclass(frozen=True)
class RunPaths:
    """Files of one QEMU process in the node's run directory."""

    dir: Path

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def qmp_aux(self) -> Path:
        """A second monitor for people and tools, so they never take the agent's."""
        return self.dir / "qmp-aux.sock"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def ha_marker(self) -> Path:
        """Exists while the VM is armed for HA: the node's watchdog and its self-fencing
        kill this QEMU. Written before QEMU starts (or before the store hears it is armed)."""
        return self.dir / "ha"


    @property
    def log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def meta(self) -> Path:
        return self.dir / "meta.json"


def console_log(spec: VmSpec) -> Path:
    """The serial console's log, next to the VM's configuration on its shared volume: one
    file for the VM's whole life, whichever node runs it (only the running copy writes)."""
    return Path(spec.config_path).parent / "console.log"


def vm_uuid(uid: str) -> str:
    """A stable SMBIOS UUID from the VM's 12-hex-digit uid."""
    return f"fe77e000-0000-4000-8000-{uid}"


def build_argv(
    spec: VmSpec,
    *,
    hw: Hardware,
    paths: RunPaths,
    binary: str = "qemu-system-x86_64",
    incoming: bool = False,
) -> list[str]:
    """The whole command line. ``incoming``: wait for a migration stream (``-incoming defer``)
    and stay paused after it (``-S``) until the agent has taken ownership and resumes it."""
    argv = [
        binary,
        "-name", f"guest={spec.name},debug-threads=on",
        "-uuid", vm_uuid(spec.uid),
        "-machine", f"{spec.machine},accel={hw.accel}",
        "-cpu", spec.cpu_model or hw.cpu_model,
        "-m", f"{spec.memory_mib}M",
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-msg", "timestamp=on",
        "-chardev", f"socket,id=qmp,path={paths.qmp},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"socket,id=qmpaux,path={paths.qmp_aux},server=on,wait=off",
        "-mon", "chardev=qmpaux,mode=control",
        "-chardev", f"file,id=console,path={console_log(spec)},append=on",
        "-serial", "chardev:console",
        "-pidfile", str(paths.pidfile),
    ]
    if spec.boot is not None:
        argv += ["-kernel", spec.boot.kernel, "-initrd", spec.boot.initrd,
                 "-append", spec.boot.cmdline]
    for i, disk in enumerate(spec.disks):
        argv += [
            "-blockdev",
            f"driver=file,filename={disk.path},node-name=file{i},locking=on",
            "-blockdev", f"driver={disk.format},file=file{i},node-name=disk{i}",
            "-device", f"virtio-blk-pci,drive=disk{i},id=vblk{i}"
            + (",bootindex=1" if i == 0 and spec.boot is None else ""),
        ]
    for i, nic in enumerate(spec.nics):
        vhost = "on" if hw.vhost else "off"
        argv += [
            "-netdev",
            f"tap,id=net{i},ifname={spec.tap_name(i)},script=no,downscript=no,vhost={vhost}",
            "-device", f"virtio-net-pci,netdev=net{i},mac={nic.mac},id=vnet{i}",
        ]
    if incoming:
        argv += ["-incoming", "defer", "-S"]
    return argv

"""QEMU's command line from a spec: pure, and identical on both ends of a migration."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from ferry.model.vm import BootSpec, DiskSpec, NicSpec, VmSpec
from ferry.qemu.argv import Hardware, RunPaths, build_argv, vm_uuid

TCG = Hardware(accel="tcg", cpu_model="qemu64")
KVM = Hardware(accel="kvm", cpu_model="host")
PATHS = RunPaths(Path("/run/ferry/vm1"))

SPEC = VmSpec(
    name="vm1", uid="0123456789ab", memory_mib=256, vcpus=2, volume="shared0",
    config_path="/vol/vms/vm1/vm.json",
    disks=(DiskSpec(path="/vol/vms/vm1/disk0.qcow2", size_bytes=1 << 30),
           DiskSpec(path="/vol/vms/vm1/data.raw", size_bytes=1 << 20, format="raw")),
    nics=(NicSpec(mac="52:54:00:01:23:45"), NicSpec(mac="52:54:00:01:23:46")),
)
BOOTED = replace(SPEC, boot=BootSpec(kernel="/boot/vmlinuz", initrd="/boot/initrd.gz",
                                     cmdline="console=ttyS0 ferry.ip=10.79.0.10/24"))


def argv(spec: VmSpec = SPEC, *, hw: Hardware = TCG, incoming: bool = False) -> list[str]:
    return build_argv(spec, hw=hw, paths=PATHS, incoming=incoming)


def values(args: list[str], flag: str) -> list[str]:
    """Every argument that follows ``flag``."""
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]


def test_binary_comes_first() -> None:
    assert argv()[0] == "qemu-system-x86_64"
    assert build_argv(SPEC, hw=TCG, paths=PATHS, binary="/opt/qemu")[0] == "/opt/qemu"


def test_incoming_waits_for_the_stream_and_stays_paused() -> None:
    args = argv(incoming=True)
    assert args[-3:] == ["-incoming", "defer", "-S"]
    assert args.count("-incoming") == 1


def test_not_incoming_starts_at_once() -> None:
    args = argv()
    assert "-incoming" not in args
    assert "-S" not in args


@pytest.mark.parametrize("spec", [SPEC, BOOTED])
@pytest.mark.parametrize("hw", [TCG, KVM, Hardware("kvm", "host", vhost=True)])
def test_source_and_target_differ_only_by_the_incoming_flags(spec: VmSpec, hw: Hardware) -> None:
    source = argv(spec, hw=hw)
    target = argv(spec, hw=hw, incoming=True)
    assert target == source + ["-incoming", "defer", "-S"]


def test_each_nic_gets_its_tap_and_mac() -> None:
    args = argv()
    netdevs = values(args, "-netdev")
    assert len(netdevs) == 2
    for i, nic in enumerate(SPEC.nics):
        tap = SPEC.tap_name(i)
        assert f"tap,id=net{i},ifname={tap},script=no,downscript=no,vhost=off" == netdevs[i]
        assert f"virtio-net-pci,netdev=net{i},mac={nic.mac},id=vnet{i}" in values(args, "-device")
    assert SPEC.tap_name(0) != SPEC.tap_name(1)


def test_tap_names_fit_ifnamsiz_and_depend_only_on_the_uid() -> None:
    for i in range(10):
        assert len(SPEC.tap_name(i)) <= 15
    other = replace(SPEC, name="renamed")
    assert other.tap_name(0) == SPEC.tap_name(0)
    assert replace(SPEC, uid="ba9876543210").tap_name(0) != SPEC.tap_name(0)


def test_vhost_follows_the_hardware() -> None:
    args = argv(hw=Hardware("kvm", "host", vhost=True))
    assert all(n.endswith(",vhost=on") for n in values(args, "-netdev"))


def test_no_nics_means_no_netdev() -> None:
    args = argv(replace(SPEC, nics=()))
    assert "-netdev" not in args
    assert not any(d.startswith("virtio-net") for d in values(args, "-device"))


def test_disks_are_blockdevs_with_locking() -> None:
    args = argv()
    assert values(args, "-blockdev") == [
        "driver=file,filename=/vol/vms/vm1/disk0.qcow2,node-name=file0,locking=on",
        "driver=qcow2,file=file0,node-name=disk0",
        "driver=file,filename=/vol/vms/vm1/data.raw,node-name=file1,locking=on",
        "driver=raw,file=file1,node-name=disk1",
    ]
    devices = values(args, "-device")
    assert "virtio-blk-pci,drive=disk0,id=vblk0,bootindex=1" in devices
    assert "virtio-blk-pci,drive=disk1,id=vblk1" in devices
    assert "-drive" not in args


def test_kernel_boot() -> None:
    args = argv(BOOTED)
    assert values(args, "-kernel") == ["/boot/vmlinuz"]
    assert values(args, "-initrd") == ["/boot/initrd.gz"]
    assert values(args, "-append") == ["console=ttyS0 ferry.ip=10.79.0.10/24"]
    # Booting the kernel directly: no disk is the boot device.
    assert not any("bootindex" in d for d in values(args, "-device"))


def test_without_kernel_boot_there_are_no_kernel_args() -> None:
    args = argv()
    for flag in ("-kernel", "-initrd", "-append"):
        assert flag not in args


@pytest.mark.parametrize("hw", [TCG, KVM])
def test_machine_carries_the_accelerator(hw: Hardware) -> None:
    assert values(argv(hw=hw), "-machine") == [f"pc,accel={hw.accel}"]
    assert values(argv(replace(SPEC, machine="q35"), hw=hw), "-machine") == [
        f"q35,accel={hw.accel}"]


def test_cpu_model_defaults_to_the_hardware() -> None:
    assert values(argv(hw=KVM), "-cpu") == ["host"]
    assert values(argv(hw=TCG), "-cpu") == ["qemu64"]


def test_spec_cpu_model_overrides_the_hardware_default() -> None:
    spec = replace(SPEC, cpu_model="Westmere")
    assert values(argv(spec, hw=KVM), "-cpu") == ["Westmere"]
    assert values(argv(spec, hw=TCG), "-cpu") == ["Westmere"]


def test_memory_cpus_name_uuid() -> None:
    args = argv()
    assert values(args, "-m") == ["256M"]
    assert values(args, "-smp") == ["2"]
    assert values(args, "-name") == ["guest=vm1,debug-threads=on"]
    assert values(args, "-uuid") == [vm_uuid("0123456789ab")]
    assert vm_uuid("0123456789ab") == "fe77e000-0000-4000-8000-0123456789ab"


def test_monitors_and_pidfile_live_in_the_run_directory_the_console_on_the_volume() -> None:
    args = argv()
    chardevs = values(args, "-chardev")
    assert f"socket,id=qmp,path={PATHS.qmp},server=on,wait=off" in chardevs
    assert f"socket,id=qmpaux,path={PATHS.qmp_aux},server=on,wait=off" in chardevs
    console = [c for c in chardevs if c.startswith("file,id=console,")]
    assert len(console) == 1 and console[0].endswith("/console.log,append=on")
    assert not console[0].startswith(f"file,id=console,path={PATHS.dir}")
    assert values(args, "-mon") == ["chardev=qmp,mode=control", "chardev=qmpaux,mode=control"]
    assert values(args, "-pidfile") == [str(PATHS.pidfile)]
    assert "-nodefaults" in args
    assert values(args, "-display") == ["none"]


def test_run_paths() -> None:
    d = Path("/run/x")
    p = RunPaths(d)
    files = [p.qmp, p.qmp_aux, p.pidfile, p.log, p.meta]
    assert all(f.parent == d for f in files)
    assert len(set(files)) == len(files)
    assert p.qmp.name == "qmp.sock"

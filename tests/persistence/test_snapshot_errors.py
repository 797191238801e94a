"""Clear errors for bad snapshots and full disks; the PCIe command-line transform."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmfixtures import VmRunner, make_spec

from hostd.rundir import snapshot_meta as meta_path
from hostd.rundir import snapshot_ram
from hostd.vmm import base as snapshot
from hostd.vmm.base import SnapshotInfo, VmSpec
from hostd.vmm.qemu import PciQemuVmm
from hostd.vmm.qemu.hotplug import bars_assigned
from hostd.vmm.qemu.pci import pci_argv
from images.manifest import load_manifest


@pytest.fixture
def d() -> Iterator[Path]:
    p = Path(tempfile.mkdtemp(dir="/tmp", prefix="msn"))
    yield p
    shutil.rmtree(p, ignore_errors=True)


def _spec(d: Path, memory_mb: int = 256) -> VmSpec:
    return VmSpec(sandbox_id="sbx_snaptest", kernel=d / "k", initramfs=d / "i", rootfs=d / "r",
                  run_dir=d / "vm", vcpus=1, memory_mb=memory_mb, disk_mb=64,
                  kernel_cmdline="console=ttyS0")  # fmt: skip


def _write(path: Path, data: bytes, memory_mb: int = 256, size: int | None = None) -> None:
    path.write_bytes(data)
    info = SnapshotInfo(path, len(data) if size is None else size, memory_mb, 1, 0.0, 0.0, 0.0,
                        format=1)
    meta_path(path).write_text(info.to_json())


def test_pci_argv_moves_vsock_to_a_pcie_root_port() -> None:
    argv = ["qemu", "-machine", "microvm,memory-backend=mem", "-append", "console=ttyS0",
            "-chardev", "socket,id=vs,path=/r/vhu.sock",
            "-device", "vhost-user-vsock-device,chardev=vs", "-nodefaults"]  # fmt: skip
    out = pci_argv(argv)
    assert out[out.index("-machine") + 1] == "microvm,memory-backend=mem,pcie=on,acpi=on"
    assert out[out.index("-append") + 1] == "console=ttyS0 pcie_ports=native"
    devs = [out[i + 1] for i, a in enumerate(out) if a == "-device"]
    assert devs[0].startswith("pcie-root-port,id=moru_rp0,")
    assert devs[1] == "vhost-user-vsock-pci,chardev=vs,id=moru_vsock0,bus=moru_rp0"
    assert "vhost-user-vsock-device,chardev=vs" not in out and out[-1] == "-nodefaults"
    assert pci_argv(out) == out
    inc = pci_argv(argv, incoming=True)
    assert pci_argv(out, incoming=True) == inc
    assert "-chardev" not in inc and not any("vsock-pci" in a for a in inc)
    assert inc[-2:] == ["-incoming", "defer"]  # the state is loaded over QMP


def test_restore_unknown_snapshot(d: Path, vm_runner: VmRunner) -> None:
    with pytest.raises(snapshot.SnapshotNotFound, match="no snapshot"):
        vm_runner.run(PciQemuVmm().restore(_spec(d), d / "nope.snap"))


@pytest.mark.parametrize(("ram", "match"), [(None, "no RAM image"), (1 << 20, "the guest had"),
                                            (256 << 20, "bytes, 108 were written")])
def test_restore_refuses_a_format2_snapshot_with_damaged_files(
    d: Path, vm_runner: VmRunner, ram: int | None, match: str
) -> None:
    snap = d / "mem.snap"
    snap.write_bytes(b"QEVM\0\0\0\3" + b"x" * 100)
    info = SnapshotInfo(snap, 4096, 256, 1, 0.0, 0.0, 0.0, state_bytes=snap.stat().st_size)
    meta_path(snap).write_text(info.to_json())
    if ram is not None:
        with snapshot_ram(snap).open("wb") as f:
            f.truncate(ram)
    if ram == 256 << 20:  # RAM image fine, device state grown since it was written
        with snap.open("ab") as f:
            f.write(b"x")
    with pytest.raises(snapshot.SnapshotCorrupt, match=match):
        vm_runner.run(PciQemuVmm().restore(_spec(d), snap))


@pytest.mark.parametrize(
    ("data", "meta", "match"),
    [
        (b"QEVM\0\0\0\3" + b"x" * 100, False, "no metadata"),
        (b"garbage!" * 10, True, "not a QEMU state stream"),
        (b"QEVM\0\0\0\3" + b"x" * 100, "truncated", "bytes, 9999 were written"),
        (b"QEVM\0\0\0\3" + b"x" * 100, "512mb", "512 MiB VM"),
        (b"QEVM\0\0\0\3" + b"x" * 100, "badjson", "unreadable"),
    ],
)
def test_restore_corrupt_snapshot(
    d: Path, vm_runner: VmRunner, data: bytes, meta: object, match: str
) -> None:
    snap = d / "mem.snap"
    if meta is False:
        snap.write_bytes(data)
    elif meta == "truncated":
        _write(snap, data, size=9999)
    elif meta == "512mb":
        _write(snap, data, memory_mb=512)
    elif meta == "badjson":
        _write(snap, data)
        meta_path(snap).write_text(json.dumps({"format": 1, "path": 3}))
    else:
        _write(snap, data)
    with pytest.raises(snapshot.SnapshotCorrupt, match=match):
        vm_runner.run(PciQemuVmm().restore(_spec(d), snap))


def test_save_refuses_without_disk_space_and_leaves_nothing(vm_runner: VmRunner) -> None:
    """A 1 MiB tmpfs cannot hold a 256 MiB guest: refused before the VM is touched."""
    mnt = Path(tempfile.mkdtemp(dir="/tmp", prefix="msmall"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        vm = PciQemuVmm().create(_spec(mnt))  # never started: save must fail before QMP
        with pytest.raises(snapshot.NotEnoughDisk, match="MiB free"):
            vm_runner.run(vm.save(mnt / "mem.snap"))
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        os.rmdir(mnt)


@pytest.mark.vm
def test_restore_of_a_damaged_stream_fails_cleanly_in_qemu(d: Path, vm_runner: VmRunner) -> None:
    """Valid header and metadata, damaged body: QEMU refuses it; processes gone, files kept."""
    manifest = load_manifest("base")
    spec = make_spec(manifest, d / "vm", memory_mb=256, vcpus=1)
    spec.run_dir.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", manifest.rootfs,
                    str(spec.run_dir / "ovl.qcow2")], check=True)  # fmt: skip
    snap = spec.run_dir / "mem.snap"
    _write(snap, b"QEVM\0\0\0\3" + os.urandom(4096))
    with pytest.raises(snapshot.SnapshotCorrupt, match=r"loading snapshot|restoring") as e:
        vm_runner.run(PciQemuVmm().restore(spec, snap), 120)
    print(e.value)
    assert snap.exists() and (spec.run_dir / "ovl.qcow2").exists()
    for pidfile in ("vmm.pid", "vsk.pid"):
        pid = int((spec.run_dir / pidfile).read_text())
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_probe_check_reads_bar_addresses_from_query_pci() -> None:
    """The restored guest probed the vsock device when its BARs have addresses."""
    def pci(address: int) -> list[dict[str, object]]:
        dev = {"qdev_id": "moru_vsock0", "regions": [{"bar": 1, "address": 3221225472},
                                                     {"bar": 4, "address": address}]}  # fmt: skip
        return [{"devices": [{"qdev_id": "moru_rp0", "pci_bridge": {"devices": [dev]}}]}]

    assert bars_assigned(pci(824633720832), "moru_vsock0") is True
    assert bars_assigned(pci((1 << 64) - 1), "moru_vsock0") is False
    assert bars_assigned(pci(0), "moru_vsock0") is False
    assert bars_assigned([{"devices": []}], "moru_vsock0") is None

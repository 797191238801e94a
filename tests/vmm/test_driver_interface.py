"""The driver interface: capabilities a driver lacks fail with a clear VmError, never an
AttributeError; what the QEMU drivers declare matches what they can do."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hostd.vmm.base import SnapshotError, Vm, VmError, Vmm, VmSpec
from hostd.vmm.qemu import PciQemuVmm, QemuVmm


class _MinimalVm(Vm):
    """Only the abstract methods: what a new driver must write at the least."""

    def __init__(self, spec: VmSpec) -> None:
        self.spec = spec

    pids: list[int] = []
    vsock_uds = Path("/nonexistent/v.sock")
    console_log = Path("/nonexistent/console.log")

    async def start(self) -> None: ...
    def is_alive(self) -> bool:
        return True
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    async def destroy(self) -> None: ...


class _MinimalVmm(Vmm):
    name = "minimal"

    def create(self, spec: VmSpec) -> Vm:
        return _MinimalVm(spec)

    async def attach(self, spec: VmSpec) -> Vm:
        return _MinimalVm(spec)


def _spec(tmp: Path) -> VmSpec:
    return VmSpec(sandbox_id="sbx_iface", kernel=tmp / "k", initramfs=tmp / "i",
                  rootfs=tmp / "r", run_dir=tmp / "vm", vcpus=1, memory_mb=64, disk_mb=64,
                  kernel_cmdline="")  # fmt: skip


def test_a_driver_without_persistence_says_so(tmp_path: Path) -> None:
    vmm = _MinimalVmm()
    vm = vmm.create(_spec(tmp_path))
    assert not vm.can_save and not vmm.can_restore and vm.guest_eject_script == ""
    assert vm.vsock_backend_alive() and not vm.vsock_device_dead()
    with pytest.raises(SnapshotError, match="cannot save"):
        asyncio.run(vm.save(tmp_path / "s"))
    with pytest.raises(SnapshotError, match="cannot restore"):
        asyncio.run(vmm.restore(vm.spec, tmp_path / "s"))
    for call in (vm.give_back, vm.restart_vsock_backend, vm.stop):
        with pytest.raises(VmError, match="sbx_iface"):
            asyncio.run(call())


def test_qemu_drivers_declare_what_they_can(tmp_path: Path) -> None:
    mmio, pci = QemuVmm().create(_spec(tmp_path)), PciQemuVmm().create(_spec(tmp_path))
    assert not QemuVmm.can_restore and PciQemuVmm.can_restore
    assert mmio.guest_eject_script == "" and "power" in pci.guest_eject_script
    # Not running: nothing to save yet, and no backend.
    assert not mmio.can_save and not pci.can_save and not pci.vsock_backend_alive()
    with pytest.raises(VmError, match="cannot restart"):
        asyncio.run(mmio.restart_vsock_backend())
    # The saveable device set: vsock on a hot-pluggable PCIe port, RAM shareable.
    argv = pci.qemu_argv()
    assert any("pcie-root-port" in a for a in argv)
    assert any(a.startswith("vhost-user-vsock-pci") for a in argv)

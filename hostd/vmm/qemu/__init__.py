"""The QEMU microvm driver: `QemuVmm` (virtio-mmio devices) and `PciQemuVmm` (what hostd runs:
vsock on a hot-pluggable PCIe port, so VMs can be saved and restored)."""

from hostd.vmm.base import AttachError
from hostd.vmm.qemu.pci import PciQemuVm, PciQemuVmm
from hostd.vmm.qemu.vm import QemuVm, QemuVmm

__all__ = ["AttachError", "PciQemuVm", "PciQemuVmm", "QemuVm", "QemuVmm"]

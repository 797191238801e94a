"""Booting a template as a PciQemuVm (vsock on a hot-pluggable PCIe port) for snapshot tests.

The template's initramfs does not load virtio_pci yet (images: add
virtio_pci_legacy_dev, virtio_pci_modern_dev and virtio_pci to the module
list). Until it does, `pci_initramfs` appends a small cpio to it with those
modules and an extended /etc/moru-modules: the kernel unpacks concatenated
archives in order, later files replacing earlier ones.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from vmfixtures import BootedVm, VmRunner, boot_template

from hostd.cgroups import CgroupManager
from hostd.vmm.qemu import PciQemuVmm
from hostd.vsock import wait_ready
from images.manifest import TemplateManifest, load_manifest

PCI_MODULES = ("virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci")
CACHE = Path("/tmp/moru-test-pci-initramfs")


def _listing(img: Path) -> list[str]:
    out = subprocess.run(["cpio", "-i", "--to-stdout", "etc/moru-modules"], input=img.read_bytes(),
                         capture_output=True, check=False)  # fmt: skip
    return out.stdout.decode().split()


def pci_initramfs(manifest: TemplateManifest) -> Path:
    """The template's initramfs, extended to load virtio_pci (cached by content)."""
    img = Path(manifest.initramfs)
    modules = _listing(img)
    if "virtio_pci.ko" in modules:
        return img
    digest = hashlib.sha256(img.read_bytes()).hexdigest()[:16]
    out = CACHE / f"initramfs-pci-{digest}.img"
    if out.exists():
        return out
    kroot = Path(manifest.kernel).parents[1] / "lib" / "modules" / manifest.kernel_version
    stage = Path(tempfile.mkdtemp(dir="/tmp", prefix="mpci"))
    try:
        (stage / "lib" / "modules").mkdir(parents=True)
        (stage / "etc").mkdir()
        for m in PCI_MODULES:
            src = kroot / "kernel" / "drivers" / "virtio" / f"{m}.ko"
            shutil.copy(src, stage / "lib" / "modules" / f"{m}.ko")
        at = modules.index("virtio.ko") + 1 if "virtio.ko" in modules else 0
        new = modules[:at] + [f"{m}.ko" for m in PCI_MODULES] + modules[at:]
        (stage / "etc" / "moru-modules").write_text("\n".join(new) + "\n")
        files = "\n".join(["etc/moru-modules", *(f"lib/modules/{m}.ko" for m in PCI_MODULES)])
        extra = subprocess.run(["cpio", "-o", "-H", "newc"], cwd=stage, input=files.encode(),
                               capture_output=True, check=True).stdout  # fmt: skip
        CACHE.mkdir(exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(img.read_bytes() + extra)
        tmp.replace(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def boot_pci(
    runner: VmRunner,
    template: str = "base",
    *,
    cgroups: CgroupManager | None = None,
    ready_timeout: float = 600.0,
    **spec_kw: Any,
) -> BootedVm:
    """vmfixtures.boot_template with a PciQemuVm and an initramfs that can hot-plug."""
    manifest = load_manifest(template)
    manifest = replace(manifest, initramfs=str(pci_initramfs(manifest)))
    return boot_template(runner, template, cgroups=cgroups, ready_timeout=ready_timeout,
                         manifest=manifest, vmm=PciQemuVmm, id_prefix="sbx_p", **spec_kw)


def wait_guestd(booted: BootedVm, timeout: float) -> None:
    """Waits until guestd answers Health through the VM's vsock (after boot or restore)."""
    runner = booted.runner
    runner.run(
        wait_ready(booted.vm.vsock_uds, booted.manifest.guestd_port,
                   time.monotonic() + timeout, alive=booted.vm.is_alive),
        timeout + 10,
    )  # fmt: skip
    if booted.channel is None:
        booted.connect()
    booted.wait_health(60)

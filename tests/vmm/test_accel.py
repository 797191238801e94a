"""Accelerator choice: KVM only with a hardware KVM module loaded, else TCG."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostd.vmm import accel


def test_kvm_needs_dev_and_hardware_module(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    mods = tmp_path / "module"
    (mods / "kvm").mkdir(parents=True)
    (mods / "kvm_pvm").mkdir()
    assert not accel.kvm_usable(dev, mods)  # no /dev/kvm
    dev.touch()
    assert not accel.kvm_usable(dev, mods)  # kvm_pvm does not count
    (mods / "kvm_amd").mkdir()
    assert accel.kvm_usable(dev, mods)


def test_resolve_and_args() -> None:
    assert accel.resolve("tcg") == "tcg"
    assert accel.resolve("kvm") == "kvm"
    assert accel.resolve("auto") == ("kvm" if accel.kvm_usable() else "tcg")
    tcg = f"tcg,thread=multi,tb-size={accel.TCG_TB_SIZE_MB}"
    assert accel.qemu_args("tcg")[:2] == ["-accel", tcg]
    assert accel.qemu_args("kvm") == ["-accel", "kvm", "-cpu", "host"]
    with pytest.raises(ValueError, match="accel must be one of"):
        accel.resolve("hvf")


def test_this_host_uses_tcg() -> None:
    # The build machines expose /dev/kvm through kvm_pvm only (DESIGN.md).
    if Path("/sys/module/kvm_intel").exists() or Path("/sys/module/kvm_amd").exists():
        pytest.skip("hardware KVM present on this host")
    assert accel.resolve("auto") == "tcg"


def test_tcg_tells_the_kernel_the_tsc_frequency(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu MHz\t\t: 2445.404\n")
    assert accel.host_tsc_khz(info) == 2445404
    assert accel.host_tsc_khz(tmp_path / "missing") is None
    args = accel.kernel_args("tcg")
    assert args[0].startswith("tsc_early_khz=") and args[1:3] == ["tsc=reliable", "loglevel=5"]
    assert accel.kernel_args("kvm") == []

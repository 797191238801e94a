"""Accelerator choice for QEMU: KVM only where it really works, else TCG.

`/dev/kvm` alone is not enough: on the project's build machines it is backed
by `kvm_pvm`, under which a stock guest kernel dies with emulation failures.
So "auto" takes KVM only when `kvm_intel` or `kvm_amd` is loaded.
"""

from __future__ import annotations

from pathlib import Path

ACCELS = ("auto", "kvm", "tcg")

# TCG's translated-code cache (MiB). A boot alone translates more than any
# size tried, so the whole cache ends up resident: it is most of a VM's memory
# beyond guest RAM. Measured per VM (base, 2 vCPUs, QEMU CPU seconds, same
# runs): 64 MiB costs no CPU against 128 (boot 16.0 vs 16.2 s, a broad guest
# workload 58 vs 59 s) and saves ~64 MiB; 48 MiB made the broad workload 1.4x
# slower, 32 MiB a Python loop 1.9x, 8 MiB the boot 5.8x (cache thrash).
TCG_TB_SIZE_MB = 64

# QEMU arguments per accelerator.
_ARGS: dict[str, list[str]] = {
    "kvm": ["-accel", "kvm", "-cpu", "host"],
    "tcg": ["-accel", f"tcg,thread=multi,tb-size={TCG_TB_SIZE_MB}", "-cpu", "max"],
}


def kvm_usable(dev: Path = Path("/dev/kvm"), sys_module: Path = Path("/sys/module")) -> bool:
    """Whether /dev/kvm exists and is backed by a hardware KVM module."""
    if not dev.exists():
        return False
    return any((sys_module / m).is_dir() for m in ("kvm_intel", "kvm_amd"))


def resolve(accel: str = "auto") -> str:
    """Resolves "auto" -> "kvm" or "tcg"; anything else must be one of ACCELS."""
    if accel not in ACCELS:
        raise ValueError(f"accel must be one of {', '.join(ACCELS)}, not {accel!r}")
    if accel == "auto":
        return "kvm" if kvm_usable() else "tcg"
    return accel


def qemu_args(accel: str = "auto") -> list[str]:
    """The `-accel ... -cpu ...` arguments for accel (resolved first)."""
    return list(_ARGS[resolve(accel)])


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host's TSC frequency in kHz, as the kernel reports it, or None."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("cpu MHz"):
                return round(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def kernel_args(accel: str) -> list[str]:
    """Guest kernel parameters the accelerator needs.

    Under TCG the guest reads the host's TSC, but a loaded host makes the
    kernel's PIT calibration fail ("Unable to calibrate against PIT"); the
    boot then hangs in the delay-loop calibration. Telling the kernel the
    frequency skips the calibration.

    tsc=reliable: every vCPU reads the same host TSC, but the kernel's
    boot-time sync check (timed with delays a loaded host stretches) marked
    it unsynchronized and fell back to the jiffies clocksource: clocks with
    4 ms resolution for every program in the guest, and clock_gettime as a
    real syscall instead of the vDSO (gRPC reads the clock constantly).

    loglevel=5 (after the image's `quiet`): kernel warnings reach the console,
    among them "APIC frequency too slow", which a vCPU starved during the
    APIC timer's calibration leads to and after which the boot never ends
    (hostd.readiness.BootStuck: a fresh VM is booted). A normal boot prints
    nothing more than with `quiet` alone.
    """
    if resolve(accel) != "tcg":
        return []
    khz = host_tsc_khz()
    tsc = [f"tsc_early_khz={khz}", "tsc=reliable"] if khz else []
    return [*tsc, "loglevel=5"]

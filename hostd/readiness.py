"""Waiting for a booting guest's guestd: its console line first, then its vsock port.

vhost-device-vsock 0.3 goes silent for good when a host connection reaches it
while the guest driver is starting the device (guest memory mapped, rings not
yet ready): its worker thread ends on the not-ready queue and nothing answers
again (see QemuVm.vsock_device_dead). Dialling again and again from power-on
hit that window in about one boot in five on a loaded host. So the port is
dialled only once the console says guestd listens (or after a grace period
without that line, for images whose guestd does not log there): by then the
device has been running for seconds. A device found dead (its worker thread
gone) or silent for VSOCK_SILENCE anyway is reported as VsockSilent: the
caller boots a fresh VM rather than waiting out its whole deadline. hostd's
Create, its ready snapshot maker, the test fixtures and the benchmarks all
wait this way.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Protocol, TypeVar

from hostd.vsock import wait_ready

GUESTD_READY_LINE = "guestd listening on vsock"
CONSOLE_GRACE = 120.0  # dial anyway after this long without the line
VSOCK_SILENCE = 30.0  # how long the device may stay silent after the line
# Kernel lines after which a boot never finishes.
STUCK_BOOT_LINES = ("APIC frequency too slow",)
# CPU seconds (VMM and vsock device) a boot may use before guestd's line: a
# cold boot of base under TCG uses 8-11 s, a stuck one spins at 1-2 CPUs.
BOOT_CPU_BUDGET = 30.0
T = TypeVar("T")


class BootingVm(Protocol):
    @property
    def console_log(self) -> Path: ...
    @property
    def vsock_uds(self) -> Path: ...
    def is_alive(self) -> bool: ...
    def vsock_device_dead(self) -> bool: ...
    @property
    def pids(self) -> list[int]: ...


class VsockSilent(Exception):
    """guestd listens (its console says so) but the vsock device never answers."""


class BootStuck(Exception):
    """The guest kernel stopped before guestd (it said so, or spun past BOOT_CPU_BUDGET)."""


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) the processes have used so far; 0 for those gone."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class VmExited(Exception):
    """The VMM process ended while the guest was booting."""


async def wait_console_line(
    vm: BootingVm,
    line: str,
    until: float,
    *,
    interval: float = 0.05,
    cpu_budget: float | None = None,
) -> bool:
    """True once `line` is on the console; False at `until` without it.

    Reads only what the console gained since the last look (plus a line's
    length, in case it straddles two looks), so a chatty console can neither
    hide the line nor make each look cost more. Raises VmExited, and BootStuck
    on a STUCK_BOOT_LINES line or, with `cpu_budget`, once the VM's processes
    have used that many CPU seconds without the line.
    """
    stuck = [s.encode() for s in STUCK_BOOT_LINES]
    offset, keep, tail = 0, max(len(line), *map(len, stuck)), b""
    needle = line.encode()
    while time.monotonic() < until:
        if not vm.is_alive():
            raise VmExited("the VMM exited during boot")
        try:
            with vm.console_log.open("rb") as f:
                f.seek(offset)
                new = f.read()
        except FileNotFoundError:
            new = b""
        offset += len(new)
        if needle in tail + new:
            return True
        for s in stuck:
            if s in tail + new:
                raise BootStuck(f"the guest kernel said {s.decode()!r}: boot stuck")
        if cpu_budget is not None and (used := cpu_seconds(vm.pids)) > cpu_budget:
            raise BootStuck(f"no guestd after {used:.0f} s of the VM's CPU time: boot stuck")
        tail = (tail + new)[-keep:]
        await asyncio.sleep(interval)
    return False


async def wait_guestd(
    vm: BootingVm,
    port: int,
    deadline: float,
    *,
    grace: float = CONSOLE_GRACE,
    silence: float = VSOCK_SILENCE,
    cpu_budget: float | None = BOOT_CPU_BUDGET,
) -> None:
    """Returns once guestd accepts on `port`; `deadline` is a time.monotonic() value.

    Raises VsockSilent or BootStuck (boot a fresh VM), VmExited, or TimeoutError
    past the deadline.
    """
    seen = await wait_console_line(vm, GUESTD_READY_LINE, min(deadline, time.monotonic() + grace),
                                   cpu_budget=cpu_budget)  # fmt: skip
    silent_by = min(deadline, time.monotonic() + silence) if seen else deadline

    def usable() -> bool:  # checked before each dial
        return vm.is_alive() and not vm.vsock_device_dead()

    dead = VsockSilent(
        "the vsock device's worker thread has ended (vhost-device-vsock 0.3 fails for "
        "good on a host connection while its rings are not ready)"
    )
    try:
        await wait_ready(vm.vsock_uds, port, silent_by, alive=usable, interval=0.1)
    except TimeoutError as e:
        if vm.is_alive() and vm.vsock_device_dead():
            raise dead from None
        if seen and silent_by < deadline:
            raise VsockSilent(
                f"guestd listens (console) but the vsock device did not answer in "
                f"{silence:.0f} s ({e})"
            ) from None
        raise
    except OSError as e:  # VsockError: the VM or its vsock device is gone
        if vm.is_alive() and vm.vsock_device_dead():
            raise dead from None
        raise VmExited(f"the VMM exited during boot ({e})") from None


async def while_alive(vm: BootingVm, aw: Awaitable[T], interval: float = 0.05) -> T:
    """aw's result; VmExited as soon as the VM's process is gone (aw cancelled).

    For a call that would otherwise wait out its whole timeout on a dead VM
    (a restored guest's first call waits for the channel to connect)."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait([task], timeout=interval)
            if done:
                return task.result()
            if not vm.is_alive():
                raise VmExited("the VMM exited")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

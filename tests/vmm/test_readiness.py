"""hostd.readiness against a stand-in VM: a console file and a hybrid-vsock socket.

A unix socket that accepts and never answers stands in for a silent
vhost-device-vsock, and a flag for its ended worker thread; the real device's
silence is produced on demand in tests/vmm/test_vsock_silence.py, and real
boots go through the same code in every VM test.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop
from fakevsock import FakeHybridVsock

from hostd.readiness import (
    GUESTD_READY_LINE,
    BootStuck,
    VmExited,
    VsockSilent,
    wait_guestd,
    while_alive,
)


@dataclass
class StandInVm:
    dir: Path
    alive: bool = True
    device_dead: bool = False
    pids: list[int] = field(default_factory=list)
    console_log: Path = field(init=False)
    vsock_uds: Path = field(init=False)

    def __post_init__(self) -> None:
        self.console_log = self.dir / "console.log"
        self.vsock_uds = self.dir / "v.sock"

    def is_alive(self) -> bool:
        return self.alive

    def vsock_device_dead(self) -> bool:
        return self.device_dead

    def say(self, text: str) -> None:
        with self.console_log.open("a") as f:
            f.write(text)


@pytest.fixture
def vm() -> Iterator[StandInVm]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="mr"))
    yield StandInVm(d)
    shutil.rmtree(d, ignore_errors=True)


def run(coro: object) -> None:
    async def main() -> None:
        await asyncio.wait_for(coro, 30)  # type: ignore[arg-type]

    uvloop.run(main())


def test_dials_only_after_the_console_line(vm: StandInVm) -> None:
    async def main() -> None:
        dev = FakeHybridVsock(vm.vsock_uds, {50051})
        await dev.start()  # the port answers from the start ...
        vm.say("[ 1.0] booting\n" + "x" * 10000 + "\n")
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, vm.say, f"noise {GUESTD_READY_LINE[:8]}")  # line split over two looks
        loop.call_later(0.7, vm.say, f"{GUESTD_READY_LINE[8:]}:50051\n")
        t = time.monotonic()
        await wait_guestd(vm, 50051, time.monotonic() + 10)
        assert time.monotonic() - t >= 0.6  # ... but is dialled only after the line
        assert dev.connections == 1  # one dial, not one every few ms during boot
        await dev.close()

    run(main())


def test_silent_device_after_the_line_is_reported_as_such(vm: StandInVm) -> None:
    async def main() -> None:
        mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mute.bind(str(vm.vsock_uds))
        mute.listen(16)  # accepts (in the backlog) and never says OK
        vm.say(f"{GUESTD_READY_LINE}:50051\n")
        t = time.monotonic()
        with pytest.raises(VsockSilent, match="did not answer"):
            await wait_guestd(vm, 50051, time.monotonic() + 20, silence=1.0)
        assert time.monotonic() - t < 5  # not the whole deadline
        mute.close()

    run(main())


def test_without_the_line_dials_after_the_grace_and_times_out_at_the_deadline(
        vm: StandInVm) -> None:
    async def main() -> None:
        with pytest.raises(TimeoutError):
            await wait_guestd(vm, 50051, time.monotonic() + 1.0, grace=0.3)
        dev = FakeHybridVsock(vm.vsock_uds, {50051})
        await dev.start()
        await wait_guestd(vm, 50051, time.monotonic() + 5, grace=0.2)  # image without the line
        await dev.close()

    run(main())


def test_a_dead_vm_ends_the_wait(vm: StandInVm) -> None:
    vm.alive = False
    with pytest.raises(VmExited):
        run(wait_guestd(vm, 50051, time.monotonic() + 10))


def test_a_dead_vsock_device_is_reported_at_once_not_after_the_silence(vm: StandInVm) -> None:
    async def main() -> None:
        mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mute.bind(str(vm.vsock_uds))
        mute.listen(16)  # like the real dead device: connects, never answers
        vm.say(f"{GUESTD_READY_LINE}:50051\n")
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, setattr, vm, "device_dead", True)
        t = time.monotonic()
        with pytest.raises(VsockSilent, match="worker thread has ended"):
            await wait_guestd(vm, 50051, time.monotonic() + 60, silence=30.0)
        assert time.monotonic() - t < 5  # one dial's timeout at most, not the 30 s
        mute.close()

    run(main())


def test_a_dead_vsock_device_before_any_dial_is_not_dialled(vm: StandInVm) -> None:
    vm.device_dead = True
    vm.say(f"{GUESTD_READY_LINE}:50051\n")
    t = time.monotonic()
    with pytest.raises(VsockSilent, match="worker thread"):
        run(wait_guestd(vm, 50051, time.monotonic() + 10))
    assert time.monotonic() - t < 1


def test_a_kernel_without_its_apic_timer_is_reported_stuck_at_once(vm: StandInVm) -> None:
    # What a starved vCPU's APIC calibration ends in; the boot then stops at
    # SMP bring-up (scripts/boot_hang.py reproduces it with real boots).
    vm.say(
        "[    2.2] ..... host bus clock speed is 0.0472 MHz.\n[    2.2] APIC frequency"
        " too slow, disabling apic timer\n[    2.2] x86: Booting SMP configuration:\n"
    )
    t = time.monotonic()
    with pytest.raises(BootStuck, match="APIC frequency too slow"):
        run(wait_guestd(vm, 50051, time.monotonic() + 30))
    assert time.monotonic() - t < 5  # not the deadline


def test_a_boot_past_its_cpu_budget_without_guestd_is_stuck(vm: StandInVm) -> None:
    vm.pids = [os.getpid()]  # this process has used some CPU: over a budget of 0.01 s
    with pytest.raises(BootStuck, match="CPU time"):
        run(wait_guestd(vm, 50051, time.monotonic() + 30, cpu_budget=0.01))
    vm.say(f"{GUESTD_READY_LINE}:50051\n")  # the budget holds only until guestd's line

    async def main() -> None:
        dev = FakeHybridVsock(vm.vsock_uds, {50051})
        await dev.start()
        await wait_guestd(vm, 50051, time.monotonic() + 10, cpu_budget=0.01)
        await dev.close()

    run(main())


def test_while_alive_returns_the_result_of_a_call_on_a_live_vm(vm: StandInVm) -> None:
    async def call() -> str:
        await asyncio.sleep(0.12)
        return "done"

    async def main() -> None:
        assert await while_alive(vm, call(), interval=0.01) == "done"

    run(main())


def test_while_alive_ends_a_pending_call_as_soon_as_the_vm_dies(vm: StandInVm) -> None:
    """A restored guest's first call waits for its channel: on a dead VM it would wait
    out its whole timeout."""
    cancelled = asyncio.Event()

    async def call() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main() -> None:
        asyncio.get_running_loop().call_later(0.1, setattr, vm, "alive", False)
        t0 = time.monotonic()
        with pytest.raises(VmExited):
            await while_alive(vm, call(), interval=0.01)
        assert time.monotonic() - t0 < 5
        assert cancelled.is_set()

    run(main())

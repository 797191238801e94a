"""The vhost-device-vsock 0.3 "silence", produced on demand on a real VM, and its detection.

The device's worker thread ends (silently, for good) when a host connection
reaches it while guest memory is mapped but its rings are not ready. At boot
that window is the moment the guest driver starts the device; QMP `stop` opens
the same window on demand (QEMU stops the rings), so one dial there is enough.
See QemuVm.vsock_device_dead and hostd/readiness.py.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest
from vmfixtures import VmRunner, boot_template, make_spec

from hostd.readiness import VsockSilent, wait_guestd
from hostd.vmm.qemu import QemuVmm
from hostd.vmm.qmp import qmp_command
from hostd.vsock import dial_socket, wait_ready
from images.manifest import load_manifest

pytestmark = pytest.mark.vm


def test_a_dial_while_the_rings_are_stopped_and_its_detection(vm_runner: VmRunner) -> None:
    booted = boot_template(vm_runner, "base")
    vm, port = booted.vm, booted.manifest.guestd_port
    try:
        assert not vm.vsock_device_dead()  # a working device has its worker thread
        assert vm.vsock_rings_ready() is True  # the guest driver started it: rings taken

        async def dial_while_stopped() -> None:
            await qmp_command(vm.qmp_sock, "stop")  # QEMU stops the device's rings
            try:
                sock = await dial_socket(vm.vsock_uds, port, 3.0)
                sock.close()
            except (OSError, TimeoutError):
                pass  # no answer while stopped; what matters is what it did to the device
            await qmp_command(vm.qmp_sock, "cont")

        vm_runner.run(dial_while_stopped())
        if vm.vsock_device_dead():
            # vhost-device-vsock 0.3: dead for good, and reported at once, not after 30 s.
            t = time.monotonic()
            with pytest.raises(VsockSilent, match="worker thread has ended"):
                vm_runner.run(wait_guestd(vm, port, time.monotonic() + 60))
            assert time.monotonic() - t < 5
        else:
            # A device without the bug must answer again after `cont`.
            vm_runner.run(wait_ready(vm.vsock_uds, port, time.monotonic() + 30))
    finally:
        booted.destroy()


def test_a_fresh_backend_shows_no_rings_until_a_device_starts(vm_runner: VmRunner) -> None:
    """What the re-plug after a restore waits for instead of a fixed settle: a backend
    with no device started has no ring in its worker's epoll (a dial would kill it)."""
    tmp = Path(tempfile.mkdtemp(dir="/tmp", prefix="mvr"))  # short: socket paths
    spec = make_spec(load_manifest("base"), tmp / "vm")
    spec.run_dir.mkdir()
    vm = QemuVmm().create(spec)
    try:
        assert vm.vsock_rings_ready() is None  # no backend yet: nothing to see
        vm_runner.run(vm.start_vsock_backend())
        assert vm.vsock_backend_alive()
        assert vm.vsock_rings_ready() is False
    finally:
        vm_runner.run(vm.destroy())
        shutil.rmtree(tmp, ignore_errors=True)
    assert vm.vsock_rings_ready() is None

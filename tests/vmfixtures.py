"""Booted microVMs for tests: `boot_template(runner, "base")` and the `base_vm` fixture.

Tests stay synchronous (sync grpc stubs); the VM, its vsock relay and the
cgroup are driven by an event loop in a background thread (`VmRunner`), the
way hostd drives them on its own loop. Every VM is destroyed at teardown,
its processes killed by pid, its run dir and cgroup removed.

Reuse from any test module:

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
    from vmfixtures import base_vm, vm_runner  # noqa: F401  (fixtures)
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import uvloop

from hostd.cgroups import CgroupManager
from hostd.create import BOOT_ATTEMPTS
from hostd.readiness import BootStuck, VsockSilent, wait_guestd
from hostd.sandbox_cgroup import SandboxCgroup
from hostd.vmm.base import VmSpec
from hostd.vmm.qemu import QemuVm, QemuVmm
from hostd.vsock import VsockRelay
from images.manifest import TemplateManifest, load_manifest
from moru_proto.guest.v1 import (
    filesystem_pb2_grpc,
    guest_pb2,
    guest_pb2_grpc,
    process_pb2_grpc,
)

T = TypeVar("T")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1)]
# Cgroup root of the test suite (hostd itself uses "moru").
TEST_CGROUP_ROOT = f"moru-vt{os.getpid()}"


class VmRunner:
    """An event loop (uvloop, as in hostd) in a daemon thread; `run` executes a coroutine there."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="vm-loop")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 300) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class BootedVm:
    """A VM booted to guestd-ready, with a relay and sync gRPC stubs to its guestd."""

    def __init__(
        self,
        runner: VmRunner,
        vm: QemuVm,
        cgroup: SandboxCgroup | None,
        manifest: TemplateManifest,
        tmp: Path,
    ) -> None:
        self.runner = runner
        self.vm = vm
        self.cgroup = cgroup
        self.manifest = manifest
        self.tmp = tmp
        self.relay = VsockRelay(tmp / "g.sock", vm.vsock_uds, manifest.guestd_port)
        self.channel: grpc.Channel | None = None
        self.boot_seconds = 0.0
        self.destroyed = False

    @property
    def sandbox_id(self) -> str:
        return self.vm.spec.sandbox_id

    def connect(self) -> None:
        self.runner.run(self.relay.start())
        self.channel = grpc.insecure_channel(self.relay.target, options=CHANNEL_OPTIONS)

    @property
    def guest(self) -> guest_pb2_grpc.GuestStub:
        assert self.channel is not None
        return guest_pb2_grpc.GuestStub(self.channel)

    @property
    def process(self) -> process_pb2_grpc.ProcessStub:
        assert self.channel is not None
        return process_pb2_grpc.ProcessStub(self.channel)

    @property
    def fs(self) -> filesystem_pb2_grpc.FilesystemStub:
        assert self.channel is not None
        return filesystem_pb2_grpc.FilesystemStub(self.channel)

    def start(self, make_vm: Callable[[], QemuVm], ready_timeout: float) -> None:
        """Starts the VM and waits for guestd the way hostd does (hostd.readiness): console
        line, then vsock. A VM whose vsock device stays silent or whose boot is stuck is
        replaced once by `make_vm()`, as hostd's Create does (vhost-device-vsock 0.3
        flake; APIC timer calibration of a starved vCPU, hostd.readiness)."""
        t0 = time.monotonic()
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            self.runner.run(self.vm.start())
            try:
                deadline = time.monotonic() + ready_timeout
                self.runner.run(
                    wait_guestd(self.vm, self.manifest.guestd_port, deadline), ready_timeout + 10
                )
                break
            except (VsockSilent, BootStuck):
                if attempt == BOOT_ATTEMPTS:
                    raise
                self.runner.run(self.vm.destroy())
                self.vm = make_vm()
                self.relay = VsockRelay(self.tmp / "g.sock", self.vm.vsock_uds,
                                        self.manifest.guestd_port)  # fmt: skip
        self.connect()
        self.wait_health(30)
        self.boot_seconds = time.monotonic() - t0

    def wait_health(self, timeout: float) -> None:
        """Until guestd answers Health through the relay (it may still be starting)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.guest.Health(guest_pb2.HealthRequest(), timeout=5)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def destroy(self) -> None:
        """Closes the channel and relay, kills the VM, removes its cgroup and files. Idempotent."""
        if self.destroyed:
            return
        if self.channel is not None:
            self.channel.close()
        self.runner.run(self.relay.close())
        self.runner.run(self.vm.destroy())
        if self.cgroup is not None:
            self.runner.run(self.cgroup.remove())
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.destroyed = True


def make_spec(
    manifest: TemplateManifest,
    run_dir: Path,
    *,
    sandbox_id: str | None = None,
    vcpus: int | None = None,
    memory_mb: int | None = None,
    disk_mb: int | None = None,
    cgroup: SandboxCgroup | None = None,
    **kw: Any,
) -> VmSpec:
    sid = sandbox_id or "sbx_t" + secrets.token_hex(5)
    return VmSpec(
        sandbox_id=sid,
        kernel=Path(manifest.kernel),
        initramfs=Path(manifest.initramfs),
        rootfs=Path(manifest.rootfs),
        run_dir=run_dir,
        vcpus=vcpus or manifest.defaults.vcpus,
        memory_mb=memory_mb or manifest.defaults.memory_mb,
        disk_mb=disk_mb or manifest.defaults.disk_mb,
        kernel_cmdline=f"{manifest.kernel_cmdline} moru.hostname={sid}",
        cgroup_procs_files=cgroup.procs_files if cgroup is not None else (),
        **kw,
    )


def boot_template(
    runner: VmRunner,
    template: str,
    *,
    cgroups: CgroupManager | None = None,
    ready_timeout: float = 300.0,
    manifest: TemplateManifest | None = None,
    vmm: Callable[[], Any] = QemuVmm,
    id_prefix: str = "sbx_t",
    **spec_kw: Any,
) -> BootedVm:
    """Boots `template` (or `manifest`) with `vmm()` until guestd answers Health;
    on any failure leaves nothing behind."""
    manifest = manifest or load_manifest(template)
    tmp = Path(tempfile.mkdtemp(dir="/tmp", prefix="mvf"))
    sid = id_prefix + secrets.token_hex(5)
    cgroup = None
    if cgroups is not None:
        cgroup = cgroups.create(
            sid,
            spec_kw.get("vcpus") or manifest.defaults.vcpus,
            (spec_kw.get("memory_mb") or manifest.defaults.memory_mb) << 20,
        )
    spec = make_spec(manifest, tmp / "vm", sandbox_id=sid, cgroup=cgroup, **spec_kw)
    booted = BootedVm(runner, vmm().create(spec), cgroup, manifest, tmp)
    try:
        booted.start(lambda: vmm().create(spec), ready_timeout)
    except BaseException as e:
        tail = booted.vm.console_tail(3000)
        booted.destroy()
        raise RuntimeError(f"booting {template} failed: {e}\n--- console ---\n{tail}") from e
    return booted


@pytest.fixture(scope="session")
def vm_runner() -> Iterator[VmRunner]:
    runner = VmRunner()
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def vm_cgroups() -> Iterator[CgroupManager]:
    """A cgroup manager with a per-session root group, removed at the end."""
    mgr = CgroupManager(TEST_CGROUP_ROOT)
    yield mgr
    mgr.remove_root()


@pytest.fixture(scope="session")
def base_vm(vm_runner: VmRunner, vm_cgroups: CgroupManager) -> Iterator[BootedVm]:
    """One `base` VM (in its own cgroup) shared by a session's tests; destroyed at the end."""
    vm = boot_template(vm_runner, "base", cgroups=vm_cgroups)
    try:
        yield vm
    finally:
        vm.destroy()

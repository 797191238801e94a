"""The QEMU microvm driver on real VMs (TCG here): boot, vsock, pause, attach, destroy, failures."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from vmfixtures import BootedVm, VmRunner, make_spec

from hostd.cgroups import CgroupManager
from hostd.vmm import accel
from hostd.vmm.base import NetAttachment, VmError
from hostd.vmm.qemu import AttachError, QemuVm, QemuVmm
from hostd.vmm.specfile import load_spec
from hostd.vsock import VsockError, dial
from images.manifest import TemplateManifest, load_manifest
from moru_proto.guest.v1 import guest_pb2

pytestmark = pytest.mark.vm


def processes_with(marker: str) -> list[int]:
    """Pids whose command line mentions marker (a run dir): must be none after destroy."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


@pytest.fixture(scope="module")
def manifest() -> TemplateManifest:
    return load_manifest("base")


@pytest.fixture
def run_root() -> Iterator[Path]:
    d = Path(f"/tmp/mq{secrets.token_hex(3)}")
    d.mkdir()
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def test_base_boots_in_its_cgroup(base_vm: BootedVm) -> None:
    vm = base_vm.vm
    assert base_vm.cgroup is not None
    assert set(vm.pids) <= base_vm.cgroup.pids()
    limits = base_vm.cgroup.limits()
    assert limits["cfs_quota_us"] == vm.spec.vcpus * limits["cfs_period_us"]
    assert limits["memory_limit"] > vm.spec.memory_mb << 20
    assert base_vm.cgroup.memory_usage_bytes() > 16 << 20
    cmdline = Path(f"/proc/{vm.pids[0]}/cmdline").read_bytes().split(b"\0")
    tcg = f"tcg,thread=multi,tb-size={accel.TCG_TB_SIZE_MB}".encode()
    assert tcg in cmdline  # no usable KVM on this host
    assert b"vhost-user-vsock-device,chardev=vs" in cmdline
    assert any(a.startswith(b"memory-backend-memfd") and b"share=on" in a for a in cmdline)
    assert "Linux version" in vm.console_log.read_text(errors="replace") or vm.console_tail()
    assert load_spec(vm.spec.run_dir) == vm.spec
    # The overlay is copy-on-write over the template: small, backed by the rootfs.
    overlay = vm.spec.run_dir / "ovl.qcow2"
    assert overlay.stat().st_blocks * 512 < 64 << 20
    info = base_vm.guest.GetInfo(guest_pb2.GetInfoRequest(), timeout=30)
    assert info.hostname == vm.spec.sandbox_id


def test_vsock_dial_direct(base_vm: BootedVm) -> None:
    async def main() -> None:
        r, w = await dial(base_vm.vm.vsock_uds, base_vm.manifest.guestd_port, 10)
        # An HTTP/2 client preface gets the server's SETTINGS frame back.
        w.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        header = await asyncio.wait_for(r.readexactly(9), 30)
        assert header[3] == 4  # frame type SETTINGS
        w.close()
        with pytest.raises(VsockError):
            await dial(base_vm.vm.vsock_uds, 5999, 10)  # nothing listens there

    base_vm.runner.run(main())


def test_relay_carries_grpc(base_vm: BootedVm) -> None:
    for _ in range(20):
        assert base_vm.guest.Health(guest_pb2.HealthRequest(), timeout=30).ok
    second = grpc.insecure_channel(base_vm.relay.target)
    try:
        stub = type(base_vm.guest)(second)
        assert stub.Health(guest_pb2.HealthRequest(), timeout=30).ok
    finally:
        second.close()


def test_pause_stops_cpu_and_resume_answers_within_a_second(base_vm: BootedVm) -> None:
    vm, cg, run = base_vm.vm, base_vm.cgroup, base_vm.runner.run
    assert cg is not None
    run(vm.pause())
    try:
        assert run(vm.status()) == "paused"
        time.sleep(0.3)  # let in-flight work settle
        c0 = cg.cpu_usage_seconds()
        time.sleep(1.0)
        assert cg.cpu_usage_seconds() - c0 < 0.1
        with pytest.raises(grpc.RpcError) as e:
            base_vm.guest.Health(guest_pb2.HealthRequest(), timeout=1)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        run(vm.resume())
    t = time.monotonic()
    assert base_vm.guest.Health(guest_pb2.HealthRequest(), timeout=5).ok
    assert time.monotonic() - t < 1.0
    assert run(vm.status()) == "running"


def test_attach_after_restart(base_vm: BootedVm) -> None:
    run = base_vm.runner.run
    attached = run(QemuVmm().attach(base_vm.vm.spec))
    assert attached.pids == base_vm.vm.pids
    assert attached.is_alive()
    assert not attached.vsock_device_dead()  # its worker thread is found again
    assert attached._vsk_worker_pid == attached.pids[-1]
    run(attached.pause())
    run(attached.resume())
    assert run(attached.status()) == "running"
    assert base_vm.guest.Health(guest_pb2.HealthRequest(), timeout=10).ok


def start_vm(runner: VmRunner, manifest: TemplateManifest, run_root: Path, **kw: Any) -> QemuVm:
    spec = make_spec(manifest, run_root / "vm", memory_mb=256, **kw)
    vm = QemuVmm().create(spec)
    runner.run(vm.start())
    return vm


def test_destroy_after_restart_leaves_nothing(
    vm_runner: VmRunner, vm_cgroups: CgroupManager, manifest: TemplateManifest, run_root: Path
) -> None:
    sid = "sbx_d" + secrets.token_hex(4)
    cg = vm_cgroups.create(sid, 1, 256 << 20)
    vm = start_vm(vm_runner, manifest, run_root, sandbox_id=sid, cgroup=cg)
    pids = vm.pids
    assert len(pids) == 2 and set(pids) == cg.pids()
    # "hostd restarted": a new driver finds the VM from its run dir and ends it.
    attached = vm_runner.run(QemuVmm().attach(load_spec(vm.spec.run_dir)))
    assert attached.pids == pids
    vm_runner.run(attached.destroy())
    vm_runner.run(attached.destroy())  # idempotent
    vm_runner.run(vm.destroy())  # the original object too (reaps its children)
    assert processes_with(str(vm.spec.run_dir)) == []
    assert not vm.spec.run_dir.exists()
    assert cg.pids() == set()
    vm_runner.run(cg.remove())
    assert not cg.exists()


def test_attach_to_a_dead_vm_raises_and_cleans_up(
    vm_runner: VmRunner, manifest: TemplateManifest, run_root: Path
) -> None:
    vm = start_vm(vm_runner, manifest, run_root)
    try:
        os.kill(vm.pids[0], signal.SIGKILL)  # the VMM dies while hostd is away
        assert vm_runner.run(vm.wait_exit(10))
        with pytest.raises(AttachError, match="qemu no longer running") as e:
            vm_runner.run(QemuVmm().attach(vm.spec))
        vm_runner.run(e.value.vm.destroy())  # kills the orphaned vsock device
        assert processes_with(str(vm.spec.run_dir)) == []
        assert not vm.spec.run_dir.exists()
    finally:
        vm_runner.run(vm.destroy())
    with pytest.raises(VmError, match=r"no usable spec\.json"):
        load_spec(vm.spec.run_dir)


def test_bad_kernel_fails_with_console_and_stderr_and_leaves_nothing(
    vm_runner: VmRunner, manifest: TemplateManifest, run_root: Path
) -> None:
    junk = run_root / "junk-kernel"
    junk.write_bytes(b"this is not a kernel" * 100)
    spec = make_spec(manifest, run_root / "vm", memory_mb=256)
    spec = type(spec)(**{**spec.__dict__, "kernel": junk})
    vm = QemuVmm().create(spec)
    with pytest.raises(VmError) as e:
        vm_runner.run(vm.start())
    msg = str(e.value)
    assert "qemu exited" in msg
    assert "--- console tail ---" in msg
    assert "kernel" in msg.split("--- vmm.err ---")[1].lower()  # QEMU's own complaint
    assert not spec.run_dir.exists()
    assert processes_with(str(spec.run_dir)) == []

    missing = type(spec)(**{**spec.__dict__, "kernel": run_root / "nope"})
    with pytest.raises(VmError, match=r"kernel .*nope does not exist"):
        vm_runner.run(QemuVmm().create(missing).start())
    assert not spec.run_dir.exists()


def test_vmm_runs_inside_the_network_namespace(
    vm_runner: VmRunner, manifest: TemplateManifest, run_root: Path
) -> None:
    ns = f"mqn{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    vm = None
    try:
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap"], check=True)
        net = NetAttachment(netns=ns, tap="tap0", mac="02:00:00:00:00:02")
        vm = start_vm(vm_runner, manifest, run_root, net=net)
        vmm_ns = os.stat(f"/proc/{vm.pids[0]}/ns/net").st_ino
        assert vmm_ns == os.stat(f"/run/netns/{ns}").st_ino
        assert os.stat(f"/proc/{vm.pids[1]}/ns/net").st_ino != vmm_ns  # vsock device: host
        cmdline = Path(f"/proc/{vm.pids[0]}/cmdline").read_bytes()
        assert b"virtio-net-device,netdev=n0,mac=02:00:00:00:00:02" in cmdline
        link = subprocess.run(
            ["ip", "-n", ns, "link", "show", "tap0"], capture_output=True, text=True, check=True
        )
        assert "LOWER_UP" in link.stdout or "UP" in link.stdout or "tap0" in link.stdout
    finally:
        if vm is not None:
            vm_runner.run(vm.destroy())
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert processes_with(str(run_root / "vm")) == []

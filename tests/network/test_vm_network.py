"""Sandbox networking with REAL microVMs (QEMU microvm, TCG): the guest init configures
eth0 from ``moru.net=``, QEMU runs in the sandbox's namespace on its tap, and the
commands run in the guest through guestd (gRPC over vsock).
"""

from __future__ import annotations

import dataclasses
import secrets
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostd.network import EgressPolicy, NetworkManager, PortProxy, ProxyTarget, SandboxNetwork
from hostd.network.slots import addresses
from hostd.vmm.qemu import QemuVmm
from images.manifest import load_manifest
from moru_proto.guest.v1 import process_pb2

from .conftest import HOSTS, UPLINK_IP, test_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vmfixtures import BootedVm, VmRunner, make_spec, vm_runner  # noqa: F401

pytestmark = pytest.mark.vm
A, D, OT = HOSTS["allowed.test"], HOSTS["denied.test"], HOSTS["other.test"]


def boot_with_network(runner: VmRunner, net: SandboxNetwork) -> BootedVm:
    manifest = load_manifest("base")
    tmp = Path(tempfile.mkdtemp(dir="/tmp", prefix="mn"))
    spec = make_spec(manifest, tmp / "vm", sandbox_id=net.sandbox_id, net=net.attachment())
    spec = dataclasses.replace(spec, kernel_cmdline=f"{spec.kernel_cmdline} {net.kernel_args()}")
    vm = BootedVm(runner, QemuVmm().create(spec), None, manifest, tmp)
    try:
        # generous: TCG boots on a loaded 2-core machine take minutes
        vm.start(lambda: QemuVmm().create(spec), 420)
    except BaseException as e:
        tail = vm.vm.console_tail(3000)
        vm.destroy()
        raise RuntimeError(f"boot failed: {e}\n{tail}") from e
    return vm


def sh(vm: BootedVm, cmd: str, timeout: float = 60) -> tuple[int, str]:
    req = process_pb2.StartRequest(
        config=process_pb2.ProcessConfig(shell=cmd), timeout_seconds=int(timeout)
    )
    out: list[bytes] = []
    code = None
    for ev in vm.process.Start(req, timeout=timeout + 10):
        kind = ev.WhichOneof("event")
        if kind == "data":
            which = ev.data.WhichOneof("output")
            out.append(getattr(ev.data, which or "stdout"))
        elif kind == "end":
            code = ev.end.exit_code if ev.end.exited else 128 + ev.end.signal
    assert code is not None
    return code, b"".join(out).decode(errors="replace")


def curl(vm: BootedVm, url: str) -> tuple[int, str]:
    return sh(vm, f"curl -sS --max-time 4 {url}")


class VmNet:
    def __init__(self, runner: VmRunner) -> None:
        self.runner = runner
        self.mgr = NetworkManager(test_config())
        self.vms: list[BootedVm] = []

    def boot(self, policy: EgressPolicy) -> tuple[BootedVm, SandboxNetwork]:
        sid = "sbx_v" + secrets.token_hex(4)
        net = self.runner.run(self.mgr.setup(sid, policy))
        vm = boot_with_network(self.runner, net)
        self.vms.append(vm)
        return vm, net

    def update(self, sid: str, policy: EgressPolicy) -> None:
        self.runner.run(self.mgr.update(sid, policy))

    def close(self) -> None:
        for vm in self.vms:
            vm.destroy()
        for vm in self.vms:
            self.runner.run(self.mgr.teardown(vm.sandbox_id))
        self.runner.run(self.mgr.stop(purge=True))


@pytest.fixture(scope="module")
def vmnet(fake_inet: None, vm_runner: VmRunner) -> Iterator[VmNet]:  # noqa: F811
    env = VmNet(vm_runner)
    vm_runner.run(env.mgr.start())
    try:
        yield env
    finally:
        env.close()
        assert env.mgr.list_leftovers() == []


@pytest.fixture(scope="module")
def two_vms(
    vmnet: VmNet,
) -> tuple[tuple[BootedVm, SandboxNetwork], tuple[BootedVm, SandboxNetwork]]:
    return vmnet.boot(EgressPolicy()), vmnet.boot(EgressPolicy())


def test_vm_default_reaches_fake_internet_by_name(two_vms) -> None:  # type: ignore[no-untyped-def]
    (vm, net), _ = two_vms
    code, out = sh(vm, "ip -4 addr show eth0")
    assert code == 0 and f"inet {net.guest_ip}/{net.prefix_len}" in out, out
    code, out = sh(vm, "cat /etc/resolv.conf")
    assert f"nameserver {net.dns}" in out, out
    code, out = curl(vm, "http://allowed.test/")
    assert code == 0 and out.startswith(f"inet {A} /"), out
    code, out = curl(vm, f"http://{OT}/")
    assert code == 0 and out.startswith(f"inet {OT} /"), out


def test_vm_policy_updates_at_run_time(vmnet: VmNet, two_vms) -> None:  # type: ignore[no-untyped-def]
    (vm, net), _ = two_vms
    try:
        vmnet.update(net.sandbox_id, EgressPolicy(allow_internet_access=False))
        assert curl(vm, f"http://{A}/")[0] != 0
        code, out = sh(vm, "getent hosts allowed.test")
        assert code != 0, out
        code, out = sh(
            vm,
            'python3 -c "import socket;s=socket.socket(2,2);s.settimeout(2);'
            f"s.sendto(b'x',('{A}',7));print(s.recv(9))\"",
        )
        assert code != 0, out  # UDP blocked too

        vmnet.update(net.sandbox_id, EgressPolicy(allow_out=["allowed.test"]))
        code, out = curl(vm, "http://allowed.test/")
        assert code == 0 and out.startswith(f"inet {A} /"), out
        assert curl(vm, "http://other.test/")[0] != 0  # not resolved
        assert curl(vm, f"http://{OT}/")[0] != 0  # not allowed

        vmnet.update(net.sandbox_id, EgressPolicy(deny_out=["denied.test", "198.19.0.0/16"]))
        assert curl(vm, "http://allowed.test/")[0] == 0
        assert curl(vm, "http://denied.test/")[0] != 0
        assert curl(vm, f"http://{OT}/")[0] != 0
    finally:
        vmnet.update(net.sandbox_id, EgressPolicy())
    assert curl(vm, f"http://{OT}/")[0] == 0


def test_vms_cannot_reach_each_other_or_host(two_vms) -> None:  # type: ignore[no-untyped-def]
    (vm_a, net_a), (vm_b, net_b) = two_vms
    code, out = sh(
        vm_b,
        "setsid python3 -m http.server 8000 --bind 0.0.0.0 >/dev/null 2>&1 </dev/null & "
        "for i in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:8000/ && exit 0; "
        "sleep 0.2; done; exit 1",
    )
    assert code == 0, out
    # The host reaches B's server directly (this is the port proxy's path).
    with urllib.request.urlopen(f"http://{net_b.guest_ip}:8000/", timeout=10) as r:
        assert r.status == 200
    assert curl(vm_a, f"http://{net_b.guest_ip}:8000/")[0] != 0
    # Nor the host: a server on all of the host's addresses, tried at the
    # sandbox's own host-side veth address and at the uplink's address.
    host = socket.socket()
    host.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    host.bind(("0.0.0.0", 0))
    host.listen(4)
    try:
        port = host.getsockname()[1]
        veth_ip = addresses(test_config().pool, net_a.slot).host_veth_ip
        for ip in (str(veth_ip), UPLINK_IP):
            code, out = sh(vm_a, f"curl -sS --max-time 3 http://{ip}:{port}/")
            assert code != 0 and "Connection refused" not in out, out
    finally:
        host.close()


def test_vm_port_proxy_with_and_without_token(vmnet: VmNet, two_vms) -> None:  # type: ignore[no-untyped-def]
    _, (vm_b, net_b) = two_vms
    token = secrets.token_hex(8)
    targets = {
        net_b.sandbox_id: ProxyTarget(net_b.guest_ip, None),
        "sbx_locked": ProxyTarget(net_b.guest_ip, token),
    }
    proxy = PortProxy(targets.get, "127.0.0.1", 0, "localhost")
    vmnet.runner.run(proxy.start())
    try:
        port = proxy.port
        # The server from the previous test, or start one.
        sh(
            vm_b,
            "curl -s -o /dev/null http://127.0.0.1:8000/ || "
            "(setsid python3 -m http.server 8000 >/dev/null 2>&1 </dev/null & sleep 3)",
        )
        url = f"http://127.0.0.1:{port}/"  # urllib does not map *.localhost to loopback
        req = urllib.request.Request(url, headers={"Host": f"8000-{net_b.sandbox_id}.localhost"})
        with urllib.request.urlopen(req, timeout=20) as r:
            assert r.status == 200 and b"Directory listing" in r.read()
        locked = urllib.request.Request(url, headers={"Host": "8000-sbx_locked.localhost"})
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(locked, timeout=20)
        assert ei.value.code == 403
        locked.add_header("x-moru-traffic-token", token)
        with urllib.request.urlopen(locked, timeout=20) as r:
            assert r.status == 200
    finally:
        vmnet.runner.run(proxy.stop())


def test_teardown_after_vm_leaves_nothing(vmnet: VmNet) -> None:
    vm, net = vmnet.boot(EgressPolicy(deny_out=["denied.test"]))
    assert curl(vm, "http://allowed.test/")[0] == 0
    vm.destroy()
    vmnet.runner.run(vmnet.mgr.teardown(net.sandbox_id))
    assert net.sandbox_id not in vmnet.mgr.list_leftovers()
    assert not Path("/run/netns", net.netns).exists()
    assert not Path("/sys/class/net", net.host_veth).exists()
    assert net.slot not in vmnet.mgr.slots.in_use
    assert not (vmnet.mgr.config.run_dir / net.netns).exists()

"""A hostile guest in a REAL microVM (QEMU, TCG) against its sandbox's network:
forged-source DNS, the node's private networks and metadata service, DNS with
deny-all, floods of new connections and queries. One VM for the module.

Every address involved is a test host in the fake internet namespace the tests
create (conftest: fake_inet, private_hosts); forged packets name only those.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostd.network import EgressPolicy, SandboxNetwork

from .conftest import (
    HELPER,
    HOSTS,
    INET_IP,
    INET_NS,
    METADATA_IP,
    PRIVATE_IP,
    nsexec,
    spawn_in,
    stop_proc,
)
from .test_vm_network import VmNet, sh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vmfixtures import BootedVm, VmRunner, vm_runner  # noqa: F401

pytestmark = pytest.mark.vm
A = HOSTS["allowed.test"]
GUEST_HELPER = "/tmp/nethelpers.py"


@pytest.fixture(scope="module")
def guest(
    fake_inet: None,
    private_hosts: list[str],
    vm_runner: VmRunner,  # noqa: F811
) -> Iterator[tuple[VmNet, BootedVm, SandboxNetwork]]:
    env = VmNet(vm_runner)
    vm_runner.run(env.mgr.start())
    try:
        vm, net = env.boot(EgressPolicy())
        src = Path(HELPER).read_text()
        code, out = sh(vm, f"cat > {GUEST_HELPER} <<'MORU_EOF'\n{src}MORU_EOF\n")
        assert code == 0, out
        yield env, vm, net
    finally:
        env.close()
        assert env.mgr.list_leftovers() == []


def gprobe(vm: BootedVm, checks: list[list[object]]) -> list[Any]:
    code, out = sh(vm, f"python3 {GUEST_HELPER} probe {shlex.quote(json.dumps(checks))}")
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _http_ok(result: object, addr: str) -> bool:
    return isinstance(result, str) and result.startswith(f"inet {addr} ")


def test_vm_spoofed_dns_gets_no_answer_out(guest) -> None:  # type: ignore[no-untyped-def]
    _, vm, net = guest
    listener = spawn_in(INET_NS, sys.executable, HELPER, "listen", A, "5353")
    try:
        assert gprobe(vm, [["dns", "allowed.test", net.gateway]]) == [[A]]
        code, out = sh(vm, f"ip addr add {A}/32 dev eth0")
        assert code == 0, out
        try:
            r = gprobe(vm, [["dnsfrom", "allowed.test", net.gateway, A, 5353]] * 3)
            assert r == ["sent"] * 3, r
        finally:
            sh(vm, f"ip addr del {A}/32 dev eth0")
        # control: what the test host's neighbour sends does arrive
        send = (
            "import socket;s=socket.socket(2,2);"
            f"s.bind(('{INET_IP}',0));s.sendto(b'c',('{A}',5353))"
        )
        nsexec(INET_NS, sys.executable, "-c", send, check=True)
    finally:
        stop_proc(listener)
    assert listener.stdout is not None
    got = [line.strip() for line in listener.stdout if line.startswith("from ")]
    assert got and all(g.startswith(f"from {INET_IP}:") for g in got), got


def test_vm_metadata_and_private_hosts(guest) -> None:  # type: ignore[no-untyped-def]
    env, vm, net = guest
    checks = [["http", METADATA_IP, 80], ["http", PRIVATE_IP, 80], ["http", A, 80]]
    r = gprobe(vm, checks)
    assert r[0].startswith("error:") and r[1].startswith("error:") and _http_ok(r[2], A), r
    try:
        env.update(net.sandbox_id, EgressPolicy(allow_out=["0.0.0.0/0", METADATA_IP, PRIVATE_IP]))
        r = gprobe(vm, checks)
        assert _http_ok(r[0], METADATA_IP) and _http_ok(r[1], PRIVATE_IP) and _http_ok(r[2], A), r
    finally:
        env.update(net.sandbox_id, EgressPolicy())


def test_vm_deny_all_dns_refused(guest) -> None:  # type: ignore[no-untyped-def]
    env, vm, net = guest
    try:
        env.update(net.sandbox_id, EgressPolicy(deny_out=["0.0.0.0/0"]))
        r = gprobe(vm, [["dns", "allowed.test", net.gateway], ["http", A, 80]])
        assert r[0] == "rcode:5" and r[1].startswith("error:"), r
    finally:
        env.update(net.sandbox_id, EgressPolicy())


def test_vm_rate_limits(guest) -> None:  # type: ignore[no-untyped-def]
    env, vm, net = guest
    c = env.mgr.config
    try:
        c.new_conn_rate, c.new_conn_burst, c.dns_rate, c.dns_burst = 1, 5, 1, 5
        env.update(net.sandbox_id, EgressPolicy())  # reloads the rules with these limits
        r = gprobe(vm, [["udpburst", INET_IP, 40], ["dnsburst", net.gateway, 40]])
        # the bursts pass, then about one a second: far from 40 sent at once
        assert 1 <= r[0] < 20 and 1 <= r[1] < 20, r
    finally:
        c.new_conn_rate, c.new_conn_burst, c.dns_rate, c.dns_burst = 0, 0, 0, 0
        env.update(net.sandbox_id, EgressPolicy())
    r = gprobe(vm, [["udpburst", INET_IP, 40], ["dnsburst", net.gateway, 40]])
    assert r == [40, 40], r

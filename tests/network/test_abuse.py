"""A hostile guest against the sandbox's own network: forged source addresses,
the node's private networks and metadata service, DNS as a way out, floods.

The guest is a stand-in namespace plugged where the VM's tap would be (see
conftest); test_vm_abuse.py repeats these with a real microVM.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from hostd.network import EgressPolicy

from .conftest import (
    HELPER,
    HOSTS,
    INET_IP,
    INET_NS,
    METADATA_IP,
    PRIVATE_IP,
    Env,
    StandIn,
    nsexec,
    probe,
    run,
    spawn_in,
    stop_proc,
)

A = HOSTS["allowed.test"]


def _ok(result: object, addr: str) -> bool:
    return isinstance(result, str) and result.startswith(f"inet {addr} ")


@pytest.fixture
def listener() -> Iterator[subprocess.Popen[str]]:
    """A UDP listener on the test host A, port 5353, in the fake internet."""
    p = spawn_in(INET_NS, sys.executable, HELPER, "listen", A, "5353")
    try:
        yield p
    finally:
        stop_proc(p)


def heard(p: subprocess.Popen[str]) -> list[str]:
    stop_proc(p)
    assert p.stdout is not None
    return [line.strip() for line in p.stdout if line.startswith("from ")]


def spoof_dns(s: StandIn, src: str) -> list[object]:
    """The stand-in guest takes src as a second address and sends a query from it."""
    nsexec(s.ns, "ip", "addr", "add", f"{src}/32", "dev", "eth0", check=True)
    try:
        return probe(s.ns, [["dnsfrom", "allowed.test", s.net.gateway, src, 5353]])
    finally:
        nsexec(s.ns, "ip", "addr", "del", f"{src}/32", "dev", "eth0")


def test_spoofed_dns_is_not_answered(env: Env, listener: subprocess.Popen[str]) -> None:
    s = env.sandbox("sbx_spoof")
    assert probe(s.ns, [["dns", "allowed.test", s.net.gateway]]) == [[A]]
    assert spoof_dns(s, A) == ["sent"]
    # control: the listener hears a datagram the test host's neighbour sends it
    nsexec(INET_NS, sys.executable, "-c", _send_udp(INET_IP, A, 5353), check=True)
    got = heard(listener)
    assert got and all(g.startswith(f"from {INET_IP}:") for g in got), got


def _send_udp(src: str, dst: str, port: int) -> str:
    return (
        "import socket;s=socket.socket(2,2);"
        f"s.bind(({src!r},0));s.sendto(b'control',({dst!r},{port}))"
    )


def test_private_ranges_and_metadata_denied_by_default(env: Env, private_hosts: list[str]) -> None:
    checks = [["http", METADATA_IP, 80], ["http", PRIVATE_IP, 80], ["http", A, 80]]
    s = env.sandbox("sbx_priv")
    r = probe(s.ns, checks)
    assert r[0].startswith("error:") and r[1].startswith("error:") and _ok(r[2], A), r
    # 0.0.0.0/0 is not an explicit allowance of the private ranges
    run(env.mgr.update("sbx_priv", EgressPolicy(allow_out=["0.0.0.0/0"])))
    r = probe(s.ns, checks)
    assert r[0].startswith("error:") and r[1].startswith("error:") and _ok(r[2], A), r
    # listed, they are reachable (and the rest of the internet with 0.0.0.0/0)
    allow = ["0.0.0.0/0", METADATA_IP, "172.31.254.0/24"]
    run(env.mgr.update("sbx_priv", EgressPolicy(allow_out=allow)))
    r = probe(s.ns, checks)
    assert _ok(r[0], METADATA_IP) and _ok(r[1], PRIVATE_IP) and _ok(r[2], A), r


@pytest.mark.parametrize(
    "policy",
    [
        EgressPolicy(deny_out=["0.0.0.0/0"]),
        EgressPolicy(allow_out=["allowed.test"], deny_out=["0.0.0.0/0"]),
    ],
)
def test_deny_all_dns_refused_locally(env: Env, policy: EgressPolicy) -> None:
    s = env.sandbox("sbx_denyall", policy)
    r = probe(s.ns, [["dns", "allowed.test", s.net.gateway], ["http", A, 80]])
    assert r[0] == "rcode:5" and r[1].startswith("error:"), r


def test_rate_limits_new_connections_and_dns(env: Env) -> None:
    c = env.mgr.config
    c.new_conn_rate, c.new_conn_burst, c.dns_rate, c.dns_burst = 1, 5, 1, 5
    s = env.sandbox("sbx_flood")
    r = probe(s.ns, [["udpburst", INET_IP, 40], ["dnsburst", s.net.gateway, 40]])
    # the bursts pass, then about one a second: far from 40 (sent in well under a second)
    assert 1 <= r[0] < 20 and 1 <= r[1] < 20, r
    c.new_conn_rate = c.dns_rate = 0  # off: every request is answered
    run(env.mgr.update("sbx_flood", EgressPolicy()))
    r = probe(s.ns, [["udpburst", INET_IP, 40], ["dnsburst", s.net.gateway, 40]])
    assert r == [40, 40], r

"""Fixtures: a "fake internet" namespace and guest stand-ins.

The fake internet is a namespace ``mtfake-inet`` joined to the host by a veth
pair (host end ``fiup0``, the tests' uplink). It serves HTTP/UDP/TCP on
several addresses and answers DNS for test names; hostd's uplink and DNS
upstream point at it, so no packet and no query leaves the machine.

Guest stand-in: until a test boots a real VM, a namespace plays the guest. The
sandbox's tap (which only a VMM can open) is replaced by a veth end with the
same name and the tap's address, so the sandbox's rules apply unchanged; the
other end is the stand-in guest's eth0. Tests that use it say so.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pyroute2 import IPRoute, NetNS, netns

from hostd.network import EgressPolicy, NetworkConfig, NetworkManager, SandboxNetwork

HELPER = str(Path(__file__).with_name("nethelpers.py"))
INET_NS = "mtfake-inet"
UPLINK = "fiup0"
UPLINK_IP = "198.18.0.1"
INET_IP = "198.18.0.2"
DNS_IP = "198.18.0.53"
# name -> address served by the fake internet
HOSTS = {
    "allowed.test": "198.18.1.1",
    "denied.test": "198.18.2.1",
    "other.test": "198.19.0.1",
}
SERVED = [INET_IP, *HOSTS.values()]
ROUTED = ["198.18.1.0/24", "198.18.2.0/24", "198.19.0.0/16"]
# Test hosts in ranges sandboxes may not reach by default (see private_hosts).
METADATA_IP = "169.254.169.254"
PRIVATE_IP = "172.31.254.1"
TEST_POOL = "10.201.0.0/16"
PRIVATE_TABLE = "2201"

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def nsexec(ns: str, *argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", *argv], text=True, capture_output=True, **kw
    )


def spawn_in(ns: str, *argv: str) -> subprocess.Popen[str]:
    """Starts a server in ns and waits for its "ready" line."""
    p = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{ns}", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    if "ready" not in line:
        p.kill()
        err = p.stderr.read() if p.stderr else ""
        raise RuntimeError(f"server in {ns} did not start: {line} {err}")
    return p


def stop_proc(p: subprocess.Popen[Any]) -> None:
    p.terminate()
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def probe(ns: str, checks: list[list[Any]]) -> list[Any]:
    r = nsexec(ns, sys.executable, HELPER, "probe", json.dumps(checks), timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _cleanup_ns(name: str) -> None:
    if Path("/run/netns", name).exists():
        netns.remove(name)


@pytest.fixture(scope="session")
def fake_inet() -> Iterator[None]:
    _cleanup_ns(INET_NS)
    with IPRoute() as ip:
        for idx in ip.link_lookup(ifname=UPLINK):
            ip.link("del", index=idx)
    netns.create(INET_NS)
    procs: list[subprocess.Popen[Any]] = []
    try:
        with IPRoute() as ip:
            peer = {"ifname": "eth0", "net_ns_fd": INET_NS}
            ip.link("add", ifname=UPLINK, kind="veth", peer=peer)
            idx = ip.link_lookup(ifname=UPLINK)[0]
            ip.addr("add", index=idx, address=UPLINK_IP, prefixlen=24)
            ip.link("set", index=idx, state="up")
            for dst in ROUTED:
                ip.route("add", dst=dst, gateway=INET_IP, oif=idx)
        with NetNS(INET_NS) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            e = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=e, address=INET_IP, prefixlen=24)
            for a in [*HOSTS.values(), DNS_IP]:
                ns.addr("add", index=e, address=a, prefixlen=32)
            ns.link("set", index=e, state="up")
        time.sleep(0.1)
        procs.append(spawn_in(INET_NS, sys.executable, HELPER, "serve", "inet", *SERVED))
        dns = [
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            f"--listen-address={DNS_IP}",
            "--log-facility=/dev/null",
            *(f"--address=/{n}/{a}" for n, a in HOSTS.items()),
        ]
        procs.append(subprocess.Popen(["nsenter", f"--net=/run/netns/{INET_NS}", *dns], text=True))
        deadline = time.monotonic() + 5
        while probe(INET_NS, [["dns", "allowed.test", DNS_IP]])[0] != [HOSTS["allowed.test"]]:
            assert time.monotonic() < deadline, "fake DNS did not start"
            time.sleep(0.1)
        yield
    finally:
        for p in procs:
            stop_proc(p)
        with IPRoute() as ip:
            for idx in ip.link_lookup(ifname=UPLINK):
                ip.link("del", index=idx)
        _cleanup_ns(INET_NS)


@pytest.fixture(scope="module")
def private_hosts(fake_inet: None) -> Iterator[list[str]]:
    """A "metadata service" and a private-range host, both in the fake internet.

    Only traffic from the tests' sandbox pool is routed there (a routing rule
    with its own table): the host's own route to 169.254.169.254, private
    networks of the machine and every other process keep theirs.
    """
    hosts = [METADATA_IP, PRIVATE_IP]
    rule = ["from", TEST_POOL, "lookup", PRIVATE_TABLE, "pref", PRIVATE_TABLE]
    subprocess.run(["ip", "rule", "del", *rule], capture_output=True)
    subprocess.run(["ip", "route", "flush", "table", PRIVATE_TABLE], capture_output=True)
    server = None
    try:
        for h in hosts:
            nsexec(INET_NS, "ip", "addr", "add", f"{h}/32", "dev", "eth0", check=True)
            subprocess.run(
                ["ip", "route", "add", f"{h}/32", "via", INET_IP, "dev", UPLINK,
                 "table", PRIVATE_TABLE],
                check=True,
            )  # fmt: skip
        subprocess.run(["ip", "rule", "add", *rule], check=True)
        server = spawn_in(INET_NS, sys.executable, HELPER, "serve", "inet", *hosts)
        yield hosts
    finally:
        if server is not None:
            stop_proc(server)
        subprocess.run(["ip", "rule", "del", *rule], capture_output=True)
        subprocess.run(["ip", "route", "flush", "table", PRIVATE_TABLE], capture_output=True)
        for h in hosts:
            nsexec(INET_NS, "ip", "addr", "del", f"{h}/32", "dev", "eth0")


def test_config(tmp: str = "/run/moru/mtst-net") -> NetworkConfig:
    return NetworkConfig(
        pool_cidr=TEST_POOL,
        uplink=UPLINK,
        dns_upstream=DNS_IP,
        proxy_listen="127.0.0.1:0",
        name_prefix="mtst",
        veth_prefix="mtv",
        run_dir=Path(tmp),
    )


test_config.__test__ = False  # type: ignore[attr-defined]


@dataclass
class StandIn:
    """A namespace standing in for the guest of one sandbox (see module docstring)."""

    ns: str
    net: SandboxNetwork


def plug_standin(net: SandboxNetwork) -> StandIn:
    guest_ns = f"mtfake-g{net.slot}"
    _cleanup_ns(guest_ns)
    netns.create(guest_ns)
    with NetNS(net.netns) as sns:
        for idx in sns.link_lookup(ifname=net.tap):
            sns.link("del", index=idx)
        sns.link("add", ifname=net.tap, kind="veth", peer={"ifname": "eth0", "net_ns_fd": guest_ns})
        t = sns.link_lookup(ifname=net.tap)[0]
        sns.addr("add", index=t, address=net.gateway, prefixlen=net.prefix_len)
        sns.link("set", index=t, state="up")
    with NetNS(guest_ns) as g:
        g.link("set", index=g.link_lookup(ifname="lo")[0], state="up")
        e = g.link_lookup(ifname="eth0")[0]
        g.link("set", index=e, address=net.mac)
        g.addr("add", index=e, address=net.guest_ip, prefixlen=net.prefix_len)
        g.link("set", index=e, state="up")
        g.route("add", dst="0.0.0.0/0", gateway=net.gateway)
    return StandIn(guest_ns, net)


def unplug_standin(s: StandIn) -> None:
    _cleanup_ns(s.ns)


class Env:
    """A NetworkManager on the fake internet, tearing down whatever the test made."""

    def __init__(self) -> None:
        self.mgr = NetworkManager(test_config())
        self.standins: list[StandIn] = []

    def sandbox(self, sid: str, policy: EgressPolicy | None = None) -> StandIn:
        net = run(self.mgr.setup(sid, policy or EgressPolicy()))
        s = plug_standin(net)
        self.standins.append(s)
        return s

    def close(self) -> None:
        for s in self.standins:
            unplug_standin(s)
        run(self.mgr.stop(purge=True))


@pytest.fixture
def env(fake_inet: None) -> Iterator[Env]:
    e = Env()
    run(e.mgr.start())
    try:
        yield e
    finally:
        e.close()
        assert e.mgr.list_leftovers() == []

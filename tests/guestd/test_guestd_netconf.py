"""guestd.netconf (Init's network for a restored guest, over rtnetlink) in a network
namespace of the test's own, on a veth: the same result `ip` gave, idempotent, and a
refused step named. No traffic leaves the namespace."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"mnc{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip = ["ip", "-n", name]
        subprocess.run([*ip, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"],
                       check=True)  # fmt: skip
        subprocess.run([*ip, "link", "set", "peer0", "up"], check=True)
        # What a clone of the snapshot's maker might carry: another address, no route.
        subprocess.run([*ip, "addr", "add", "10.9.9.9/24", "dev", "eth0"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def configure(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from guestd.netconf import configure; configure(*sys.argv[1:])"
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
                          capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT)})  # fmt: skip


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


def test_sets_mac_address_state_and_default_route_and_again_changes_nothing(ns: str) -> None:
    for _ in range(2):  # Init may come again: the same state, no error
        r = configure(ns, "eth0", "10.233.0.2/30", "10.233.0.1", "02:6d:72:00:00:09")
        assert r.returncode == 0, r.stderr
        addrs = [ln.split()[3] for ln in ip(ns, "-o", "-4", "addr", "show", "dev", "eth0")
                 .splitlines()]  # fmt: skip
        assert addrs == ["10.233.0.2/30"]
        link = ip(ns, "link", "show", "dev", "eth0")
        assert "link/ether 02:6d:72:00:00:09 " in link and ",UP" in link, link
        assert ip(ns, "route", "show", "default").split()[:5] == [
            "default", "via", "10.233.0.1", "dev", "eth0"]


def test_a_new_gateway_replaces_the_default_route(ns: str) -> None:
    assert configure(ns, "eth0", "10.233.0.2/24", "10.233.0.1").returncode == 0
    assert configure(ns, "eth0", "10.233.0.6/24", "10.233.0.5").returncode == 0
    assert ip(ns, "route", "show", "default").split()[:3] == ["default", "via", "10.233.0.5"]
    addrs = [ln.split()[3] for ln in ip(ns, "-o", "-4", "addr", "show", "dev", "eth0")
             .splitlines()]  # fmt: skip
    assert addrs == ["10.233.0.6/24"]


def test_a_refused_step_is_named(ns: str) -> None:
    # A gateway outside every address's network: the kernel refuses the route.
    r = configure(ns, "eth0", "10.233.0.2/30", "192.0.2.1")
    assert r.returncode != 0
    assert "default route via 192.0.2.1" in r.stderr, r.stderr
    r = configure(ns, "nosuch0", "10.233.0.2/30")
    assert "no interface nosuch0" in r.stderr, r.stderr

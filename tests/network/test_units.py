"""Fast checks of the pure parts: policy parsing, slots, records, rule and resolver rendering."""

from __future__ import annotations

import ipaddress
import ssl
import subprocess
from pathlib import Path

import pytest

import hostd.network as network
from hostd.network import EgressPolicy, NetworkConfig, SandboxNetwork
from hostd.network.nft import RateLimits, host_rules, sandbox_rules
from hostd.network.proxy import parse_sni
from hostd.network.resolver import render_conf
from hostd.network.slots import PoolExhausted, SlotPool, addresses


def test_public_surface() -> None:
    assert set(network.__all__) == {
        "EgressPolicy",
        "NetworkConfig",
        "NetworkError",
        "NetworkManager",
        "PoolExhausted",
        "PortProxy",
        "ProxyTarget",
        "SandboxNetwork",
    }


@pytest.mark.parametrize(
    "bad", ["10.0.0.0/33", "300.1.1.1", "exa mple.com", "-bad.com", "com", "::1", "fe80::/10", ""]
)
def test_policy_rejects_bad_entries_naming_them(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid network entry"):
        EgressPolicy(allow_out=["1.2.3.4", bad])
    with pytest.raises(ValueError, match="invalid network entry"):
        EgressPolicy(deny_out=[bad])


def test_policy_splits_entries() -> None:
    p = EgressPolicy(
        allow_out=["1.2.3.4", "10.0.0.0/8", "API.Example.com", "*.foo.org"], deny_out=["a.b"]
    )
    assert p.allow_nets == [
        ipaddress.IPv4Network("1.2.3.4/32"),
        ipaddress.IPv4Network("10.0.0.0/8"),
    ]
    assert p.allow_domains == ["api.example.com", "foo.org"]
    assert p.deny_domains == ["a.b"] and p.allowlist_mode and not p.blocks_everything
    assert EgressPolicy(allow_internet_access=False).blocks_everything
    assert EgressPolicy.from_dict(p.to_dict()) == p


def test_slots_addresses_and_reuse_order() -> None:
    pool = ipaddress.IPv4Network("10.9.0.0/28")
    a = addresses(pool, 1)
    assert (str(a.host_veth_ip), str(a.ns_veth_ip), str(a.gateway), str(a.guest_ip)) == (
        "10.9.0.9",
        "10.9.0.10",
        "10.9.0.13",
        "10.9.0.14",
    )
    assert a.mac == "02:6d:72:00:00:01"
    with pytest.raises(ValueError):
        addresses(pool, 2)
    sp = SlotPool(ipaddress.IPv4Network("10.9.0.0/27"))
    s0, s1, s2 = sp.acquire(), sp.acquire(), sp.acquire()
    sp.release(s1)
    sp.release(s0)
    assert sp.acquire() == 3  # never-used slots first
    assert sp.acquire() == s1  # then the longest released
    assert sp.acquire() == s0
    with pytest.raises(PoolExhausted):
        sp.acquire()
    assert s2 in sp.in_use


def test_sandbox_network_record_and_kernel_args() -> None:
    n = SandboxNetwork(
        sandbox_id="sbx_x",
        netns="moru-x",
        tap="tap0",
        mac="02:6d:72:00:00:05",
        guest_ip="10.200.0.46",
        prefix_len=30,
        gateway="10.200.0.45",
        dns="10.200.0.45",
        host_veth="mv5",
        slot=5,
        policy=EgressPolicy(deny_out=["x.com"]),
    )
    assert n.kernel_args() == "moru.net=10.200.0.46/30,10.200.0.45,10.200.0.45"
    assert SandboxNetwork.from_dict(n.to_dict()) == n
    att = n.attachment()
    assert (att.netns, att.tap, att.mac) == ("moru-x", "tap0", "02:6d:72:00:00:05")


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="pool_cidr"):
        NetworkConfig(pool_cidr="10.0.0.0/30", uplink="x", dns_upstream="1.1.1.1")
    with pytest.raises(ValueError, match="veth_prefix"):
        NetworkConfig(veth_prefix="toolong", uplink="x", dns_upstream="1.1.1.1")
    with pytest.raises(ValueError, match="proxy_listen"):
        NetworkConfig(proxy_listen="nope", uplink="x", dns_upstream="1.1.1.1")
    c = NetworkConfig(uplink="x", dns_upstream="192.0.2.53")
    assert (c.proxy_host, c.proxy_port, c.table) == ("127.0.0.1", 50070, "moru")


@pytest.mark.parametrize(
    "policy",
    [
        EgressPolicy(),
        EgressPolicy(allow_internet_access=False),
        EgressPolicy(
            allow_out=["10.0.0.0/8", "10.1.0.0/16", "a.com"], deny_out=["b.com", "1.1.1.1"]
        ),
    ],
)
def test_rules_are_valid_nft(policy: EgressPolicy) -> None:
    """`nft -c` (check only, nothing is loaded) accepts every rendering."""
    ip = ipaddress.IPv4Address
    scripts = [
        sandbox_rules("mchk", policy, ip("10.0.0.6"), ip("10.0.0.5"), ip("10.0.0.1")),
        sandbox_rules(
            "mchk",
            policy,
            ip("10.0.0.6"),
            ip("10.0.0.5"),
            ip("10.0.0.1"),
            dns_upstream="192.0.2.53",
            limits=RateLimits(10, 20, 5, 10),
        ),
        host_rules("mchk", "mchk", ipaddress.IPv4Network("10.9.0.0/16"), "eth9"),
        host_rules("mchk", "mchk", ipaddress.IPv4Network("10.9.0.0/16"), ""),
    ]
    for s in scripts:
        r = subprocess.run(["nft", "-c", "-f", "-"], input=s, text=True, capture_output=True)
        assert r.returncode == 0, r.stderr + s


def test_resolver_conf_parent_domains_and_allowlist() -> None:
    p = EgressPolicy(allow_out=["example.com", "api.other.org"], deny_out=["bad.example.com"])
    conf = render_conf(
        table="t", policy=p, listen="10.0.0.5", upstream="192.0.2.53", pid_file=Path("/x.pid")
    )
    assert "server=/example.com/192.0.2.53" in conf
    assert "server=192.0.2.53\n" not in conf  # allow-list mode forwards allowed names only
    assert "nftset=/bad.example.com/4#inet#t#allow_dns,4#inet#t#deny_dns" in conf
    assert "nftset=/example.com/4#inet#t#allow_dns\n" in conf
    conf = render_conf(
        table="t",
        policy=EgressPolicy(),
        listen="10.0.0.5",
        upstream="192.0.2.53",
        pid_file=Path("/x.pid"),
    )
    assert "server=192.0.2.53\n" in conf and "nftset" not in conf
    for nothing_out in (
        EgressPolicy(allow_internet_access=False),
        EgressPolicy(allow_out=["example.com"], deny_out=["0.0.0.0/0"]),
    ):
        conf = render_conf(
            table="t", policy=nothing_out, listen="10.0.0.5", upstream="192.0.2.53",
            pid_file=Path("/x.pid"),
        )  # fmt: skip
        assert "server=" not in conf  # answered REFUSED locally, nothing forwarded


def test_parse_sni() -> None:
    ctx = ssl.create_default_context()
    obj = ctx.wrap_bio(
        ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="80-sbx_a.localhost"
    )
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    assert parse_sni(out.read()) == "80-sbx_a.localhost"
    assert parse_sni(b"\x16\x03\x01\x00\x05garbage") is None
    assert parse_sni(b"GET / HTTP/1.1\r\n") is None

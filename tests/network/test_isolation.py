"""Sandboxes cannot reach each other or the host's own services (stand-in guests, see conftest)."""

from __future__ import annotations

import socket
import sys
import urllib.request

from pyroute2 import IPRoute

from .conftest import HELPER, HOSTS, Env, probe, spawn_in, stop_proc


def _host_ipv4_addresses() -> list[str]:
    with IPRoute() as ip:
        addrs = [a.get_attr("IFA_ADDRESS") for a in ip.get_addr(family=socket.AF_INET)]
    return [a for a in addrs if a and not a.startswith("127.")]


def test_sandboxes_cannot_reach_each_other_or_the_host(env: Env) -> None:
    a = env.sandbox("sbx_iso_a")
    b = env.sandbox("sbx_iso_b")
    server = spawn_in(b.ns, sys.executable, HELPER, "serve", "guest", b.net.guest_ip)
    host_sock = socket.socket()
    host_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    host_sock.bind(("0.0.0.0", 0))
    host_sock.listen(8)
    host_port = host_sock.getsockname()[1]
    try:
        # Controls: the host reaches B's server (the proxy's path) and A the internet.
        with urllib.request.urlopen(f"http://{b.net.guest_ip}:8080/x", timeout=5) as resp:
            assert resp.read().startswith(f"guest {b.net.guest_ip} /x".encode())
        host_addrs = _host_ipv4_addresses()
        assert a.net.gateway not in host_addrs
        checks: list[list[object]] = [
            ["http", HOSTS["allowed.test"], 80],
            ["http", b.net.guest_ip, 8080],
            ["udp", b.net.guest_ip, 7],
            ["icmp", b.net.guest_ip],
            # (DNS to any address is redirected to A's own resolver, so not :53 here)
            ["icmp", b.net.gateway],
        ]
        checks += [["tcp", ip, host_port] for ip in host_addrs]
        checks += [["icmp", ip] for ip in host_addrs]
        r = probe(a.ns, checks)
        assert r[0].startswith("inet "), r
        assert all(isinstance(x, str) and x.startswith("error:") for x in r[1:]), list(
            zip(checks, r, strict=True)
        )
        # And the other way round.
        r = probe(b.ns, [["tcp", a.net.guest_ip, 22], ["icmp", a.net.guest_ip]])
        assert all(x.startswith("error:") for x in r), r
    finally:
        host_sock.close()
        stop_proc(server)

"""Sandbox networking benchmark; every figure is printed next to its floor from the same run.

    /opt/moru/venv/bin/python benchmarks/bench_network.py [--vm] [-n 10]

- set-up / teardown time per sandbox vs a bare namespace + veth + tap (pyroute2 only);
  with --vm also its share of a Create (network set-up + boot to guestd-ready);
- port proxy request latency and throughput vs direct from the host namespace;
- guest -> test host TCP throughput vs host -> test host (a stand-in guest
  namespace; with --vm also a real microVM under TCG).

Uses the tests' fake internet (tests/network/conftest.py): no traffic leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from network import conftest as fx  # noqa: E402

from hostd.network import EgressPolicy, NetworkManager, links  # noqa: E402
from hostd.network.slots import addresses  # noqa: E402

PROXY_MAIN = """
import asyncio, sys
from hostd.network import PortProxy, ProxyTarget
async def main():
    p = PortProxy({"sbx_bproxy": ProxyTarget(sys.argv[1])}.get, "127.0.0.1", 0)
    await p.start()
    print(p.port, flush=True)
    await asyncio.Event().wait()
import uvloop
uvloop.run(main())  # as hostd runs
"""


def row(name: str, value: float, floor: float, unit: str) -> None:
    ratio = value / floor if floor else float("nan")
    print(f"{name:<44} {value:10.2f} {unit:<6} floor {floor:10.2f} {unit:<6} ratio {ratio:6.2f}x")


def bare_netns_ms(n: int) -> float:
    """Floor for set-up: the netlink part alone (namespace, veth pair, addresses, routes, tap).

    What set-up adds on top is the namespace's nftables rules and its resolver.
    """
    pool = ipaddress.IPv4Network("10.202.0.0/24")
    times = []
    for i in range(n):  # same pattern as the set-up figure: all created, then all removed
        name, veth = f"mbench-{i}", f"mbv{i}"
        a = addresses(pool, i)
        t0 = time.perf_counter()
        links.in_own_thread(lambda: links.create(name, veth, a, a.mac))  # noqa: B023
        times.append((time.perf_counter() - t0) * 1000)
    for i in range(n):
        links.delete_link(f"mbv{i}")
        links.delete_netns(f"mbench-{i}")
    return statistics.median(times)


def http_get(port: int, host: str, path: str, ip: str = "127.0.0.1") -> bytes:
    with socket.create_connection((ip, port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, first = data.partition(b"\r\n\r\n")
        body = bytearray(first)
        hdr = next(x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length"))
        length = int(hdr.split(b":")[1])
        while len(body) < length:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            body += chunk
        return bytes(body)


def latency_ms(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10, help="sandboxes to set up")
    ap.add_argument("--vm", action="store_true", help="also measure with a real microVM")
    args = ap.parse_args()

    gen = cast(Any, fx.fake_inet).__wrapped__()
    next(gen)
    mgr = NetworkManager(fx.test_config())
    asyncio.run(mgr.start())
    try:
        # --- set-up time ---------------------------------------------------
        floor_ms = bare_netns_ms(args.n)
        setup, teardown = [], []
        pol = EgressPolicy(allow_out=["allowed.test", "198.18.0.0/16"], deny_out=["denied.test"])
        for i in range(args.n):
            t0 = time.perf_counter()
            asyncio.run(mgr.setup(f"sbx_b{i}", pol))
            setup.append((time.perf_counter() - t0) * 1000)
        for i in range(args.n):
            t0 = time.perf_counter()
            asyncio.run(mgr.teardown(f"sbx_b{i}"))
            teardown.append((time.perf_counter() - t0) * 1000)
        row("network set-up per sandbox (median)", statistics.median(setup), floor_ms, "ms")
        row("network teardown per sandbox (median)", statistics.median(teardown), floor_ms, "ms")

        async def par() -> float:
            t0 = time.perf_counter()
            await asyncio.gather(*(mgr.setup(f"sbx_p{i}", pol) for i in range(args.n)))
            dt = (time.perf_counter() - t0) * 1000
            await asyncio.gather(*(mgr.teardown(f"sbx_p{i}") for i in range(args.n)))
            return dt

        row(
            f"{args.n} set-ups in parallel, per sandbox",
            asyncio.run(par()) / args.n,
            floor_ms,
            "ms",
        )

        # --- proxy vs direct ----------------------------------------------------
        net = asyncio.run(mgr.setup("sbx_bproxy", EgressPolicy()))
        standin = fx.plug_standin(net)
        server = fx.spawn_in(standin.ns, sys.executable, fx.HELPER, "serve", "guest", net.guest_ip)
        # The proxy runs in its own process, as in hostd (a thread here would
        # measure GIL hand-offs with the client, not the proxy).
        proxy = subprocess.Popen(
            [sys.executable, "-c", PROXY_MAIN, net.guest_ip],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert proxy.stdout is not None
        proxy_port = int(proxy.stdout.readline())
        try:
            host = "8080-sbx_bproxy.localhost"
            for _ in range(20):
                http_get(proxy_port, host, "/warm")
            direct = latency_ms(lambda: http_get(8080, host, "/", net.guest_ip), 300)
            via = latency_ms(lambda: http_get(proxy_port, host, "/"), 300)
            row("proxy HTTP request latency (new conn, median)", via, direct, "ms")
            size = 200 << 20
            t0 = time.perf_counter()
            assert len(http_get(8080, host, f"/bytes/{size}", net.guest_ip)) == size
            d_mbs = size / (time.perf_counter() - t0) / 1e6
            t0 = time.perf_counter()
            assert len(http_get(proxy_port, host, f"/bytes/{size}")) == size
            p_mbs = size / (time.perf_counter() - t0) / 1e6
            row("proxy HTTP throughput (200 MB body)", p_mbs, d_mbs, "MB/s")
            # --- guest -> test host ---------------------------------------------
            nbytes = 500 << 20
            check = [["tcpsend", fx.INET_IP, 5001, nbytes]]
            r = fx.probe(standin.ns, check)[0]
            g_mbs = r["bytes"] / r["seconds"] / 1e6
            from network.nethelpers import probe as local_probe

            h: Any = local_probe(check)[0]
            h_mbs = h["bytes"] / h["seconds"] / 1e6
            row("stand-in guest -> test host TCP", g_mbs, h_mbs, "MB/s")
        finally:
            proxy.terminate()
            proxy.wait()
            fx.stop_proc(server)
            fx.unplug_standin(standin)
            asyncio.run(mgr.teardown("sbx_bproxy"))

        if args.vm:
            vm_figures(mgr, statistics.median(setup), h_mbs)
    finally:
        asyncio.run(mgr.stop(purge=True))
        try:
            next(gen)
        except StopIteration:
            pass


def vm_figures(mgr: NetworkManager, setup_ms: float, host_mbs: float) -> None:
    from network.test_vm_network import VmNet, boot_with_network, sh
    from vmfixtures import VmRunner

    runner = VmRunner()
    env = VmNet(runner)
    env.mgr = mgr
    try:
        net = runner.run(mgr.setup("sbx_bvm", EgressPolicy()))
        t0 = time.perf_counter()
        vm = boot_with_network(runner, net)
        env.vms.append(vm)
        boot_ms = (time.perf_counter() - t0) * 1000
        print(
            f"{'network share of Create (set-up/(set-up+boot))':<44} "
            f"{100 * setup_ms / (setup_ms + boot_ms):10.2f} %"
            f"      (boot to guestd-ready {boot_ms:.0f} ms)"
        )
        nbytes = 100 << 20
        code, out = sh(
            vm,
            'python3 -c "import socket,time;'
            f"s=socket.create_connection(('{fx.INET_IP}',5001));"
            "b=bytes(1<<20);t=time.perf_counter();"
            f"[s.sendall(b) for _ in range({nbytes >> 20})];"
            's.shutdown(1);n=int(s.recv(99));print(n/(time.perf_counter()-t)/1e6)"',
            timeout=300,
        )
        assert code == 0, out
        row(
            "VM guest -> test host TCP (TCG)", float(out.strip().splitlines()[-1]), host_mbs, "MB/s"
        )
    finally:
        for vm in env.vms:
            vm.destroy()
        runner.run(mgr.teardown("sbx_bvm"))
        runner.close()


if __name__ == "__main__":
    main()

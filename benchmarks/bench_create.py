#!/usr/bin/env python3
"""Create latency through the SDK: warm pool, ready snapshot only, cold boot; one run.

Every figure is printed next to the floor measured in the same run: a bare
busybox boot of the same kernel with hostd's QEMU driver, until its init
reaches the console (bench_boot.boot_floor; no rootfs, guestd, cgroup or
network). Floors are measured between the phases, so host load hits both.

Phases (one private hostd, networking off, restarted with another config
between phases on the same state dir):

1. warm pool (`warm_pool = {base = P}`, ready snapshot of base on for
   refills): each Create waits until the pool is full, then claims;
   create p50/p95 and create + first `commands.run("true")`.
   Then host memory per pool member (bench_hostd.vm_overhead: PSS of its
   QEMU and vsock device by part, guest RAM resident in its memfd apart),
   and a burst of 10 parallel Creates: how many claimed, how the rest
   started, each one's latency, and how long the pool takes to refill.
2. ready snapshot only (pool off).
3. cold boot (pool and ready snapshot off).

Each phase also prints the median of every Create step (cgroup, network,
RAM copy, QEMU start, state load, vsock re-plug, gRPC connect + Init, ...)
from the per-Create line hostd logs (hostd.create_steps).

Targets (TCG, pool not exhausted): pool create p50 <= 100 ms, p95 <= 150 ms;
create + first `true` <= 350 ms; a Create that misses the pool (ready
snapshot) <= 500 ms.

    /opt/moru/venv/bin/python benchmarks/bench_create.py [--runs 10] [--ready-runs 5]
        [--cold-runs 3] [--pool 2] [--burst 10] [--floors 3]
        [--phases pool,ready,cold] [--network]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "hostd"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_boot import boot_floor, floor_initramfs  # noqa: E402
from bench_hostd import vm_overhead  # noqa: E402
from hostd_framework import EventWatcher, Hostd, pb, wait_for  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from hostd.create_steps import parse as parse_steps  # noqa: E402
from images.manifest import load_manifest  # noqa: E402
from moru import Sandbox  # noqa: E402

MB = 1 << 20


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def line(name: str, value: float, floor: float, target: str = "") -> None:
    print(f"  {name:<38} {value * 1000:9.1f} ms   floor {floor * 1000:8.1f} ms"
          f"   ratio {value / floor:6.3f}x  {target}")  # fmt: skip


class Bench:
    def __init__(self, template: str) -> None:
        self.template = template
        self.m = load_manifest(template)
        self.tmp = Path(tempfile.mkdtemp(dir="/tmp", prefix="mbc"))
        self.initrd = floor_initramfs(self.tmp)
        self.floors: list[float] = []
        self.h = Hostd(max_sandboxes=32, memory_budget_mb=16384)
        self.url = ""
        self.watch: EventWatcher | None = None
        self.sids: list[str] = []  # every Create's sandbox id, in order

    # -- floor ---------------------------------------------------------------

    def floor(self, n: int) -> float:
        for i in range(n):
            wall, _ = asyncio.run(boot_floor(self.m, self.initrd, self.tmp, len(self.floors) + i))
            self.floors.append(wall)
        return statistics.median(self.floors)

    # -- hostd -----------------------------------------------------------------

    def start(self, **config: object) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.h.config.update(config, metrics_listen=f"127.0.0.1:{port}")
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.h.start(timeout=120)
        self.watch = EventWatcher(self.h).__enter__()

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.__exit__()
            self.watch = None
        self.h.stop()

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(self.url, timeout=10) as r:
            text = r.read().decode()
        total = 0.0
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and labels.items() <= s.labels.items():
                    total += s.value
        return total

    def pool_ready(self) -> int:
        return int(self.metric("moru_warm_pool_ready", template=self.template))

    def wait_pool(self, n: int, timeout: float = 900) -> float:
        t0 = time.monotonic()
        wait_for(lambda: self.pool_ready() >= n, timeout, 0.05, what=f"{n} ready pool members")
        return time.monotonic() - t0

    def wait_ready_snapshot(self, timeout: float = 900) -> None:
        """Until hostd has a complete ready snapshot (made at start when there is none)."""
        wait_for(lambda: any((self.h.state / "ready").glob("*/ready.json")), timeout, 0.2,
                 what="a ready snapshot")  # fmt: skip

    def how(self, sid: str) -> str:
        assert self.watch is not None
        return str(self.watch.wait(sid, pb.EVENT_TYPE_CREATED, 60).message)

    # -- creates ---------------------------------------------------------------

    def create_once(self, before: Callable[[], object] = lambda: None) -> tuple[float, float, str]:
        """(create s, create + first `true` s, how it started) of one SDK Create."""
        before()
        t0 = time.perf_counter()
        sbx = Sandbox.create(self.template, timeout=600, hostd=f"unix:{self.h.sock}")
        t1 = time.perf_counter()
        try:
            self.sids.append(sbx.sandbox_id)
            r = sbx.commands.run("true")
            t2 = time.perf_counter()
            assert r.exit_code == 0
            return t1 - t0, t2 - t0, self.how(sbx.sandbox_id)
        finally:
            sbx.kill()

    def phase(self, title: str, runs: int, before: Callable[[], object] = lambda: None,
              targets: tuple[str, str, str] = ("", "", "")) -> None:  # fmt: skip
        first = len(self.sids)
        res = [self.create_once(before) for _ in range(runs)]
        floor = self.floor(1)
        sids = self.sids[first:]
        creates, firsts = [r[0] for r in res], [r[1] for r in res]
        print(f"\n{title} (n={runs}, paths {dict(Counter(r[2] for r in res))})")
        line("create p50", statistics.median(creates), floor, targets[0])
        line("create p95", pct(creates, 0.95), floor, targets[1])
        line("create + first `true` p50", statistics.median(firsts), floor, targets[2])
        line("create + first `true` p95", pct(firsts, 0.95), floor)
        self.steps(sids)

    def steps(self, sids: list[str]) -> None:
        """Median per Create step, from hostd's per-Create log line (hostd.create_steps)."""
        found: dict[str, list[float]] = {}
        text = self.h.log.read_text(errors="replace")
        for ln in text.splitlines():
            m = re.search(r"created (\S+) \(template .*\) in ([0-9.]+) s", ln)
            if m and m.group(1) in sids:  # the manager's whole Create: + first metrics sample
                found.setdefault("hostd Create RPC (all of it)", []).append(float(m.group(2)))
            got = parse_steps(ln)
            if got is None or not any(f"{sid}: " in ln for sid in sids):
                continue
            for name, sec in got[1].items():
                found.setdefault(name, []).append(sec)
        if not found:
            return
        print(f"  steps, median of {max(len(v) for v in found.values())} (hostd log;"
              " `||`: ran beside the steps before it):")  # fmt: skip
        for name, secs in found.items():
            print(f"    {name:<36} {statistics.median(secs) * 1000:7.1f} ms")

    def memory(self) -> None:
        members = [cg.name for cg in self.h.sandbox_cgroups() if cg.parent.parent.name == "pids"]
        print(f"\nhost memory per pool member ({len(members)} members, MB)")
        for sid in members:
            parts = vm_overhead(self.h, sid)
            total = sum(v for p in parts.values() for k, v in p.items() if k != "guest RAM")
            ram = sum(p.get("guest RAM", 0) for p in parts.values())
            detail = ", ".join(
                f"{name} {sum(v for k, v in p.items() if k != 'guest RAM') / MB:.1f}"
                for name, p in parts.items()
            )
            print(f"  {sid}: {total / MB:.1f} besides guest RAM ({detail}); guest RAM resident"
                  f" {ram / MB:.1f} (of {self.m.defaults.memory_mb})")  # fmt: skip

    def burst(self, n: int, pool: int) -> None:
        self.wait_pool(pool)
        claims0 = self.metric("moru_warm_pool_claims_total")

        def one(_: int) -> tuple[float, str]:
            t0 = time.perf_counter()
            s = Sandbox.create(self.template, timeout=600, hostd=f"unix:{self.h.sock}")
            took = time.perf_counter() - t0
            return took, s.sandbox_id

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(n) as ex:
            got = list(ex.map(one, range(n)))
        wall = time.monotonic() - t0
        hows = [self.how(sid) for _, sid in got]
        refill = self.wait_pool(pool)
        floor = self.floor(1)
        print(f"\nburst of {n} parallel Creates with {pool} ready: {wall:.2f} s for all;"
              f" {int(self.metric('moru_warm_pool_claims_total') - claims0)} claimed,"
              f" paths {dict(Counter(hows))}")  # fmt: skip
        for (took, _), how in sorted(zip(got, hows, strict=True)):
            line(f"  {how}", took, floor)
        print(f"  pool full again {refill:.2f} s after the burst ({pool} members:"
              f" {refill / pool:.2f} s each)")  # fmt: skip
        for _, sid in got:
            self.h.kill(sid)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.__exit__()
        left = self.h.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if left:
            print(f"hostd left behind: {left}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", default="base")
    ap.add_argument("--runs", type=int, default=10, help="pool creates")
    ap.add_argument("--ready-runs", type=int, default=5)
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--pool", type=int, default=2, help="members kept")
    ap.add_argument("--burst", type=int, default=10)
    ap.add_argument("--floors", type=int, default=3, help="floor boots before the phases")
    ap.add_argument("--phases", default="pool,ready,cold",
                    help="which phases to run, comma-separated (pool, ready, cold)")
    ap.add_argument("--network", action="store_true",
                    help="sandbox networking on (netns, tap, nftables) in every phase")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    b = Bench(args.template)
    try:
        print(f"floor: busybox boot of {b.m.kernel} to its init, median of the run:"
              f" {b.floor(args.floors) * 1000:.0f} ms")  # fmt: skip
        phases = set(args.phases.split(","))
        if args.network:
            b.h.network = {"enabled": True}
        if "pool" in phases:
            b.start(warm_pool={args.template: args.pool}, ready_snapshot_templates=args.template)
            took = b.wait_pool(args.pool)
            print(f"pool of {args.pool} filled {took:.1f} s after hostd started")
            b.phase(f"warm pool ({args.pool} members)", args.runs, lambda: b.wait_pool(args.pool),
                    ("target <= 100 ms", "target <= 150 ms", "target <= 350 ms"))  # fmt: skip
            b.memory()
            if args.burst:
                b.burst(args.burst, args.pool)
            b.stop()
        if "ready" in phases:
            b.start(warm_pool={}, ready_snapshot_templates=args.template)
            b.wait_ready_snapshot()
            b.phase("ready snapshot only (the pool's miss path)", args.ready_runs,
                    targets=("target <= 500 ms", "", ""))  # fmt: skip
            b.stop()
        if "cold" in phases:
            b.start(warm_pool={}, ready_snapshot_templates="")
            b.phase("cold boot", args.cold_runs)
        print(f"\nfloor boots this run: {', '.join(f'{f * 1000:.0f}' for f in b.floors)} ms")
    finally:
        b.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

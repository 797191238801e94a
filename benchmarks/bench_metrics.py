#!/opt/moru/venv/bin/python
"""Benchmark: /metrics scrape time and size, and hostd CPU spent sampling, with N sandboxes.

One run, one real hostd (observability wired in as in docs/observability.md):

1. Idle node (no sandbox): hostd CPU over a window, /metrics scrape time and
   size, and /healthz round trip (the HTTP floor: same server, no collect).
0. In-process (no VMs): render time/size of /metrics with a stand-in manager
   holding N and 10*N sandboxes, vs none.
2. N idle sandboxes created one by one (128 MB, 1 vCPU each by default; with
   --ready-snapshot, the template's defaults restored from hostd's ready
   snapshot), then the same measurements.

Prints each figure next to its floor and the ratio. Usage:

    benchmarks/bench_metrics.py [--sandboxes 20] [--window 30] [--scrapes 40] [--budget 5400]
                                [--memory-mb 128] [--vcpus 1] [--ready-snapshot]

Under TCG on a busy 2-core machine a create can take minutes; creates are
sequential with a generous `--budget` for the whole phase, and a failed create
is retried (up to --max-failures); if the budget runs out the figures are for
as many as were made, and the output says so.
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from tests.observability.obs_hostd import ObsHostd  # noqa: E402
from tests.observability.promtext import parse  # noqa: E402

TICK = 100  # os.sysconf("SC_CLK_TCK") on Linux


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def cpu_share(pid: int, window: float) -> float:
    """Share of one core hostd used over `window` seconds."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(window)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def timed_get(url: str, headers: dict[str, str] | None = None) -> tuple[float, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
    return time.perf_counter() - t0, body


def scrape_stats(base: str, n: int) -> dict[str, float]:
    times, gz_times, render = [], [], []
    body = gz = b""
    for _ in range(n):
        dt, body = timed_get(f"{base}/metrics")
        times.append(dt)
        # hostd's own render time of the previous scrape (event-loop time)
        render.append(parse(body).get(("moru_metrics_render_seconds", ()), 0.0))
        dt, gz = timed_get(f"{base}/metrics", {"Accept-Encoding": "gzip"})
        gz_times.append(dt)
    hz = [timed_get(f"{base}/healthz")[0] for _ in range(n)]
    series = len(parse(body))
    assert gzip.decompress(gz)
    return {
        "scrape_ms": statistics.median(times) * 1e3,
        "render_ms": statistics.median(render[1:] or render) * 1e3,
        "scrape_gzip_ms": statistics.median(gz_times) * 1e3,
        "healthz_ms": statistics.median(hz) * 1e3,
        "bytes": float(len(body)),
        "gzip_bytes": float(len(gz)),
        "series": float(series),
    }


def synthetic(counts: list[int], reps: int = 200) -> None:
    """Render cost alone, in-process: a stand-in manager with N sandboxes (no VMs).

    The stand-in (tests/observability/fakes.py) holds real guest samples and
    reads cgroup numbers from real files, as the real cgroups do. Wall time is
    what hostd's loop is blocked for; CPU time is immune to a busy machine.
    """
    import shutil
    import tempfile

    from prometheus_client import generate_latest

    from hostd.observability import Observability
    from tests.observability.fakes import FakeManager, sid

    print(f"\nrender of /metrics in-process, stand-in manager (median of {reps}; floor = 0)")
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="mb"))
    try:
        base: dict[str, float] = {}
        for n in [0, *counts]:
            mgr = FakeManager(root / str(n), max_sandboxes=max(n, 1), memory_budget_mb=n * 256 + 1)
            for i in range(n):
                mgr.add(sid(i)).sample(cpu_used_pct=1.0, mem_used=1, mem_total=2)
            obs = Observability(mgr)
            wall, cpu = [], []
            for _ in range(reps):
                w0, c0 = time.perf_counter(), time.thread_time()
                body = generate_latest(obs.registry)
                cpu.append(time.thread_time() - c0)
                wall.append(time.perf_counter() - w0)
            fig = {
                "wall": statistics.median(wall) * 1e3,
                "cpu": statistics.median(cpu) * 1e3,
                "kib": len(body) / 1024,
            }
            if n == 0:
                base = fig
                continue
            row(f"{n} sandboxes: render wall time", fig["wall"], base["wall"], "ms")
            row(f"{n} sandboxes: render CPU time", fig["cpu"], base["cpu"], "ms")
            row(f"{n} sandboxes: size", fig["kib"], base["kib"], "KiB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def row(name: str, value: float, floor: float, unit: str) -> None:
    ratio = f"{value / floor:7.2f}x" if floor > 0 else "    n/a"
    print(f"  {name:<42} {value:12.3f} {unit:<6} floor {floor:12.3f} {unit:<6} ratio {ratio}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sandboxes", type=int, default=20)
    ap.add_argument("--memory-mb", type=int, default=128, help="0: the template's default")
    ap.add_argument("--vcpus", type=int, default=1, help="0: the template's default")
    ap.add_argument(
        "--ready-snapshot",
        action="store_true",
        help="hostd keeps a ready snapshot of base; creates use the template's defaults",
    )
    ap.add_argument("--max-failures", type=int, default=5)
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--scrapes", type=int, default=40)
    ap.add_argument("--interval", type=float, default=5.0, help="metrics_interval_seconds")
    ap.add_argument(
        "--budget", type=float, default=5400.0, help="stop creating sandboxes after this many s"
    )
    ap.add_argument(
        "--synthetic-only", action="store_true", help="only the in-process render figures"
    )
    a = ap.parse_args()
    synthetic([a.sandboxes, 10 * a.sandboxes])
    if a.synthetic_only:
        return 0

    extra: dict[str, object] = {}
    if a.ready_snapshot:
        extra["ready_snapshot_templates"] = "base"
        a.memory_mb = a.vcpus = 0  # the snapshot is of the template's defaults
    h = ObsHostd(
        max_sandboxes=max(a.sandboxes, 1),
        memory_budget_mb=a.sandboxes * max(a.memory_mb, 512),
        metrics_interval_seconds=a.interval,
        log_level="warning",
        **extra,
    )
    made: list[str] = []
    try:
        h.start()
        assert h.proc is not None
        pid = h.proc.pid
        base = h.metrics_url
        print(f"hostd pid {pid}; sampling every {a.interval:g} s; console watch every 1 s")
        if a.ready_snapshot:
            # hostd makes the snapshot in the background after start: wait for it,
            # so every create restores it (and its boot is not in the idle figures).
            t0, ready = time.monotonic(), h.state / "ready"
            while not any(ready.glob("base-*/ready.json")):
                if time.monotonic() - t0 > 1800:
                    print("no ready snapshot after 1800 s; creates will boot cold")
                    break
                time.sleep(2)
            print(f"ready snapshot of base made in {time.monotonic() - t0:.0f} s", flush=True)
        print("idle node: measuring ...", flush=True)
        idle_cpu = cpu_share(pid, a.window)
        idle = scrape_stats(base, a.scrapes)

        t_create = time.monotonic()
        failures = 0
        while len(made) < a.sandboxes and failures < a.max_failures:
            if time.monotonic() - t_create > a.budget:
                print(f"  creation budget of {a.budget:g} s used up")
                break
            try:
                t0 = time.monotonic()
                sbx = h.create(template="base", memory_mb=a.memory_mb, vcpus=a.vcpus)
            except grpc.RpcError as e:
                failures += 1
                why = (e.details() or "").splitlines()[0]
                print(f"  create failed ({e.code().name}: {why}); failure {failures}")
                if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    break
                continue
            made.append(sbx.sandbox_id)
            print(f"  created {len(made)}/{a.sandboxes} in {time.monotonic() - t0:.1f} s"
                  f" ({time.monotonic() - t_create:.0f} s so far, load {os.getloadavg()[0]:.1f})",
                  flush=True)  # fmt: skip
        n = len(made)
        if n == 0:
            print("no sandbox could be created")
            return 1
        time.sleep(a.interval)  # let every sandbox be sampled at its steady pace
        print(f"{n} idle sandboxes: measuring ...", flush=True)
        busy_cpu = cpu_share(pid, a.window)
        busy = scrape_stats(base, a.scrapes)

        print(f"\n/metrics with {n} sandboxes (median of {a.scrapes}; floor = idle node)")
        row("scrape time", busy["scrape_ms"], idle["scrape_ms"], "ms")
        row("render time on hostd's loop", busy["render_ms"], idle["render_ms"], "ms")
        row("scrape time vs /healthz (HTTP floor)", busy["scrape_ms"], busy["healthz_ms"], "ms")
        row("scrape time, gzip", busy["scrape_gzip_ms"], idle["scrape_gzip_ms"], "ms")
        row("size", busy["bytes"] / 1024, idle["bytes"] / 1024, "KiB")
        row("size, gzip", busy["gzip_bytes"] / 1024, idle["gzip_bytes"] / 1024, "KiB")
        row("samples (series)", busy["series"], idle["series"], "")
        per_sbx = (busy["bytes"] - idle["bytes"]) / n
        per_us = (busy["scrape_ms"] - idle["scrape_ms"]) / n * 1e3
        print(f"  per sandbox: {per_sbx:.0f} bytes, {per_us:.0f} us scrape time")
        print(f"\nhostd CPU over {a.window:g} s (share of one core; floor = idle node, same run)")
        row(f"with {n} idle sandboxes", busy_cpu * 100, idle_cpu * 100, "%")
        print(f"  overhead per idle sandbox: {(busy_cpu - idle_cpu) * 100 / n:.3f} % of a core")
        if n < a.sandboxes:
            print(f"\nNOTE: only {n} of {a.sandboxes} sandboxes were created (node/time limits)")
        return 0
    finally:
        for sid in made:
            try:
                h.kill(sid)
            except grpc.RpcError:
                pass
        left = h.close()
        if left:
            print(f"left behind: {left}")


if __name__ == "__main__":
    sys.exit(main())

"""Unit tests of the exporter against FakeManager (see fakes.py for why), over real HTTP."""

from __future__ import annotations

import asyncio
import gzip
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hostd.events import Event, EventType, Reason
from hostd.observability import Observability
from hostd.state import State

from .fakes import FakeManager, sid
from .promtext import metrics, parse, scrape, series, value

GiB = 1 << 30


@pytest.fixture
def root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="mo"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def serve(
    mgr: FakeManager, body: Callable[[Observability, str], Awaitable[None]], **kw: Any
) -> None:
    """Runs `body(obs, base_url)` with the endpoint listening on an ephemeral loopback port."""

    async def main() -> None:
        obs = Observability(mgr, **kw)
        async with obs.serve("127.0.0.1:0"):
            assert obs.http is not None
            await body(obs, f"http://127.0.0.1:{obs.http.port}")

    asyncio.run(main())


def test_per_sandbox_series_and_they_vanish_on_kill(root: Path) -> None:
    mgr = FakeManager(root)
    a, b = mgr.add(sid(1), "base"), mgr.add(sid(2), "python", memory_mb=512)
    a.sample(
        cpu_used_pct=12.5, mem_used=100 << 20, mem_total=GiB, disk_used=5 << 20, disk_total=GiB
    )
    b.sample(cpu_used_pct=80.0, mem_used=300 << 20, mem_total=2 * GiB, disk_used=7, disk_total=9)
    a.res.cgroup.set(cpu=3.25, mem=150 << 20)

    async def body(obs: Observability, base: str) -> None:
        m = await asyncio.to_thread(metrics, base)
        la = {"sandbox_id": sid(1), "template": "base"}
        lb = {"sandbox_id": sid(2), "template": "python"}
        assert value(m, "moru_sandbox_cpu_used_pct", **la) == 12.5
        assert value(m, "moru_sandbox_cpu_used_pct", **lb) == 80.0
        assert value(m, "moru_sandbox_mem_used_bytes", **la) == 100 << 20
        assert value(m, "moru_sandbox_mem_total_bytes", **lb) == 2 * GiB
        assert value(m, "moru_sandbox_disk_used_bytes", **lb) == 7
        assert value(m, "moru_sandbox_disk_total_bytes", **la) == GiB
        assert value(m, "moru_sandbox_host_cpu_seconds_total", **la) == 3.25
        assert value(m, "moru_sandbox_host_memory_bytes", **la) == 150 << 20
        assert value(m, "moru_sandbox_info", state="running", **la) == 1
        assert value(m, "moru_sandboxes", state="running") == 2
        assert value(m, "moru_capacity_sandboxes_left") == 6
        assert value(m, "moru_capacity_memory_left_bytes") == (4096 - 768) << 20

        mgr.remove(sid(1))
        m = await asyncio.to_thread(metrics, base)
        for name in ("moru_sandbox_cpu_used_pct", "moru_sandbox_host_cpu_seconds_total"):
            labels = series(m, name)
            assert all(dict(k)["sandbox_id"] != sid(1) for k in labels), name
            assert any(dict(k)["sandbox_id"] == sid(2) for k in labels), name
        assert value(m, "moru_sandboxes", state="running") == 1
        assert value(m, "moru_capacity_sandboxes_left") == 7
        # The previous scrape's render time on the loop is reported.
        assert 0 < (value(m, "moru_metrics_render_seconds") or 0) < 1

    serve(mgr, body)


def test_values_follow_new_samples_and_states(root: Path) -> None:
    mgr = FakeManager(root)
    a = mgr.add(sid(1))
    a.sample(cpu_used_pct=1.0)
    mgr.add(sid(2), state=State.CREATING)

    async def body(obs: Observability, base: str) -> None:
        m = await asyncio.to_thread(metrics, base)
        assert value(m, "moru_sandbox_cpu_used_pct", sandbox_id=sid(1), template="base") == 1.0
        # No guest sample yet: no guest gauges, but the sandbox is counted.
        assert not any(
            dict(k)["sandbox_id"] == sid(2) for k in series(m, "moru_sandbox_cpu_used_pct")
        )
        assert value(m, "moru_sandboxes", state="creating") == 1
        a.sample(cpu_used_pct=97.0)
        a.rec.state = State.PAUSED
        m = await asyncio.to_thread(metrics, base)
        assert value(m, "moru_sandbox_cpu_used_pct", sandbox_id=sid(1), template="base") == 97.0
        assert value(m, "moru_sandboxes", state="paused") == 1
        assert value(m, "moru_sandboxes", state="running") == 0

    serve(mgr, body)


def test_lifecycle_histograms_and_event_counters_from_the_bus(root: Path) -> None:
    mgr = FakeManager(root)

    async def body(obs: Observability, base: str) -> None:
        bus = mgr.bus
        bus.publish(Event(sid(1), EventType.CREATED, Reason.USER, "base", duration=2.5))
        bus.publish(Event(sid(3), EventType.CREATED, Reason.USER, "base", "ready_snapshot", 0.5))
        bus.publish(Event(sid(1), EventType.PAUSED, Reason.USER, "base", duration=0.02))
        bus.publish(Event(sid(1), EventType.RESUMED, Reason.USER, "base", duration=0.03))
        bus.publish(Event(sid(1), EventType.KILLED, Reason.TIMEOUT, "base", duration=0.4))
        bus.publish(Event(sid(2), EventType.CREATE_FAILED, Reason.CREATE_FAILED, "base", "x", 9.0))
        obs.observe_lifecycle("kill", 0.6)
        m = await asyncio.to_thread(metrics, base)
        h = "moru_lifecycle_duration_seconds"
        assert value(m, f"{h}_count", operation="create") == 2
        assert value(m, f"{h}_sum", operation="create") == 3.0
        assert value(m, f"{h}_bucket", operation="create", le="2.0") == 1
        assert value(m, f"{h}_bucket", operation="create", le="3.0") == 2
        assert value(m, "moru_sandbox_creates_total", path="cold_boot") == 1
        assert value(m, "moru_sandbox_creates_total", path="ready_snapshot") == 1
        assert value(m, f"{h}_count", operation="kill") == 2
        assert value(m, f"{h}_count", operation="pause") == 1
        assert value(m, f"{h}_count", operation="resume") == 1
        ev = "moru_sandbox_events_total"
        assert value(m, ev, type="killed", reason="timeout") == 1
        assert value(m, ev, type="create_failed", reason="create_failed") == 1
        assert value(m, ev, type="created", reason="user") == 2

    serve(mgr, body)


def test_http_endpoint_negotiation_and_errors(root: Path) -> None:
    mgr = FakeManager(root, max_sandboxes=64, memory_budget_mb=64 * 256)
    for i in range(30):  # enough text to be worth compressing
        mgr.add(sid(i)).sample(cpu_used_pct=float(i))

    async def body(obs: Observability, base: str) -> None:
        st, h, raw = await asyncio.to_thread(scrape, f"{base}/metrics", {"Accept-Encoding": "gzip"})
        assert st == 200 and h["Content-Encoding"] == "gzip"
        assert h["Content-Type"].startswith("text/plain; version=0.0.4")
        assert len(parse(gzip.decompress(raw))) > 100
        st, h, raw = await asyncio.to_thread(
            scrape, f"{base}/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert st == 200 and h["Content-Type"].startswith("application/openmetrics-text")
        assert raw.rstrip().endswith(b"# EOF")
        st, _, raw = await asyncio.to_thread(scrape, f"{base}/healthz")
        assert (st, raw) == (200, b"ok\n")
        st, _, _ = await asyncio.to_thread(scrape, f"{base}/nope")
        assert st == 404
        reader, writer = await asyncio.open_connection("127.0.0.1", obs.http.port)  # type: ignore[union-attr]
        writer.write(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        resp = await reader.read()
        writer.close()
        assert resp.startswith(b"HTTP/1.1 405")
        # A client that connects and sends nothing does not block others.
        idle = await asyncio.open_connection("127.0.0.1", obs.http.port)  # type: ignore[union-attr]
        st, _, _ = await asyncio.to_thread(scrape, f"{base}/healthz")
        assert st == 200
        idle[1].close()

    serve(mgr, body)


def test_readiness_reports_templates_and_extra_checks(root: Path) -> None:
    mgr = FakeManager(root)
    images = root / "images"
    images.mkdir()

    async def body(obs: Observability, base: str) -> None:
        import json

        st, _, raw = await asyncio.to_thread(scrape, f"{base}/readyz")
        doc = json.loads(raw)
        checks = {c["name"]: c for c in doc["checks"]}
        assert st == 503 and doc["ready"] is False
        assert checks["hostd"]["ok"] is True
        assert (
            checks["templates"]["ok"] is False and "no templates" in checks["templates"]["detail"]
        )
        assert checks["vmm"]["ok"] is (
            shutil.which("qemu-system-x86_64") is not None
            and shutil.which("vhost-device-vsock") is not None
        )

        async def backend() -> tuple[bool, str]:
            return True, "fine"

        obs.add_readiness_check("backend", backend)
        st, _, raw = await asyncio.to_thread(scrape, f"{base}/readyz")
        assert {c["name"]: c["ok"] for c in json.loads(raw)["checks"]}["backend"] is True

    serve(mgr, body, images_dir=images)

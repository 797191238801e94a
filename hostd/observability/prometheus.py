"""hostd's Prometheus metrics: live state read at scrape time, plus hook-fed histograms.

Per-sandbox and node gauges come from a custom Collector that walks the
manager's live sandboxes when /metrics is scraped, so a killed sandbox's
series vanish by construction (nothing to unregister) and values are never
staler than the last guest sample. Histograms and counters (lifecycle
latency, RPC latency and errors, OOM kills, guestd restarts, events) are
ordinary prometheus_client metrics fed by EventBus hooks, the RPC
interceptor and the console watcher.

Everything lives in one private CollectorRegistry (never the global one),
so two hostd instances in one test process don't collide.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

log = logging.getLogger("hostd.observability")

PREFIX = "moru"
SANDBOX_LABELS = ("sandbox_id", "template")
# TCG boots take seconds; KVM creates and pause/resume take milliseconds.
LIFECYCLE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120)
CALL_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip
STATES = ("creating", "running", "paused", "error")
LIFECYCLE_OPS = ("create", "kill", "pause", "resume")
# How a create started its VM (the created event's message, hostd/sandboxes.py).
CREATE_PATHS = ("warm_pool", "ready_snapshot", "cold_boot")
POOL_LABELS = ("template", "shape")


class ManagerView(Protocol):
    """What the collector needs from hostd.sandboxes.SandboxManager (duck-typed seam).

    `sandbox(id)` returns an object with `.id`, `.rec` (template_id, state,
    end_at), `.metrics` (a sequence of hostd.guest.Sample, newest last) and
    `.res.cgroup` (cpu_usage_seconds(), memory_usage_bytes(), or None).
    `capacity` has max_sandboxes, memory_budget_mb and memory_used_mb.
    `pool` (optional) is a hostd.pool.WarmPool or None.
    """

    capacity: Any

    def ids(self) -> list[str]: ...

    def sandbox(self, sandbox_id: str) -> Any: ...


def live_sandboxes(mgr: ManagerView) -> list[Any]:
    """The manager's sandboxes right now; ones killed meanwhile are skipped."""
    out = []
    for sid in mgr.ids():
        try:
            out.append(mgr.sandbox(sid))
        except Exception:  # NotFound: killed between ids() and here
            continue
    return out


def _state(rec: Any) -> str:
    st = getattr(rec, "state", "")
    return str(getattr(st, "value", st))


def _cgroup_read(cg: Any, method: str) -> float | None:
    fn = getattr(cg, method, None) if cg is not None else None
    if fn is None:
        return None
    try:
        return float(fn())
    except (OSError, ValueError):  # the cgroup is being removed
        return None


class LiveCollector(Collector):
    """Per-sandbox and node gauges, computed from the manager at every scrape."""

    def __init__(self, mgr: ManagerView) -> None:
        self._mgr = mgr

    def describe(self) -> Iterable[Metric]:
        # Empty: the registry then doesn't call collect() at registration,
        # when the manager may not have started yet.
        return []

    def collect(self) -> Iterable[Metric]:
        def g(name: str, doc: str, labels: Iterable[str] = SANDBOX_LABELS) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))

        info = g("sandbox_info", "1 per live sandbox; its state", (*SANDBOX_LABELS, "state"))
        end_at = g("sandbox_end_timestamp_seconds", "When the reaper kills the sandbox (unix s)")
        cpu_pct = g("sandbox_cpu_used_pct", "Guest CPU use 0..100 of all its vCPUs (last sample)")
        cpu_count = g("sandbox_cpu_count", "Guest vCPUs (last sample)")
        mem_used = g("sandbox_mem_used_bytes", "Guest memory used (last sample)")
        mem_total = g("sandbox_mem_total_bytes", "Guest memory total (last sample)")
        disk_used = g("sandbox_disk_used_bytes", "Guest root filesystem used (last sample)")
        disk_total = g("sandbox_disk_total_bytes", "Guest root filesystem size (last sample)")
        sample_ts = g("sandbox_sample_timestamp_seconds", "Host time of the last guest sample")
        host_cpu = CounterMetricFamily(
            f"{PREFIX}_sandbox_host_cpu_seconds",
            "CPU time of the sandbox's cgroup (VMM + vsock device), host view",
            labels=list(SANDBOX_LABELS),
        )
        host_mem = g("sandbox_host_memory_bytes", "Memory charged to the sandbox's cgroup")
        error = g("sandbox_error_info", "1 per sandbox in state error; why",
                  (*SANDBOX_LABELS, "error"))  # fmt: skip
        by_state = dict.fromkeys(STATES, 0)

        for sb in live_sandboxes(self._mgr):
            rec = sb.rec
            lv = [sb.id, rec.template_id]
            state = _state(rec)
            by_state[state] = by_state.get(state, 0) + 1
            info.add_metric([*lv, state], 1)
            end_at.add_metric(lv, float(rec.end_at))
            if getattr(rec, "error", ""):
                error.add_metric([*lv, str(rec.error)], 1)
            if sb.metrics:
                s = sb.metrics[-1]
                cpu_pct.add_metric(lv, s.cpu_used_pct)
                cpu_count.add_metric(lv, s.cpu_count)
                mem_used.add_metric(lv, s.mem_used)
                mem_total.add_metric(lv, s.mem_total)
                disk_used.add_metric(lv, s.disk_used)
                disk_total.add_metric(lv, s.disk_total)
                sample_ts.add_metric(lv, s.timestamp)
            cg = getattr(getattr(sb, "res", None), "cgroup", None)
            v = _cgroup_read(cg, "cpu_usage_seconds")
            if v is not None:
                host_cpu.add_metric(lv, v)
            v = _cgroup_read(cg, "memory_usage_bytes")
            if v is not None:
                host_mem.add_metric(lv, v)

        yield from (info, end_at, cpu_pct, cpu_count, mem_used, mem_total, disk_used)
        yield from (disk_total, sample_ts, host_cpu, host_mem, error)

        node = g("sandboxes", "Sandboxes on this node by state", ["state"])
        for st, n in by_state.items():
            node.add_metric([st], n)
        yield node
        cap = self._mgr.capacity
        n_live = sum(by_state.values())
        yield GaugeMetricFamily(
            f"{PREFIX}_capacity_sandboxes_max", "max_sandboxes", value=cap.max_sandboxes
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_capacity_sandboxes_left",
            "Sandboxes that can still be created (max_sandboxes - live)",
            value=max(0, cap.max_sandboxes - n_live),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_capacity_memory_budget_bytes",
            "Guest memory all sandboxes may use together",
            value=cap.memory_budget_mb << 20,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_capacity_memory_left_bytes",
            "Guest memory budget not reserved by live sandboxes",
            value=max(0, cap.memory_budget_mb - cap.memory_used_mb) << 20,
        )
        pool = getattr(self._mgr, "pool", None)
        if pool is not None:
            yield from pool_metrics(pool.stats())


def pool_metrics(stats: Iterable[Any]) -> Iterator[Metric]:
    """The warm pool's families (hostd.pool.ShapeStats per configured shape)."""

    def fam(kind: Any, name: str, doc: str, labels: Iterable[str] = POOL_LABELS) -> Any:
        return kind(f"{PREFIX}_warm_pool_{name}", doc, labels=list(labels))

    size = fam(GaugeMetricFamily, "size", "Members the pool keeps for this shape (configured)")
    ready = fam(GaugeMetricFamily, "ready", "Members ready to be claimed")
    preparing = fam(GaugeMetricFamily, "preparing", "Members being prepared (refill in flight)")
    claims = fam(CounterMetricFamily, "claims", "Creates served by claiming a member")
    misses = fam(CounterMetricFamily, "misses", "Creates of this shape that found no member ready")
    failures = fam(CounterMetricFamily, "refill_failures", "Failed attempts to prepare a member")
    removed = fam(
        CounterMetricFamily,
        "removed",
        "Members destroyed unclaimed: why=died, recycled (max age) or evicted (node full)",
        (*POOL_LABELS, "why"),
    )
    refill = fam(SummaryMetricFamily, "refill_seconds", "Time to prepare one member")
    for st in stats:
        lv = [st.shape.template, str(st.shape)]
        size.add_metric(lv, st.target)
        ready.add_metric(lv, st.ready)
        preparing.add_metric(lv, st.preparing)
        claims.add_metric(lv, st.claims)
        misses.add_metric(lv, st.misses)
        failures.add_metric(lv, st.refill_failures)
        for why, n in (("died", st.died), ("recycled", st.recycled), ("evicted", st.evicted)):
            removed.add_metric([*lv, why], n)
        refill.add_metric(lv, count_value=st.refills, sum_value=st.refill_seconds_sum)
    yield from (size, ready, preparing, claims, misses, failures, removed, refill)


class Metrics:
    """The registry and the hook-fed metrics; one per hostd."""

    def __init__(self, mgr: ManagerView | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.lifecycle = Histogram(
            f"{PREFIX}_lifecycle_duration_seconds",
            "Successful create/kill/pause/resume as hostd sees them (create: until guest Init)",
            ["operation"],
            buckets=LIFECYCLE_BUCKETS,
            registry=r,
        )
        self.guest_call = Histogram(
            f"{PREFIX}_guest_call_duration_seconds",
            "Guest calls through hostd (Process/Filesystem passthrough), whole call incl. streams",
            ["method"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.rpc = Histogram(
            f"{PREFIX}_rpc_duration_seconds",
            "hostd's own RPCs (SandboxService, TemplateService, health), whole call",
            ["method"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.rpc_errors = Counter(
            f"{PREFIX}_rpc_errors",
            "RPCs that ended with a status other than OK, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.events = Counter(
            f"{PREFIX}_sandbox_events",
            "Lifecycle events published by hostd, by type and reason",
            ["type", "reason"],
            registry=r,
        )
        self.creates = Counter(
            f"{PREFIX}_sandbox_creates",
            "Successful creates by how the VM started: path=warm_pool (a prepared member"
            " claimed), ready_snapshot (restored from the template's ready snapshot) or cold_boot",
            ["path"],
            registry=r,
        )
        self.oom_kills = Counter(
            f"{PREFIX}_oom_kills",
            "OOM kills: source=host (sandbox cgroup memory.oom_control oom_kill),"
            " source=guest (guest kernel OOM killer, from the console)",
            ["source"],
            registry=r,
        )
        self.guestd_restarts = Counter(
            f"{PREFIX}_guestd_restarts",
            "guestd restarts inside guests (the guest init's console line)",
            registry=r,
        )
        self.render = Gauge(
            f"{PREFIX}_metrics_render_seconds",
            "Time hostd's event loop spent rendering the previous /metrics answer",
            registry=r,
        )
        for op in LIFECYCLE_OPS:
            self.lifecycle.labels(op)
        for src in ("host", "guest"):
            self.oom_kills.labels(src)
        for path in CREATE_PATHS:
            self.creates.labels(path)
        if mgr is not None:
            r.register(LiveCollector(mgr))

    # -- hooks -------------------------------------------------------------

    def observe_lifecycle(self, operation: str, seconds: float) -> None:
        self.lifecycle.labels(operation).observe(seconds)

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """One finished RPC; guest (passthrough) methods go to the guest-call histogram."""
        short = method.rsplit(".", 1)[-1] if method.startswith("/moru.guest.") else ""
        if short:
            self.guest_call.labels(short).observe(seconds)
        else:
            self.rpc.labels(method).observe(seconds)
        if code != "OK":
            self.rpc_errors.labels(method, code).inc()

    def observe_guest_call(self, method: str, code: str, seconds: float) -> None:
        """A guest call hostd makes itself (e.g. "Guest/GetMetrics" from the sampler)."""
        self.guest_call.labels(method).observe(seconds)
        if code != "OK":
            self.rpc_errors.labels(method, code).inc()

    def on_event(self, ev: Any) -> None:
        """EventBus hook (hostd.events.Event): counts events, times lifecycle operations.

        Runs synchronously inside `publish`, so it must never raise.
        """
        try:
            etype = ev.type.name.lower()
            self.events.labels(etype, ev.reason.name.lower()).inc()
            op = _EVENT_OPS.get(etype)
            if op is not None and ev.duration is not None:
                self.lifecycle.labels(op).observe(ev.duration)
            if etype == "created":
                self.creates.labels(ev.message if ev.message in CREATE_PATHS else "cold_boot").inc()
            if etype == "guest_oom":
                self.oom_kills.labels("guest").inc()
        except Exception:
            log.exception("metrics hook failed on %r", ev)

    @contextlib.contextmanager
    def time_lifecycle(self, operation: str) -> Iterator[None]:
        """Times a block into the lifecycle histogram (only when it succeeds)."""
        t0 = time.monotonic()
        yield
        self.observe_lifecycle(operation, time.monotonic() - t0)


_EVENT_OPS = {"created": "create", "killed": "kill", "paused": "pause", "resumed": "resume"}

"""A small stand-in for hostd.sandboxes.SandboxManager, for unit tests of the package.

Why a fake: unit tests of the exporter must run in milliseconds and without
VMs. Everything else is real: hostd's EventBus, Sample, Capacity and State,
prometheus_client, a real HTTP listener, real files for consoles. The fake
cgroup reads its numbers from files the test writes (the real one reads
cgroupfs files the same way). tests/observability/test_hostd_metrics.py
runs the same checks against a real hostd with real VMs.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hostd.config import Config
from hostd.errors import sandbox_not_found
from hostd.events import EventBus
from hostd.guest import Sample
from hostd.resources import Capacity
from hostd.state import State


class FileCgroup:
    """Reads cpu seconds / memory bytes / oom_kill from files in `d`."""

    def __init__(self, d: Path) -> None:
        self.d = d
        d.mkdir(parents=True, exist_ok=True)
        self.set(cpu=0.0, mem=0, oom=0)

    def set(self, cpu: float | None = None, mem: int | None = None, oom: int | None = None) -> None:
        for name, v in (("cpu", cpu), ("mem", mem), ("oom", oom)):
            if v is not None:
                (self.d / name).write_text(str(v))

    def cpu_usage_seconds(self) -> float:
        return float((self.d / "cpu").read_text())

    def memory_usage_bytes(self) -> int:
        return int((self.d / "mem").read_text())

    def oom_kill_count(self) -> int:
        return int((self.d / "oom").read_text())


@dataclass
class FakeSandbox:
    id: str
    rec: Any
    res: Any
    metrics: deque[Sample] = field(default_factory=lambda: deque(maxlen=10))

    def sample(self, **kw: Any) -> Sample:
        base: dict[str, Any] = dict(
            timestamp=time.time(), cpu_count=2, cpu_used_pct=0.0, mem_used=0, mem_total=0,
            disk_used=0, disk_total=0,
        )  # fmt: skip
        base.update(kw)
        s = Sample(**base)
        self.metrics.append(s)
        return s


class FakeManager:
    def __init__(self, root: Path, max_sandboxes: int = 8, memory_budget_mb: int = 4096) -> None:
        self.root = root
        self.bus = EventBus()
        self.capacity = Capacity(
            Config(max_sandboxes=max_sandboxes, memory_budget_mb=memory_budget_mb)
        )
        self._sb: dict[str, FakeSandbox] = {}

    def add(
        self, sid: str, template: str = "base", state: State = State.RUNNING, memory_mb: int = 256
    ) -> FakeSandbox:
        d = self.root / sid
        d.mkdir(parents=True)
        console = d / "console.log"
        console.write_bytes(b"")
        rec = SimpleNamespace(
            sandbox_id=sid, template_id=template, state=state, end_at=time.time() + 300
        )
        res = SimpleNamespace(vm=SimpleNamespace(console_log=console), cgroup=FileCgroup(d / "cg"))
        sb = FakeSandbox(sid, rec, res)
        self._sb[sid] = sb
        self.capacity.reserve(sid, memory_mb)
        return sb

    def remove(self, sid: str) -> None:
        self._sb.pop(sid)
        self.capacity.release(sid)

    def ids(self) -> list[str]:
        return list(self._sb)

    def sandbox(self, sid: str) -> FakeSandbox:
        try:
            return self._sb[sid]
        except KeyError:
            raise sandbox_not_found(sid) from None


def sid(n: int) -> str:
    return "sbx_" + f"{n:020d}"

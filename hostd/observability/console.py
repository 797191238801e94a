"""Watches each guest's serial console and cgroup for what hostd can't otherwise see.

- guestd restarts: the guest init's supervisor (images/guest/guestd-loop.sh)
  prints "moru-init: guestd exited with status N; restart K" on the console
  each time it restarts guestd. The console is read, not guestd's uptime,
  because a restart between two metric samples would otherwise be missed.
- OOM kills inside the guest: the guest kernel's "Out of memory: Killed
  process PID (comm)" (also the memcg variant); printed at KERN_ERR, so it
  reaches the console even with `quiet`. Each one is published on the
  EventBus as GUEST_OOM/OOM (the Prometheus hook counts it from there).
- OOM kills on the host: the sandbox cgroup's oom_kill count
  (SandboxCgroup.oom_kill_count()), polled; increases go to the counter.

Consoles are read incrementally (offset per sandbox). Sandboxes already
running when the watcher starts (re-attached after a hostd restart) are read
from their current end, so nothing is counted twice across restarts.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostd.observability.prometheus import ManagerView, Metrics, live_sandboxes

log = logging.getLogger("hostd.observability")

RESTART_RE = re.compile(rb"moru-init: guestd exited with status (-?\d+); restart (\d+)")
OOM_RE = re.compile(rb"[Oo]ut of memory: Killed process (\d+) \(([^)]*)\)")
MAX_READ = 1 << 20  # per sandbox per scan; a flood of console output is skipped past
MAX_LINE = 8192


@dataclass
class _Cursor:
    offset: int
    partial: bytes = b""
    host_ooms: float | None = None


@dataclass(frozen=True)
class GuestOom:
    sandbox_id: str
    template_id: str
    pid: int
    comm: str


# (sandbox_id, template_id, pid, comm) -> publish a GUEST_OOM event
OomPublisher = Callable[[GuestOom], None]


def _console_path(sb: Any) -> Path | None:
    vm = getattr(getattr(sb, "res", None), "vm", None)
    p = getattr(vm, "console_log", None) if vm is not None else None
    return Path(p) if p is not None else None


class ConsoleWatcher:
    def __init__(
        self, mgr: ManagerView, metrics: Metrics, publish_oom: OomPublisher | None = None
    ) -> None:
        self._mgr = mgr
        self._metrics = metrics
        self._publish_oom = publish_oom
        self._cursors: dict[str, _Cursor] = {}
        self._primed = False

    def prime(self) -> None:
        """Starts every sandbox known now at its console's end (they were counted before)."""
        for sb in live_sandboxes(self._mgr):
            path = _console_path(sb)
            size = 0
            if path is not None:
                try:
                    size = path.stat().st_size
                except OSError:
                    size = 0
            cur = _Cursor(offset=size)
            cur.host_ooms = self._host_ooms(sb)
            self._cursors[sb.id] = cur
        self._primed = True

    def forget(self, sandbox_id: str) -> None:
        self._cursors.pop(sandbox_id, None)

    def scan_once(self) -> None:
        """Reads new console bytes and cgroup OOM counts of every live sandbox."""
        if not self._primed:
            self.prime()
        live = live_sandboxes(self._mgr)
        seen = set()
        for sb in live:
            seen.add(sb.id)
            cur = self._cursors.setdefault(sb.id, _Cursor(offset=0))
            try:
                self._scan_console(sb, cur)
            except Exception:
                log.exception("console scan of %s failed", sb.id)
            n = self._host_ooms(sb)
            if n is not None:
                if cur.host_ooms is not None and n > cur.host_ooms:
                    self._metrics.oom_kills.labels("host").inc(n - cur.host_ooms)
                    log.warning("sandbox %s: host OOM killer fired in its cgroup", sb.id)
                cur.host_ooms = n
        for sid in set(self._cursors) - seen:
            del self._cursors[sid]

    async def run(self, interval: float = 1.0) -> None:
        """Scans every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.scan_once()

    @staticmethod
    def _host_ooms(sb: Any) -> float | None:
        cg = getattr(getattr(sb, "res", None), "cgroup", None)
        fn = getattr(cg, "oom_kill_count", None) if cg is not None else None
        if fn is None:
            return None
        try:
            return float(fn())
        except (OSError, ValueError):
            return None

    def _scan_console(self, sb: Any, cur: _Cursor) -> None:
        path = _console_path(sb)
        if path is None:
            return
        try:
            with path.open("rb") as f:
                size = f.seek(0, 2)
                if size < cur.offset:  # truncated or rotated: start over
                    cur.offset, cur.partial = 0, b""
                if size - cur.offset > MAX_READ:
                    cur.offset, cur.partial = size - MAX_READ, b""
                if size == cur.offset:
                    return
                f.seek(cur.offset)
                data = f.read(size - cur.offset)
        except FileNotFoundError:
            return
        cur.offset += len(data)
        lines = (cur.partial + data).split(b"\n")
        cur.partial = lines.pop()[-MAX_LINE:]
        for line in lines:
            self._line(sb, line)

    def _line(self, sb: Any, line: bytes) -> None:
        if RESTART_RE.search(line):
            self._metrics.guestd_restarts.inc()
            log.warning("sandbox %s: %s", sb.id, line.decode("utf-8", "replace").strip())
            return
        m = OOM_RE.search(line)
        if m is None:
            return
        oom = GuestOom(
            sb.id, sb.rec.template_id, int(m.group(1)), m.group(2).decode("utf-8", "replace")
        )
        log.warning("sandbox %s: guest OOM killer killed pid %d (%s)", sb.id, oom.pid, oom.comm)
        if self._publish_oom is not None:
            self._publish_oom(oom)
        else:
            self._metrics.oom_kills.labels("guest").inc()

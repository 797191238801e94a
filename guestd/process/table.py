"""The process table: every started (or adopted) process by pid, with tags,
limits, and ended ones kept for Connect (bounded count and bytes)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from guestd.errors import AlreadyExists, NotFound, ResourceExhausted
from guestd.limits import release
from guestd.process.login import LoginEnvs
from guestd.process.manager import ManagedProcess
from guestd.process.spawn import Spec, spawn


class Journal(Protocol):
    """Keeps a note of each running process outside guestd (guestd.process.registry)."""

    def record(self, proc: ManagedProcess) -> None: ...

    def forget(self, pid: int) -> None: ...


class ProcessManager:
    """The table of processes, by pid; tags are unique among running ones."""

    journal: Journal | None = None  # set in the guest: survivors of a guestd restart

    def __init__(
        self,
        init_env: Callable[[], dict[str, str]],
        *,
        buffer_bytes: int,
        keepalive: float,
        keep_ended: int = 128,
        max_running: int = 4096,
    ) -> None:
        self.buffer_bytes = buffer_bytes
        self.keepalive = keepalive
        self._init_env = init_env
        self.logins = LoginEnvs(init_env)  # shell commands' login environments
        self._keep_ended = keep_ended
        self._max_running = max_running
        self._procs: dict[int, ManagedProcess] = {}
        self._live = 0  # started and not yet ended (counted, not scanned: Start stays O(1))
        self._ended: OrderedDict[int, int] = OrderedDict()  # pid -> output bytes it holds
        self._ended_bytes = 0

    def start(self, spec: Spec) -> ManagedProcess:
        if spec.tag and any(p.running and p.tag == spec.tag for p in self._procs.values()):
            raise AlreadyExists(f"tag: a running process already has tag {spec.tag!r}")
        if self._live >= self._max_running:
            raise ResourceExhausted(f"too many processes (limit {self._max_running})")
        child = spawn(spec, self._init_env())
        old = self._procs.pop(child.pid, None)  # a kept ended entry whose pid was reused
        if old is not None:
            self._ended_bytes -= self._ended.pop(old.pid, 0)
        proc = ManagedProcess(child, spec, self.buffer_bytes, self._ended_cb)
        self.add(proc)
        if self.journal is not None:
            self.journal.record(proc)
        return proc

    def add(self, proc: ManagedProcess) -> None:
        """A running process into the table (a new child, or one adopted after a restart)."""
        self._procs[proc.pid] = proc
        self._live += 1

    @property
    def ended_callback(self) -> Callable[[ManagedProcess], None]:
        return self._ended_cb

    def _ended_cb(self, proc: ManagedProcess) -> None:
        self._live -= 1
        release(proc.pid)
        if self._procs.get(proc.pid) is not proc:
            return  # its pid was reused while its pipes drained: the table has the new one
        if self.journal is not None:
            self.journal.forget(proc.pid)
        held = proc.log.held_bytes()  # final: an ended process's log no longer changes
        self._ended[proc.pid] = held
        self._ended_bytes += held
        budget = 64 * 1024 * 1024
        while len(self._ended) > self._keep_ended or (
            len(self._ended) > 1 and self._ended_bytes > budget
        ):
            pid, n = self._ended.popitem(last=False)
            self._ended_bytes -= n
            self._procs.pop(pid, None)

    def get(self, pid: int = 0, tag: str = "") -> ManagedProcess:
        if tag:
            found = [p for p in self._procs.values() if p.tag == tag]
            if not found:
                raise NotFound(f"tag: no process with tag {tag!r}")
            running = [p for p in found if p.running]
            return running[0] if running else max(found, key=lambda p: p.started_at)
        proc = self._procs.get(pid)
        if proc is None:
            raise NotFound(f"pid: no process {pid}")
        return proc

    def list(self, include_ended: bool) -> list[ManagedProcess]:
        return [p for p in self._procs.values() if include_ended or p.end is None]

    def kill_all(self) -> None:
        for proc in self._procs.values():
            proc.kill()

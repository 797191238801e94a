"""Processes that outlive guestd: a record per started process, re-adopted by the next guestd.

Commands run in sessions of their own, so when guestd dies (OOM, a crash, a
kill) its restart loop starts a fresh guestd while they keep running. Without
a record the new guestd would not know them: absent from List, no signal, no
Connect. So guestd writes one small file per process it starts that runs
longer than RECORD_AFTER, ``/run/moru/processes/<pid>.json`` (tmpfs: gone
with the guest, as the processes are), and removes it when the process ends. A guestd that starts
reads them back and adopts every process still alive.

A pid can be reused between the two guestds: each record keeps the process's
start time (field 22 of /proc/<pid>/stat, clock ticks since boot), and a pid
whose start time differs is another process; its record is dropped. The
adopted process is then pinned with a pidfd, which also says when it ends.

What an adopted process does not have (docs/guestd.md, "guestd restarts"):
- its earlier output, and any later output: its stdout/stderr were pipes
  whose reading ends died with the old guestd, so its next write gets
  SIGPIPE (or EPIPE) — a process that keeps printing ends at its next write;
  one writing to a file or nowhere runs on;
- stdin and its terminal (also the old guestd's);
- its exit status: it is no longer guestd's child (busybox init reaps it),
  so guestd reads the status from /proc/<pid>/stat while the process is a
  zombie when it can, and otherwise reports exit code -1 with status
  "exit status unknown".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from guestd.errors import FailedPrecondition
from guestd.process.events import End, end_of
from guestd.process.manager import ManagedProcess, ProcessManager
from guestd.process.spawn import Child, Spec

log = logging.getLogger("guestd.registry")

REGISTRY_DIR = "/run/moru/processes"
RECORD_AFTER = 0.05  # seconds a process runs before it is recorded
UNKNOWN = "exit status unknown (started before guestd restarted)"


@dataclass
class Record:
    """What List shows of a process, and how to know it is still the same one."""

    pid: int
    start_ticks: int
    started_at: float
    argv: list[str] = field(default_factory=list)
    shell: str = ""
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    user: str = ""
    pty: bool = False
    stdin: bool = False
    timeout: float = 0.0
    tag: str = ""
    cgroup: str = ""

    def spec(self) -> Spec:
        left = 0.0
        if self.timeout > 0:  # the rest of its timeout; at once when it is over
            left = max(0.001, self.timeout - (time.time() - self.started_at))
        return Spec(argv=list(self.argv), shell=self.shell, env=dict(self.env), cwd=self.cwd,
                    user=self.user, stdin=self.stdin, timeout=left, tag=self.tag)


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces and parens)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2:].decode().split()


def start_ticks(pid: int) -> int | None:
    f = _stat_fields(pid)
    return int(f[19]) if f and len(f) > 19 else None  # field 22: starttime


def zombie_status(pid: int) -> int | None:
    """The wait status of an ended process init has not reaped yet (field 52)."""
    f = _stat_fields(pid)
    if not f or f[0] != "Z" or len(f) < 50:
        return None
    return int(f[49])


def _cgroup(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return f.read().strip().rpartition(":")[2]
    except OSError:
        return ""


class Registry:
    """The record files; every failure to write one is logged and ignored
    (a lost record only costs the adoption of that process)."""

    def __init__(self, directory: str = REGISTRY_DIR) -> None:
        self.dir = directory
        self._pending: dict[int, asyncio.TimerHandle] = {}  # pid -> its record's timer
        with contextlib.suppress(OSError):
            os.makedirs(directory, mode=0o700, exist_ok=True)

    def _path(self, pid: int) -> str:
        return os.path.join(self.dir, f"{pid}.json")

    def record(self, proc: ManagedProcess) -> None:
        """Notes `proc` once it has run RECORD_AFTER: most commands end sooner
        and so cost no file (a guestd dying within that time loses the record)."""
        loop = asyncio.get_running_loop()
        self._pending[proc.pid] = loop.call_later(RECORD_AFTER, self._write, proc)

    def _write(self, proc: ManagedProcess) -> None:
        if not proc.running:
            return
        self._pending.pop(proc.pid, None)
        ticks = start_ticks(proc.pid)
        if ticks is None:
            return  # gone already: nothing to adopt later
        s = proc.spec
        rec = Record(proc.pid, ticks, proc.started_at, list(s.argv), s.shell, dict(s.env),
                     s.cwd, s.user, proc.pty, s.stdin, s.timeout, s.tag, _cgroup(proc.pid))
        import json  # here, not at guestd's start: its import costs the guest's boot

        # One write, no rename (this runs on every Start): a record torn by
        # guestd's death is unreadable, and dropped by the next guestd.
        data = json.dumps(rec.__dict__).encode()
        try:
            fd = os.open(self._path(proc.pid), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         0o600)  # fmt: skip
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("process %d: cannot record it in %s: %s", proc.pid, self.dir, e)

    def forget(self, pid: int) -> None:
        pending = self._pending.pop(pid, None)
        if pending is not None:
            pending.cancel()
            return
        with contextlib.suppress(OSError):
            os.unlink(self._path(pid))

    def survivors(self) -> list[Record]:
        """The recorded processes still running (the same ones); the others' records go."""
        import json  # see record()

        out: list[Record] = []
        try:
            names = os.listdir(self.dir)
        except OSError:
            return out
        for name in names:
            path = os.path.join(self.dir, name)
            if not name.endswith(".json"):  # not ours
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            try:
                with open(path) as f:
                    rec = Record(**json.load(f))
            except (OSError, ValueError, TypeError) as e:
                log.warning("dropping unreadable process record %s: %s", path, e)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            if start_ticks(rec.pid) != rec.start_ticks or zombie_status(rec.pid) is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            out.append(rec)
        return out


class AdoptedProcess(ManagedProcess):
    """A survivor of an earlier guestd: listed, signalled and waited for, without output."""

    def __init__(self, rec: Record, buffer_bytes: int,
                 on_end: Callable[[ManagedProcess], None]) -> None:
        super().__init__(Child(rec.pid, {}, None), rec.spec(), buffer_bytes, on_end)
        self.pty = rec.pty
        self.started_at = rec.started_at
        self.record = rec
        self._zombie: int | None = None

    def _on_exit(self) -> None:
        # Read before init reaps it; waitpid then fails (not our child) and the
        # base class ends the process anyway.
        self._zombie = zombie_status(self.pid)
        super()._on_exit()

    def _final_end(self) -> End:
        if self._zombie is not None:
            return end_of(self._zombie, self._timed_out)
        return End(-1, 0, False, self._timed_out, UNKNOWN)

    def close_pidfd(self) -> None:
        """Lets go of a process adopted by mistake (its pid was reused)."""
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        if self._timer is not None:
            self._timer.cancel()

    def _gone(self, what: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"pid {self.pid}: {what} went with the guestd that started the process")

    async def write_input(self, data: bytes) -> None:
        raise self._gone("its stdin")

    async def close_stdin(self) -> None:
        raise self._gone("its stdin")

    def resize(self, cols: int, rows: int) -> None:
        raise self._gone("its terminal")


def adopt_survivors(manager: ProcessManager, registry: Registry) -> list[int]:
    """Adopts every recorded process still alive; from now on `registry` records new ones."""
    adopted: list[int] = []
    for rec in registry.survivors():
        try:
            proc = AdoptedProcess(rec, manager.buffer_bytes, manager.ended_callback)
        except OSError as e:  # ended between the check and pidfd_open
            log.info("process %d ended before it could be adopted: %s", rec.pid, e)
            registry.forget(rec.pid)
            continue
        if start_ticks(rec.pid) != rec.start_ticks:  # reused just before the pidfd pinned it
            proc.close_pidfd()
            registry.forget(rec.pid)
            continue
        manager.add(proc)
        adopted.append(rec.pid)
    manager.journal = registry
    if adopted:
        log.warning("adopted %d process(es) started before guestd restarted: %s",
                    len(adopted), adopted)  # fmt: skip
    return adopted

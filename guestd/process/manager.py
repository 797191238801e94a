"""The process table: children that outlive the streams that started them.

Output policy (the part users hurt on elsewhere):

* Every process's output is read into its `OutputLog`, which keeps the newest
  `buffer_bytes` of each stream. Start and Connect streams are cursors into
  it; Connect replays what is still held, then follows live.
* Backpressure: before reading a stream, guestd looks at the cursors attached
  to the process. If at least one is attached and *every* one is so far behind
  that the next read would push unread bytes out of the buffer, guestd stops
  reading that pipe; the child then blocks in write(), exactly as with a plain
  pipe. A single fast reader of 1 GB thus gets it all at full speed with
  constant memory, and a single slow reader slows the child down instead of
  losing output. When a fast and a slow reader are attached, the fast one sets
  the pace and the slow one is told how many bytes it missed (OutputDropped).
  With nobody attached guestd keeps reading (a detached process never blocks)
  and keeps only the newest bytes, reporting the rest as dropped on replay.
* End: once the child is reaped, guestd drains what is left in its pipes and
  then ends the streams. Output a surviving grandchild writes later is not
  waited for, so a command that starts a daemon still ends.
* Ended processes stay in the table for Connect (bounded count and bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal as signals
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from guestd.allocator import keep_bulk_buffers
from guestd.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
)
from guestd.limits import release
from guestd.process.events import Data, Dropped, End, Event, KeepAlive, end_of
from guestd.process.login import LoginEnvs
from guestd.process.output import Cursor, OutputLog
from guestd.process.spawn import DEFAULT_PIPE_SIZE, Child, Spec, grow_pipe, set_winsize, spawn

READ_MAX = 1024 * 1024
MESSAGE_MAX = 1024 * 1024  # output bytes per event: per-message cost dominates gRPC in Python
NAP_BELOW = 64 * 1024  # after a read smaller than this from a running process ...
NAP = 0.001  # ... poll that pipe again only this much later (fewer, bigger reads)
DRAIN_AFTER_EXIT = 8 * 1024 * 1024  # stop draining a pipe a grandchild keeps filling
BATCH_BYTES = MESSAGE_MAX  # a follower sends at once when this much is waiting ...
BATCH_QUIET = 0.002  # ... or when the process wrote nothing for this long (interactive) ...
BATCH_MAX_WAIT = 0.02  # ... or at the latest this long after the first byte of the batch


def _set_false(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


class ManagedProcess:
    """One child: its output log, readers, stdin, timeout and end."""

    def __init__(
        self, child: Child, spec: Spec, buffer_bytes: int, on_end: Callable[[ManagedProcess], None]
    ) -> None:
        self.pid = child.pid
        self.spec = spec
        self.tag = spec.tag
        self.pty = spec.pty is not None
        self.started_at = time.time()
        self.end: End | None = None
        self.log = OutputLog(tuple(child.fds), buffer_bytes)
        self._capacity = buffer_bytes
        # At most a chunk per read, so one read never overshoots the buffer.
        self._read_size = max(1024, min(READ_MAX, buffer_bytes // 4))
        self._fds = dict(child.fds)
        self._paused: set[str] = set()
        self._naps: dict[str, asyncio.TimerHandle] = {}
        self._grown: set[str] = set()
        self._stdin_fd = child.stdin_fd
        self._stdin_lock = asyncio.Lock()
        self._followers: set[int] = set()
        self._cursors: dict[int, Cursor] = {}
        self._total = 0  # bytes read from all streams so far
        # Followers waiting for output: (wake once _total reaches this, future).
        self._waiters: list[tuple[int, asyncio.Future[bool]]] = []
        self._status: int | None = None
        self._timed_out = False
        self._on_end = on_end
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._pidfd = os.pidfd_open(self.pid)
        self._loop.add_reader(self._pidfd, self._on_exit)
        for kind, fd in self._fds.items():
            self._loop.add_reader(fd, self._on_readable, kind)
        if spec.timeout > 0:
            self._timer = self._loop.call_later(spec.timeout, self._on_timeout)

    @property
    def running(self) -> bool:
        return self._status is None

    # -- output ------------------------------------------------------------

    def _notify(self) -> None:
        """Wakes every waiting follower (end, pause, close)."""
        waiters, self._waiters = self._waiters, []
        for _, fut in waiters:
            if not fut.done():
                fut.set_result(True)

    def _data_arrived(self) -> None:
        """Wakes the followers whose batch is now big enough (cheap: runs per read)."""
        if any(self._total >= want for want, _ in self._waiters):
            keep = []
            for want, fut in self._waiters:
                if self._total < want:
                    keep.append((want, fut))
                elif not fut.done():
                    fut.set_result(True)
            self._waiters = keep

    async def _wait_for(self, total: int, patience: float) -> bool:
        """Until _total >= `total` or something else changed (True), or `patience` s (False).

        A bare future and timer: asyncio.wait_for would make a task per wait,
        and a follower waits once per message."""
        fut: asyncio.Future[bool] = self._loop.create_future()
        entry = (total, fut)
        self._waiters.append(entry)
        timer = self._loop.call_later(patience, _set_false, fut)
        try:
            return await fut
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):  # gone already when woken by output
                self._waiters.remove(entry)

    def _must_wait(self, kind: str) -> bool:
        """True when every attached reader would lose bytes if we read more."""
        if not self._cursors:
            return False
        limit = self._capacity - self._read_size
        return all(self.log.unread(c, kind) > limit for c in self._cursors.values())

    def _read_once(self, kind: str) -> bool:
        """One read from `kind`; False when the pipe is empty or closed."""
        fd = self._fds[kind]
        try:
            data = os.read(fd, self._read_size)
        except BlockingIOError:
            return False
        except OSError as exc:  # EIO: the pty's other side is gone
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            self._close(kind)
            return False
        if len(data) >= DEFAULT_PIPE_SIZE // 2 and kind not in self._grown:
            self._grown.add(kind)  # a fast writer: bigger pipe, reusable buffers
            keep_bulk_buffers()
            if not self.pty:
                grow_pipe(fd)
        self.log.append(kind, data)
        self._total += len(data)
        if self._waiters:
            self._data_arrived()
        return True

    def _on_readable(self, kind: str) -> None:
        if self._must_wait(kind):
            self._pause(kind)
            return
        before = self._total
        if self._read_once(kind) and self._total - before < NAP_BELOW and self.running:
            # A writer of many small writes would wake guestd once per write;
            # a short nap lets the pipe collect them (it holds PIPE_SIZE bytes).
            self._loop.remove_reader(self._fds[kind])
            self._naps[kind] = self._loop.call_later(NAP, self._end_nap, kind)

    def _end_nap(self, kind: str) -> None:
        self._naps.pop(kind, None)
        if kind in self._fds and kind not in self._paused and self.running:
            self._loop.add_reader(self._fds[kind], self._on_readable, kind)

    def _pause(self, kind: str) -> None:
        self._loop.remove_reader(self._fds[kind])
        self._paused.add(kind)
        self._notify()  # a follower still gathering a batch: send what is there

    def _drain(self, kind: str) -> None:
        """After exit: read what the pipe holds, then close it."""
        budget = DRAIN_AFTER_EXIT
        while kind in self._fds and budget > 0:
            if self._must_wait(kind):
                self._pause(kind)
                return
            before = self.log.streams[kind].end
            if not self._read_once(kind):
                break
            budget -= self.log.streams[kind].end - before
        if kind in self._fds:
            self._close(kind)
        self._maybe_finish()

    def _resume(self) -> None:
        for kind in list(self._paused):
            if self._must_wait(kind):
                continue
            self._paused.discard(kind)
            if self.running:
                self._loop.add_reader(self._fds[kind], self._on_readable, kind)
            else:
                self._drain(kind)

    def _close(self, kind: str) -> None:
        fd = self._fds.pop(kind)
        nap = self._naps.pop(kind, None)
        if nap is not None:
            nap.cancel()
        self._loop.remove_reader(fd)
        self._paused.discard(kind)
        if fd == self._stdin_fd:  # the pty master is both
            self._stdin_fd = None
        os.close(fd)
        self._maybe_finish()

    # -- lifetime ----------------------------------------------------------

    def _on_exit(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: end it anyway rather than hang
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._status = status
        if self._timer is not None:
            self._timer.cancel()
        for kind in list(self._fds):
            if kind not in self._paused:
                self._drain(kind)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._status is None or self._fds or self.end is not None:
            return
        self.end = self._final_end()
        if self._stdin_fd is not None:
            os.close(self._stdin_fd)
            self._stdin_fd = None
        self._notify()
        self._on_end(self)

    def _final_end(self) -> End:
        assert self._status is not None
        return end_of(self._status, self._timed_out)

    def _on_timeout(self) -> None:
        self._timed_out = True
        self._kill_group(signals.SIGKILL)

    def _kill_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    # -- client operations -------------------------------------------------

    def attach(self, live_only: bool = False) -> Cursor:
        """A reader's cursor, counted for backpressure from this moment on."""
        cursor = self.log.new_cursor(live_only)
        self._cursors[id(cursor)] = cursor
        return cursor

    def hold(self, cursor: Cursor) -> None:
        """Counts `cursor` for backpressure again (a reader handing it on: output channel)."""
        self._cursors[id(cursor)] = cursor

    def wake(self) -> None:
        """Wakes followers waiting for output (to see their `until`)."""
        self._notify()

    def detach(self, cursor: Cursor) -> None:
        if self._cursors.pop(id(cursor), None) is not None and self._paused:
            self._resume()

    async def follow(
        self, cursor: Cursor, keepalive: float, until: asyncio.Future[None] | None = None
    ) -> AsyncIterator[Event]:
        """Events for one reader until the process ends (replay, then live), or
        until `until` is done (seen between events; wake() to see it at once)."""
        key = id(cursor)
        self._cursors[key] = cursor
        try:
            while until is None or not until.done():
                dropped, item = self.log.take_parts(cursor, MESSAGE_MAX)
                if dropped:
                    yield Dropped(dropped)
                if item is not None:
                    if self._paused:
                        self._resume()
                    yield Data(*item)
                    continue
                if self.end is not None:
                    yield self.end
                    return
                # Everything read so far is taken: wait for more output.
                base = self._total
                if not await self._wait_for(base + 1, keepalive):
                    yield KeepAlive()
                    continue
                await self._gather_more(base)
        finally:
            self.detach(cursor)

    async def _gather_more(self, base: int) -> None:
        """Woken by a little output from a running process (`base`: bytes read
        when this reader had taken everything): wait for more, so a fast
        writer's output goes out in a few big messages (per-message cost
        dominates) rather than many small ones. Sends as soon as a batch is
        full, the process was quiet for BATCH_QUIET, or BATCH_MAX_WAIT passed."""
        want = base + max(1, min(BATCH_BYTES, self._capacity - self._read_size))
        give_up = self._loop.time() + BATCH_MAX_WAIT
        while self.running and not self._paused and self._total < want:
            seen = self._total
            left = give_up - self._loop.time()
            if left <= 0:
                return
            if await self._wait_for(want, min(BATCH_QUIET, left)):
                continue  # batch full, or paused/ended: the loop condition decides
            if self._total == seen:
                return  # quiet: send what there is

    def signal(self, sig: int) -> None:
        if not self.running:
            raise FailedPrecondition(f"pid {self.pid}: process has ended")
        self._kill_group(sig)

    async def write_input(self, data: bytes) -> None:
        async with self._stdin_lock:
            if self.end is not None:
                raise FailedPrecondition(f"pid {self.pid}: process has ended")
            if self._stdin_fd is None:
                if self.spec.stdin or self.pty:
                    raise FailedPrecondition(f"pid {self.pid}: stdin is closed")
                raise FailedPrecondition(
                    f"pid {self.pid}: process was started without stdin (set stdin=true)"
                )
            view = memoryview(data)
            while view:
                fd = self._stdin_fd
                if fd is None:
                    raise FailedPrecondition(f"pid {self.pid}: stdin is closed")
                try:
                    n = os.write(fd, view)
                    view = view[n:]
                except BlockingIOError:
                    await self._writable(fd)
                except BrokenPipeError:
                    raise FailedPrecondition(
                        f"pid {self.pid}: stdin was closed by the process"
                    ) from None

    async def _writable(self, fd: int) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self._loop.add_writer(fd, ready)
        try:
            await fut
        finally:
            self._loop.remove_writer(fd)

    async def close_stdin(self) -> None:
        if self.pty:  # a terminal has no separate stdin: send its EOF character
            await self.write_input(b"\x04")
            return
        async with self._stdin_lock:
            if self.end is not None:
                raise FailedPrecondition(f"pid {self.pid}: process has ended")
            if self._stdin_fd is None:
                if not self.spec.stdin:
                    raise FailedPrecondition(
                        f"pid {self.pid}: process was started without stdin (set stdin=true)"
                    )
                raise FailedPrecondition(f"pid {self.pid}: stdin is already closed")
            os.close(self._stdin_fd)
            self._stdin_fd = None

    def resize(self, cols: int, rows: int) -> None:
        if not self.pty:
            raise FailedPrecondition(f"pid {self.pid}: process has no pty")
        fd = self._fds.get("pty")
        if fd is None or self.end is not None:
            raise FailedPrecondition(f"pid {self.pid}: process has ended")
        set_winsize(fd, cols, rows)

    def kill(self) -> None:
        if self.running:
            self._kill_group(signals.SIGKILL)


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

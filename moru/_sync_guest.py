"""Synchronous `sandbox.commands` and `sandbox.files`: thin facades over the async ones.

Output callbacks of a foreground `run` are called in the caller's thread; those
of a background handle in one helper thread per handle, in output order. So a
callback may block, and never stalls the SDK's loop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal, overload

from moru import _loop
from moru._commands import (
    DEFAULT_TIMEOUT,
    AsyncCommandHandle,
    AsyncCommands,
    _start_request,
    command_timeout,
    connected_handle,
    started_handle,
)
from moru._files import AsyncFiles, AsyncWatchHandle, ReadFormat, WriteData
from moru._guest import GuestTarget
from moru._models import CommandResult, EntryInfo, FilesystemEvent, ProcessInfo
from moru._output import Chunk

SyncCallback = Callable[[str], Any]


async def _close(core: AsyncCommandHandle) -> None:
    core.close()


class CommandHandle:
    """A background (or attached) process: `wait()`, `kill()`, `send_stdin()`,
    iteration over (stdout, stderr, pty) chunks, `disconnect()`."""

    def __init__(
        self,
        core: AsyncCommandHandle,
        on_stdout: SyncCallback | None,
        on_stderr: SyncCallback | None,
        background: bool,
        on_pty: Callable[[bytes], Any] | None = None,
    ) -> None:
        self._core = core
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr
        self._on_pty = on_pty
        self._error: BaseException | None = None
        self._disconnected = False
        self._queue: queue.Queue[Chunk | None] | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.Queue()
            self._thread = threading.Thread(
                target=self._pump, name=f"moru-cmd-{core.pid}", daemon=True
            )
            self._thread.start()

    @property
    def pid(self) -> int:
        return self._core.pid

    @property
    def stdout(self) -> str:
        return self._core.stdout

    @property
    def stderr(self) -> str:
        return self._core.stderr

    @property
    def exit_code(self) -> int | None:
        return self._core.exit_code

    def _step(self) -> tuple[bool, Chunk | None]:
        more, chunk = _loop.run(self._core._step())
        if chunk is not None:
            if chunk[0] is not None and self._on_stdout is not None:
                self._on_stdout(chunk[0])
            if chunk[1] is not None and self._on_stderr is not None:
                self._on_stderr(chunk[1])
            if chunk[2] is not None and self._on_pty is not None:
                self._on_pty(chunk[2])
        return more, chunk

    def _pump(self) -> None:
        assert self._queue is not None
        try:
            more = True
            while more:
                more, chunk = self._step()
                if chunk is not None:
                    self._queue.put(chunk)
        except BaseException as e:
            if not self._disconnected:
                self._error = e
        finally:
            self._queue.put(None)

    def wait(self) -> CommandResult:
        """Blocks until the process ends; raises CommandExitException on non-zero."""
        if self._thread is not None:
            self._thread.join()
            if self._error is not None:
                raise self._error
        else:
            more = not self._core._collector.done
            while more:
                more, _ = self._step()
        return self._core._collector.result(timeout=self._core._timeout)

    def __iter__(self) -> Iterator[Chunk]:
        if self._queue is None:
            raise RuntimeError("only background handles can be iterated")
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.put(None)
                if self._error is not None:
                    raise self._error
                return
            yield item

    def kill(self) -> bool:
        """SIGKILLs the process group; False if it had already gone."""
        return _loop.run(self._core.kill())

    def send_stdin(self, data: str | bytes) -> None:
        _loop.run(self._core.send_stdin(data))

    def close_stdin(self) -> None:
        _loop.run(self._core.close_stdin())

    def disconnect(self) -> None:
        """Stops receiving output; the process keeps running."""
        self._disconnected = True
        _loop.run(_close(self._core))
        if self._thread is not None:
            self._thread.join()


class Commands:
    """Processes in the sandbox (`sandbox.commands`)."""

    def __init__(self, target: GuestTarget) -> None:
        self._target = target
        self._core = AsyncCommands(target)

    @overload
    def run(
        self,
        cmd: str,
        envs: dict[str, str] | None = ...,
        cwd: str | None = ...,
        user: str | None = ...,
        background: Literal[False] = ...,
        timeout: float | None = ...,
        on_stdout: SyncCallback | None = ...,
        on_stderr: SyncCallback | None = ...,
        stdin: bool = ...,
    ) -> CommandResult: ...

    @overload
    def run(
        self,
        cmd: str,
        envs: dict[str, str] | None = ...,
        cwd: str | None = ...,
        user: str | None = ...,
        *,
        background: Literal[True],
        timeout: float | None = ...,
        on_stdout: SyncCallback | None = ...,
        on_stderr: SyncCallback | None = ...,
        stdin: bool = ...,
    ) -> CommandHandle: ...

    def run(
        self,
        cmd: str,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        background: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        on_stdout: SyncCallback | None = None,
        on_stderr: SyncCallback | None = None,
        stdin: bool = False,
    ) -> CommandResult | CommandHandle:
        """Runs `cmd` in a shell (`bash -l -c`). Returns the CommandResult, or a
        CommandHandle with background=True. Non-zero exit raises
        CommandExitException; `timeout` (seconds, 0/None: none) is the
        command's own limit, independent of the sandbox's timeout: by default
        60 s in the foreground, none for a background command."""
        timeout = command_timeout(timeout, background)
        if not background and on_stdout is None and on_stderr is None:
            # Nothing to call back in this thread: one hop to the loop for the whole run.
            result: CommandResult = _loop.run(
                self._core.run(cmd, envs, cwd, user, False, timeout, None, None, stdin)
            )
            return result
        req = _start_request(cmd, envs, cwd, user, timeout, stdin)

        core = _loop.run(started_handle(self._target, req, timeout=timeout, pump=False))
        handle = CommandHandle(core, on_stdout, on_stderr, background)
        if background:
            return handle
        try:
            return handle.wait()
        finally:
            _loop.run(_close(core))

    def connect(
        self,
        pid: int,
        timeout: float | None = None,
        on_stdout: SyncCallback | None = None,
        on_stderr: SyncCallback | None = None,
    ) -> CommandHandle:
        """A handle to a running process; its kept output is replayed first."""

        core = _loop.run(connected_handle(self._target, pid, timeout=timeout, pump=False))
        return CommandHandle(core, on_stdout, on_stderr, background=True)

    def list(self) -> list[ProcessInfo]:
        return _loop.run(self._core.list())

    def kill(self, pid: int) -> bool:
        """SIGKILLs a process group; False if no such process."""
        return _loop.run(self._core.kill(pid))

    def send_stdin(self, pid: int, data: str | bytes) -> None:
        _loop.run(self._core.send_stdin(pid, data))

    def close_stdin(self, pid: int) -> None:
        _loop.run(self._core.close_stdin(pid))


class WatchHandle:
    """A directory watch: `for event in handle`, `get_new_events()`, `stop()`."""

    def __init__(self, core: AsyncWatchHandle, on_event: Callable[[FilesystemEvent], Any] | None):
        self._core = core
        self._thread: threading.Thread | None = None
        if on_event is not None:

            def pump() -> None:
                for ev in self:
                    on_event(ev)

            self._thread = threading.Thread(target=pump, name="moru-watch", daemon=True)
            self._thread.start()

    def __iter__(self) -> Iterator[FilesystemEvent]:
        return _loop.iterate(self._core.__aiter__())

    def get_new_events(self) -> list[FilesystemEvent]:
        """Events received since the last call, without waiting."""

        async def get() -> list[FilesystemEvent]:
            return self._core.get_new_events()

        return _loop.run(get())

    def stop(self) -> None:
        _loop.run(self._core.stop())
        if self._thread is not None:
            self._thread.join(5)


class Files:
    """Files in the sandbox (`sandbox.files`); paths are absolute. Every call
    takes `user=`: it acts with that user's rights (default root)."""

    def __init__(self, target: GuestTarget) -> None:
        self._core = AsyncFiles(target)

    @overload
    def read(self, path: str, format: Literal["text"] = ..., user: str | None = ...) -> str: ...

    @overload
    def read(self, path: str, format: Literal["bytes"], user: str | None = ...) -> bytes: ...

    @overload
    def read(
        self, path: str, format: Literal["stream"], user: str | None = ...
    ) -> Iterator[bytes]: ...

    def read(
        self, path: str, format: ReadFormat = "text", user: str | None = None
    ) -> str | bytes | Iterator[bytes]:
        """Text, bytes, or (format="stream") an iterator of chunks for large files."""
        if format == "stream":
            return _loop.iterate(_loop.run(self._core._open_stream(path, user)))
        out: str | bytes = _loop.run(self._core.read(path, format, user))
        return out

    def write(
        self, path: str, data: WriteData, user: str | None = None, mode: int | None = None
    ) -> EntryInfo:
        """Writes str/bytes/a file object/an iterator of chunks, streamed in chunks."""
        return _loop.run(self._core.write(path, data, user, mode))

    def list(self, path: str, depth: int = 1, user: str | None = None) -> list[EntryInfo]:
        return _loop.run(self._core.list(path, depth, user))

    def exists(self, path: str, user: str | None = None) -> bool:
        return _loop.run(self._core.exists(path, user))

    def get_info(self, path: str, user: str | None = None) -> EntryInfo:
        return _loop.run(self._core.get_info(path, user))

    def remove(self, path: str, user: str | None = None) -> None:
        _loop.run(self._core.remove(path, user))

    def rename(self, old_path: str, new_path: str, user: str | None = None) -> EntryInfo:
        return _loop.run(self._core.rename(old_path, new_path, user))

    def make_dir(self, path: str, user: str | None = None) -> bool:
        return _loop.run(self._core.make_dir(path, user))

    def watch_dir(
        self,
        path: str,
        on_event: Callable[[FilesystemEvent], Any] | None = None,
        recursive: bool = False,
        user: str | None = None,
    ) -> WatchHandle:
        """Watches a directory; every change after this returns is reported,
        to `on_event` (in a helper thread) or by iterating the handle."""
        return WatchHandle(_loop.run(self._core.watch_dir(path, None, recursive, user)), on_event)

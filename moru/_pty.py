"""`sandbox.pty`: interactive terminals in the sandbox (E2B's `sandbox.pty`).

A terminal is a process on a pseudo-terminal: guestd runs an interactive
login bash on it (`StartRequest.pty`), its output arrives as raw bytes (the
terminal's screen stream: echo, prompts, escape codes), and input, resize and
signals go to it by pid. Unlike a command, a terminal has no timeout unless
one is given: it lives until it exits, is killed, or the sandbox ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moru import _loop, _validate
from moru._commands import (
    AsyncCommandHandle,
    DataCallback,
    _kill,
    _send_stdin,
    connect_call,
    start_call,
)
from moru._errors import InvalidArgumentException
from moru._guest import GuestTarget
from moru._models import PtySize
from moru._sync_guest import CommandHandle
from moru_proto.guest.v1 import process_pb2 as pb

SHELL = ["/bin/bash", "-i", "-l"]
TERM_ENV = {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _size(size: PtySize | tuple[int, int], field: str = "size") -> pb.PtySize:
    rows, cols = (size.rows, size.cols) if isinstance(size, PtySize) else size
    for n in (rows, cols):
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= 10000:
            raise InvalidArgumentException(
                f"{field}: rows and cols must be whole numbers 1..10000, got {size!r}"
            )
    return pb.PtySize(rows=rows, cols=cols)


def _start_request(
    size: PtySize | tuple[int, int],
    cwd: str | None,
    envs: dict[str, str] | None,
    user: str | None,
    timeout: float | None,
    cmd: list[str] | None,
) -> pb.StartRequest:
    config = pb.ProcessConfig(
        argv=list(cmd or SHELL), env={**TERM_ENV, **(envs or {})}, cwd=cwd or "", user=user or ""
    )
    seconds = _validate.seconds(timeout, "timeout")
    return pb.StartRequest(config=config, pty=_size(size), timeout_seconds=seconds)


async def _resize(target: GuestTarget, pid: int, size: PtySize | tuple[int, int]) -> None:
    req = pb.ResizeRequest(process=pb.ProcessSelector(pid=pid), size=_size(size))
    with target.errors(f"resizing the terminal of process {pid}"):
        await target.process().Resize(req, metadata=target.metadata, timeout=target.timeout)


class AsyncPty:
    """Terminals in one sandbox (`sandbox.pty` of an AsyncSandbox)."""

    def __init__(self, target: GuestTarget) -> None:
        self._target = target

    async def create(
        self,
        size: PtySize | tuple[int, int],
        on_data: DataCallback | None = None,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the terminal's own limit
        cmd: list[str] | None = None,
    ) -> AsyncCommandHandle:
        """Starts an interactive login bash (or `cmd`) on a terminal of `size`.
        Its output goes to `on_data` (bytes) and to `async for _, _, data in
        handle`; `timeout` seconds (default none) limit its life."""
        req = _start_request(size, cwd, envs, user, timeout, cmd)
        pid, call = await start_call(self._target, req)
        return AsyncCommandHandle(self._target, pid, call, timeout=timeout, on_pty=on_data)

    async def connect(self, pid: int, on_data: DataCallback | None = None) -> AsyncCommandHandle:
        """Attaches to a running terminal; what guestd kept of its output comes first."""
        call, first = await connect_call(self._target, pid)
        return AsyncCommandHandle(self._target, pid, call, first=first, on_pty=on_data)

    async def send_stdin(self, pid: int, data: str | bytes) -> None:
        """Types `data` into the terminal (keys, as bytes; "\\x03" is Ctrl-C)."""
        await _send_stdin(self._target, pid, data)

    async def resize(self, pid: int, size: PtySize | tuple[int, int]) -> None:
        """New terminal size; the process gets SIGWINCH."""
        await _resize(self._target, pid, size)

    async def kill(self, pid: int) -> bool:
        """SIGKILLs the terminal's process group; False if it was gone."""
        return await _kill(self._target, pid)


class Pty:
    """Terminals in the sandbox (`sandbox.pty`); output callbacks run in a
    helper thread per terminal, in order."""

    def __init__(self, target: GuestTarget) -> None:
        self._target = target
        self._core = AsyncPty(target)

    def create(
        self,
        size: PtySize | tuple[int, int],
        on_data: Callable[[bytes], Any] | None = None,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
        cmd: list[str] | None = None,
    ) -> CommandHandle:
        """Starts an interactive login bash (or `cmd`) on a terminal of `size`
        (`PtySize(rows, cols)`); output bytes go to `on_data` and to
        `for _, _, data in handle`. No timeout unless given."""
        req = _start_request(size, cwd, envs, user, timeout, cmd)

        async def start() -> AsyncCommandHandle:
            pid, call = await start_call(self._target, req)
            return AsyncCommandHandle(self._target, pid, call, timeout=timeout, pump=False)

        return CommandHandle(_loop.run(start()), None, None, background=True, on_pty=on_data)

    def connect(self, pid: int, on_data: Callable[[bytes], Any] | None = None) -> CommandHandle:
        """Attaches to a running terminal; its kept output is replayed first."""

        async def attach() -> AsyncCommandHandle:
            call, first = await connect_call(self._target, pid)
            return AsyncCommandHandle(self._target, pid, call, pump=False, first=first)

        return CommandHandle(_loop.run(attach()), None, None, background=True, on_pty=on_data)

    def send_stdin(self, pid: int, data: str | bytes) -> None:
        _loop.run(self._core.send_stdin(pid, data))

    def resize(self, pid: int, size: PtySize | tuple[int, int]) -> None:
        _loop.run(self._core.resize(pid, size))

    def kill(self, pid: int) -> bool:
        return _loop.run(self._core.kill(pid))

"""`sandbox.commands` for AsyncSandbox: run, background handles, list/connect/kill.

A command's `timeout` is the command's own: it travels to guestd as
`timeout_seconds`, which kills the process group when it expires. The SDK puts
no gRPC deadline on the output stream, so a long command is never cut off by
the client, and a process outlives its stream (reattach with `connect(pid)`).
Large output moves to an output channel where hostd offers one
(moru._output_channel); small output stays on the event stream.
"""

from __future__ import annotations

import asyncio
import inspect
import signal as _signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from moru import _validate
from moru._connection import EOF
from moru._errors import SandboxException
from moru._guest import GuestTarget
from moru._models import CommandResult, ProcessInfo
from moru._output import Chunk, OutputCollector
from moru._output_channel import CHANNEL_AFTER, Frame, OutputChannel
from moru._output_channel import usable as channel_usable
from moru_proto.guest.v1 import process_pb2 as pb

OutputCallback = Callable[[str], Any] | Callable[[str], Awaitable[Any]]
DataCallback = Callable[[bytes], Any] | Callable[[bytes], Awaitable[Any]]


class _DefaultTimeout(float):
    """The type of DEFAULT_TIMEOUT: a float, told apart from a caller's 60 by identity."""


# run()'s default: 60 s for a foreground command, none for a background one
# (a server started in the background lives until it ends, is killed or the
# sandbox ends). An explicit timeout applies to both.
DEFAULT_TIMEOUT: float = _DefaultTimeout(60)


def command_timeout(timeout: float | None, background: bool) -> float | None:
    """The command's own limit in seconds (None: none) for a run() call."""
    if timeout is DEFAULT_TIMEOUT:
        return None if background else 60.0
    return timeout


async def _call_back(cb: Callable[[Any], Any] | None, data: str | bytes | None) -> None:
    if cb is not None and data is not None:
        r = cb(data)
        if inspect.isawaitable(r):
            await r


def _start_request(
    cmd: str,
    envs: dict[str, str] | None,
    cwd: str | None,
    user: str | None,
    timeout: float | None,
    stdin: bool,
    tag: str | None = None,
) -> pb.StartRequest:
    seconds = _validate.seconds(timeout, "timeout")
    config = pb.ProcessConfig(shell=cmd, env=envs or {}, cwd=cwd or "", user=user or "")
    return pb.StartRequest(config=config, stdin=stdin, timeout_seconds=seconds, tag=tag or "")


def _selector(pid: int) -> pb.ProcessSelector:
    return pb.ProcessSelector(pid=pid)


class AsyncCommandHandle:
    """A started or attached process: wait for it, stream its output, kill it.

    Output is pumped in a task from the moment the handle exists, feeding the
    callbacks in order, the collected result, and `async for` iteration over
    (stdout, stderr, pty) chunks. Given an output channel ticket, the handle
    connects it once CHANNEL_AFTER bytes came as events; after guestd's
    ToChannel event it reads the channel's frames (watching the event stream
    for an error, e.g. the sandbox ending), then the stream's events again
    (the end, or output guestd could not send over the channel).
    """

    def __init__(
        self,
        target: GuestTarget,
        pid: int,
        call: Any,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        timeout: float | None = None,
        pump: bool = True,
        first: pb.ProcessEvent | None = None,
        on_pty: DataCallback | None = None,
        channel: pb.OutputChannel | None = None,
    ) -> None:
        self._target = target
        self._pid = pid
        self._call = call
        self._ticket = channel if channel is not None and channel.ticket else None
        self._event_bytes = 0  # output that came as events (the channel is worth it past some)
        self._connecting: asyncio.Future[OutputChannel | None] | None = None
        self._channel: OutputChannel | None = None
        self._upstream: asyncio.Future[pb.ProcessEvent | None] | None = None
        self._collector = OutputCollector(pid)
        self._pending: list[pb.ProcessEvent] = [first] if first is not None else []
        self._eof = False
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr
        self._on_pty = on_pty
        self._timeout = timeout
        self._queue: asyncio.Queue[Chunk | None] | None = asyncio.Queue() if pump else None
        self._pump: asyncio.Task[None] | None = (
            asyncio.get_running_loop().create_task(self._run_pump()) if pump else None
        )
        self._error: BaseException | None = None

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def stdout(self) -> str:
        """Output collected so far."""
        return self._collector.stdout

    @property
    def stderr(self) -> str:
        return self._collector.stderr

    @property
    def exit_code(self) -> int | None:
        """None while the process runs."""
        end = self._collector.end
        return None if end is None else end.exit_code

    async def _read_event(self) -> pb.ProcessEvent | None:
        with self._target.errors(f"reading output of process {self._pid}"):
            while True:
                ev = await self._call.read()
                if ev is EOF:
                    return None
                if ev.WhichOneof("event") != "keepalive":
                    return ev  # type: ignore[no-any-return]

    async def _next_event(self) -> pb.ProcessEvent | None:
        """The next non-keepalive event, or None when the stream ended."""
        if self._pending:
            return self._pending.pop(0)
        if self._eof:
            return None
        if self._upstream is not None:
            up, self._upstream = self._upstream, None
            ev = await up
        else:
            ev = await self._read_event()
        if ev is None:
            self._eof = True
        return ev

    async def _next_frame(self, channel: OutputChannel) -> Frame | None:
        """The channel's next frame (None: it is done). Meanwhile the event
        stream is read too: its error (the sandbox ended) ends the channel."""
        read = asyncio.ensure_future(channel.read())
        try:
            while not read.done():
                if self._upstream is None and not self._eof and not self._pending:
                    self._upstream = asyncio.ensure_future(self._read_event())
                up = self._upstream
                if up is None or up.done():
                    await asyncio.wait((read,))
                    break
                await asyncio.wait((read, up), return_when=asyncio.FIRST_COMPLETED)
                if up.done() and up.exception() is not None:
                    self._upstream = None
                    self._close_channel()
                    raise up.exception()  # type: ignore[misc]
            frame = read.result()
        finally:
            if not read.done():
                read.cancel()
        if frame is None:
            self._close_channel()
        return frame

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            if not connecting.done():
                connecting.cancel()
            elif not connecting.cancelled() and connecting.exception() is None:
                opened = connecting.result()
                if opened is not None:
                    opened.close()

    def _maybe_connect(self, ev: pb.ProcessEvent) -> None:
        """Connects the channel once the output turns out to be large."""
        if self._ticket is None or self._connecting is not None:
            return
        d = ev.data
        self._event_bytes += len(d.stdout) + len(d.stderr) + len(d.pty)
        if self._event_bytes >= CHANNEL_AFTER:
            self._connecting = asyncio.ensure_future(OutputChannel.open(self._ticket))

    async def _switch(self) -> None:
        """guestd's ToChannel: the output continues on the channel we connected."""
        connecting, self._connecting = self._connecting, None
        channel = await connecting if connecting is not None else None
        if channel is None:
            raise SandboxException(f"process {self._pid}: guestd moved the output to a"
                                   " channel this client did not connect")
        self._channel = channel

    def close(self) -> None:
        """Stops reading: the stream, the channel and a read in flight (internal;
        the process keeps running)."""
        self._call.cancel()
        self._close_channel()
        if self._upstream is not None:
            self._upstream.cancel()
            self._upstream = None

    async def _step(self) -> tuple[bool, Chunk | None]:
        """Consumes one event or frame; (more to come, chunk). Calls the callbacks."""
        chunk: Chunk | None = None
        frame = await self._next_frame(self._channel) if self._channel is not None else None
        if frame is not None:
            chunk = self._collector.feed_frame(frame)
        else:
            ev = await self._next_event()
            if ev is None:
                self._close_channel()
                return False, None
            which = ev.WhichOneof("event")
            if which == "to_channel":
                await self._switch()
                return True, None
            if which == "data":
                self._maybe_connect(ev)
            elif which == "end":
                self._close_channel()
            chunk = self._collector.feed(ev)
        if chunk is not None:
            await _call_back(self._on_stdout, chunk[0])
            await _call_back(self._on_stderr, chunk[1])
            await _call_back(self._on_pty, chunk[2])
        return not self._collector.done, chunk

    async def _run_pump(self) -> None:
        assert self._queue is not None
        try:
            more = True
            while more:
                more, chunk = await self._step()
                if chunk is not None:
                    self._queue.put_nowait(chunk)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._error = e
        finally:
            self._queue.put_nowait(None)

    async def wait(self) -> CommandResult:
        """Waits for the end; raises CommandExitException on a non-zero exit."""
        if self._pump is not None:
            await asyncio.shield(self._pump)
            if self._error is not None:
                raise self._error
        else:
            more = not self._collector.done
            while more:
                more, _ = await self._step()
        return self._collector.result(timeout=self._timeout)

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        """(stdout, stderr, pty) chunks in order until the process ends."""
        if self._queue is None:
            raise RuntimeError("this handle does not stream (it belongs to a run() call)")
        while True:
            item = await self._queue.get()
            if item is None:
                if self._error is not None:
                    raise self._error
                return
            yield item

    async def kill(self) -> bool:
        """SIGKILLs the process group; False if the process was already gone."""
        return await _kill(self._target, self._pid)

    async def send_stdin(self, data: str | bytes) -> None:
        """Writes to the process's stdin (start it with stdin=True)."""
        await _send_stdin(self._target, self._pid, data)

    async def close_stdin(self) -> None:
        await _close_stdin(self._target, self._pid)

    async def disconnect(self) -> None:
        """Stops receiving output; the process keeps running (see connect(pid))."""
        self.close()
        if self._pump is not None:
            self._pump.cancel()
            try:
                await self._pump
            except asyncio.CancelledError:
                pass


async def _kill(target: GuestTarget, pid: int) -> bool:
    from moru._errors import FailedPreconditionException, NotFoundException

    req = pb.SendSignalRequest(process=_selector(pid), signal=int(_signal.SIGKILL))
    try:
        with target.errors(f"killing process {pid}"):
            await target.process().SendSignal(req, metadata=target.metadata, timeout=target.timeout)
    except (NotFoundException, FailedPreconditionException):
        return False  # unknown, or ended already (guestd keeps ended ones for Connect)
    return True


async def _send_stdin(target: GuestTarget, pid: int, data: str | bytes) -> None:
    raw = data.encode() if isinstance(data, str) else bytes(data)
    with target.errors(f"sending stdin to process {pid}"):
        await target.process().SendInput(
            pb.SendInputRequest(process=_selector(pid), data=raw),
            metadata=target.metadata,
            timeout=target.timeout,
        )


async def _close_stdin(target: GuestTarget, pid: int) -> None:
    with target.errors(f"closing stdin of process {pid}"):
        await target.process().CloseStdin(
            pb.CloseStdinRequest(process=_selector(pid)),
            metadata=target.metadata,
            timeout=target.timeout,
        )


async def start_call(target: GuestTarget, req: pb.StartRequest) -> tuple[int, Any]:
    """Starts a process; returns its pid and the open event stream (no deadline)."""
    start, call = await _start(target, req)
    return start.pid, call


async def _start(target: GuestTarget, req: pb.StartRequest) -> tuple[pb.StartEvent, Any]:
    call = target.process().Start(req, metadata=target.metadata)
    with target.errors(f"starting {_validate.excerpt(req.config.shell)}"):
        while True:
            ev = await call.read()
            if ev is EOF:
                from moru._errors import SandboxException

                raise SandboxException(
                    f"guest closed the stream before {req.config.shell!r} started"
                )
            if ev.WhichOneof("event") == "start":
                return ev.start, call


async def started_handle(target: GuestTarget, req: pb.StartRequest, **kw: Any,
                         ) -> AsyncCommandHandle:
    """Starts `req` (asking for an output channel where hostd can give one) and
    returns its handle; `kw` as AsyncCommandHandle's."""
    req.output_channel = channel_usable(target)
    start, call = await _start(target, req)
    return AsyncCommandHandle(target, start.pid, call, channel=start.output, **kw)


async def connected_handle(target: GuestTarget, pid: int, **kw: Any) -> AsyncCommandHandle:
    """Attaches to `pid` (replaying its kept output) and returns its handle."""
    call, first = await connect_call(target, pid, channel_usable(target))
    return AsyncCommandHandle(target, pid, call, first=first,
                              channel=first.start.output if first is not None else None, **kw)


async def connect_call(target: GuestTarget, pid: int, output_channel: bool = False,
                       ) -> tuple[Any, pb.ProcessEvent | None]:
    """Attaches to a process's output (replaying what guestd kept).

    Reads the first event so an unknown pid fails here, not at the first read.
    """
    call = target.process().Connect(
        pb.ConnectRequest(process=_selector(pid), output_channel=output_channel),
        metadata=target.metadata,
    )
    with target.errors(f"connecting to process {pid}"):
        while True:
            ev = await call.read()
            if ev is EOF:
                return call, None
            if ev.WhichOneof("event") != "keepalive":
                return call, ev


class AsyncCommands:
    """Processes in one sandbox (`sandbox.commands`)."""

    def __init__(self, target: GuestTarget) -> None:
        self._target = target

    async def run(
        self,
        cmd: str,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        background: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - the command's own
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        stdin: bool = False,
    ) -> Any:
        """Runs `cmd` in a shell. Foreground: the CommandResult (non-zero exit
        raises CommandExitException). background=True: an AsyncCommandHandle.
        `timeout` (seconds, 0/None for none) limits the command itself; by
        default 60 s in the foreground and none in the background."""
        timeout = command_timeout(timeout, background)
        handle = await started_handle(
            self._target,
            _start_request(cmd, envs, cwd, user, timeout, stdin),
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            timeout=timeout,
            pump=background,
        )
        if background:
            return handle
        try:
            return await handle.wait()
        finally:
            handle.close()

    async def connect(
        self,
        pid: int,
        timeout: float | None = None,  # noqa: ASYNC109
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> AsyncCommandHandle:
        """A handle to a running process; replays its kept output first."""
        return await connected_handle(
            self._target, pid, on_stdout=on_stdout, on_stderr=on_stderr, timeout=timeout
        )

    async def list(self) -> list[ProcessInfo]:
        """The running processes started through the guest API."""
        with self._target.errors("listing processes"):
            resp = await self._target.process().List(
                pb.ListRequest(), metadata=self._target.metadata, timeout=self._target.timeout
            )
        return [ProcessInfo.from_proto(p) for p in resp.processes if p.running]

    async def kill(self, pid: int) -> bool:
        """SIGKILLs a process (its whole group); False if it was not found."""
        return await _kill(self._target, pid)

    async def send_stdin(self, pid: int, data: str | bytes) -> None:
        await _send_stdin(self._target, pid, data)

    async def close_stdin(self, pid: int) -> None:
        await _close_stdin(self._target, pid)

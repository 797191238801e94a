"""The Process gRPC servicer: converts messages and calls the manager, nothing more."""

from __future__ import annotations

import math
import signal as signals
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from guestd.errors import InvalidArgument
from guestd.process.channel import OutputSender
from guestd.process.events import Data, Dropped, End, Event
from guestd.process.manager import ManagedProcess, ProcessManager
from guestd.process.output import Part
from guestd.process.spawn import Spec
from guestd.rpc_types import Ctx
from guestd.wire import len_key, varint
from moru_proto.guest.v1 import process_pb2 as pb
from moru_proto.guest.v1 import process_pb2_grpc

if TYPE_CHECKING:
    from guestd.transfers import Transfers

MAX_PTY_SIDE = 10_000


def _pty_size(size: pb.PtySize, field: str) -> tuple[int, int]:
    if not 0 < size.cols <= MAX_PTY_SIDE or not 0 < size.rows <= MAX_PTY_SIDE:
        raise InvalidArgument(
            f"{field}: cols and rows must be 1..{MAX_PTY_SIDE}, got {size.cols}x{size.rows}")
    return size.cols, size.rows


# The kernel's limit for one argument (MAX_ARG_STRLEN, 32 pages, NUL
# included) and, roughly, for all of argv + env together (ARG_MAX's usual
# 2 MiB, of which the env takes its share).
MAX_ARG_BYTES = 128 * 1024 - 1
MAX_ARGV_ENV_BYTES = 1024 * 1024


def _string(value: str, field: str) -> int:
    """Its size in bytes; NUL bytes cannot reach execve (they would end the string)."""
    if "\0" in value:
        raise InvalidArgument(f"{field}: contains a NUL byte")
    n = len(value.encode(errors="surrogateescape"))
    if n > MAX_ARG_BYTES:
        raise InvalidArgument(f"{field}: {n} bytes; one argument may have at most {MAX_ARG_BYTES}")
    return n


def check_command(cfg: pb.ProcessConfig) -> None:
    """What execve would refuse, refused up front with the field named (never echoed)."""
    total = _string(cfg.shell, "config.shell")
    for i, arg in enumerate(cfg.argv):
        total += _string(arg, f"config.argv[{i}]")
    for key, value in cfg.env.items():
        name = f"config.env[{key[:40]!r}]"
        if not key or "=" in key or "\0" in key:
            raise InvalidArgument(f"{name}: a name must be non-empty, without '=' or NUL")
        total += _string(key + "=" + value, name)
    if total > MAX_ARGV_ENV_BYTES:
        raise InvalidArgument(
            f"config: command and env take {total} bytes; at most {MAX_ARGV_ENV_BYTES}"
        )
    if "\0" in cfg.cwd or "\0" in cfg.user:
        raise InvalidArgument("config.cwd/config.user: contains a NUL byte")


def spec_of(req: pb.StartRequest) -> Spec:
    cfg = req.config
    if cfg.argv and cfg.shell:
        raise InvalidArgument("config: set either argv or shell, not both")
    if not cfg.shell and not (cfg.argv and cfg.argv[0]):
        raise InvalidArgument("config: argv or shell is required (command is empty)")
    if cfg.cwd and not cfg.cwd.startswith("/"):
        raise InvalidArgument(f"config.cwd: must be an absolute path, got {cfg.cwd!r}")
    if req.timeout_seconds < 0 or not math.isfinite(req.timeout_seconds):
        raise InvalidArgument(f"timeout_seconds: must be >= 0, got {req.timeout_seconds}")
    check_command(cfg)
    return Spec(
        argv=list(cfg.argv), shell=cfg.shell, env=dict(cfg.env), cwd=cfg.cwd, user=cfg.user,
        pty=_pty_size(req.pty, "pty") if req.HasField("pty") else None,
        stdin=req.stdin, timeout=req.timeout_seconds, tag=req.tag,
    )


def parse_signal(number: int, name: str) -> int:
    if name:
        key = name.strip().upper()
        if key.isdigit():
            return parse_signal(int(key), "")
        if not key.startswith("SIG"):
            key = "SIG" + key
        try:
            return int(signals.Signals[key])
        except KeyError:
            raise InvalidArgument(f"signal_name: unknown signal {name!r}") from None
    if number == 0:
        raise InvalidArgument("signal: a signal number or signal_name is required")
    if number not in {int(s) for s in signals.valid_signals()}:
        raise InvalidArgument(f"signal: unknown signal number {number}")
    return number


def end_pb(end: End) -> pb.EndEvent:
    return pb.EndEvent(exit_code=end.exit_code, signal=end.signal, exited=end.exited,
                       timed_out=end.timed_out, status=end.status)


_DATA_KEY = len_key(pb.ProcessEvent, "data")
_KIND_KEY = {k: len_key(pb.DataEvent, k) for k in ("stdout", "stderr", "pty")}


def data_event_bytes(kind: str, parts: list[Part]) -> bytes:
    """A serialized ProcessEvent{data{<kind>: parts}}, built with one copy of the
    output (protobuf would copy it into the message, then again to serialize).
    The edge interceptor sends bytes as they are."""
    n = sum(len(p) for p in parts)
    inner = _KIND_KEY[kind] + varint(n)
    return b"".join((_DATA_KEY, varint(len(inner) + n), inner, *parts))


def event_pb(ev: Event) -> pb.ProcessEvent | bytes:
    if isinstance(ev, Data):
        return data_event_bytes(ev.kind, ev.parts)
    if isinstance(ev, Dropped):
        b = ev.bytes_by_kind
        return pb.ProcessEvent(dropped=pb.OutputDropped(
            stdout_bytes=b.get("stdout", 0), stderr_bytes=b.get("stderr", 0),
            pty_bytes=b.get("pty", 0)))
    if isinstance(ev, End):
        return pb.ProcessEvent(end=end_pb(ev))
    return pb.ProcessEvent(keepalive=pb.KeepAlive())


def info_pb(p: ManagedProcess) -> pb.ProcessInfo:
    s = p.spec
    cfg = pb.ProcessConfig(argv=s.argv, shell=s.shell, env=s.env, cwd=s.cwd, user=s.user)
    info = pb.ProcessInfo(pid=p.pid, tag=p.tag, config=cfg, pty=p.pty, running=p.end is None,
                          started_at_unix=p.started_at)
    if p.end is not None:
        info.end.CopyFrom(end_pb(p.end))
    return info


class ProcessService(process_pb2_grpc.ProcessServicer):
    def __init__(self, manager: ProcessManager, transfers: Transfers | None = None) -> None:
        self.m = manager
        self.transfers = transfers  # output channels need its data listener

    def _get(self, sel: pb.ProcessSelector) -> ManagedProcess:
        which = sel.WhichOneof("selector")
        if which is None:
            raise InvalidArgument("process: a pid or tag selector is required")
        return self.m.get(pid=sel.pid, tag=sel.tag) if which == "pid" else self.m.get(tag=sel.tag)

    async def _stream(self, proc: ManagedProcess, live_only: bool, channel: bool,
                      ) -> AsyncIterator[pb.ProcessEvent | bytes]:
        # Attach before the first await: a reader that is not yet attached does
        # not hold the process back, so its output could overflow the buffer
        # while the start event is still on its way.
        cursor = proc.attach(live_only)
        sender: OutputSender | None = None
        start = pb.StartEvent(pid=proc.pid, tag=proc.tag)
        t = self.transfers
        try:
            if channel and t is not None and t.address:
                sender = OutputSender(proc, cursor, self.m.keepalive)
                start.output.ticket = t.issue_stream(sender.run, sender.discard)
                start.output.address = t.address
            yield pb.ProcessEvent(start=start)
            if sender is not None:
                # Events as usual until the end, or until the client connects.
                async for ev in proc.follow(cursor, self.m.keepalive, until=sender.connected):
                    yield event_pb(ev)
                    if isinstance(ev, End):
                        return
                proc.hold(cursor)  # still counted for backpressure while handed over
                sender.start_sending()
                yield pb.ProcessEvent(to_channel=pb.ToChannel())
                while (sent_all := await sender.wait(self.m.keepalive)) is None:
                    yield pb.ProcessEvent(keepalive=pb.KeepAlive())
                if sent_all and proc.end is not None:
                    yield pb.ProcessEvent(end=end_pb(proc.end))
                    return
            async for ev in proc.follow(cursor, self.m.keepalive):
                yield event_pb(ev)
        finally:
            if sender is not None:
                sender.close()
                if t is not None:
                    t.revoke(start.output.ticket)  # unused: no need to keep it 30 s
            proc.detach(cursor)

    async def Start(  # type: ignore[override]  # bytes: pre-serialized events
        self, request: pb.StartRequest, context: Ctx,
    ) -> AsyncIterator[pb.ProcessEvent | bytes]:
        proc = self.m.start(await self.m.logins.prepare(spec_of(request)))
        async for ev in self._stream(proc, False, request.output_channel):
            yield ev

    async def Connect(  # type: ignore[override]  # bytes: pre-serialized events
        self, request: pb.ConnectRequest, context: Ctx,
    ) -> AsyncIterator[pb.ProcessEvent | bytes]:
        proc = self._get(request.process)
        async for ev in self._stream(proc, request.live_only, request.output_channel):
            yield ev

    async def List(self, request: pb.ListRequest, context: Ctx,
                   ) -> pb.ListResponse:
        return pb.ListResponse(processes=[info_pb(p) for p in self.m.list(request.include_ended)])

    async def SendInput(self, request: pb.SendInputRequest, context: Ctx,
                        ) -> pb.SendInputResponse:
        await self._get(request.process).write_input(request.data)
        return pb.SendInputResponse()

    async def StreamInput(self, request_iterator: AsyncIterator[pb.StreamInputRequest],
                          context: Ctx) -> pb.StreamInputResponse:
        proc: ManagedProcess | None = None
        written = 0
        async for req in request_iterator:
            if proc is None:
                proc = self._get(req.process)
            if req.data:
                await proc.write_input(req.data)
                written += len(req.data)
            if req.close:
                await proc.close_stdin()
                break
        if proc is None:
            raise InvalidArgument("process: the first message must carry a pid or tag")
        return pb.StreamInputResponse(bytes_written=written)

    async def CloseStdin(self, request: pb.CloseStdinRequest, context: Ctx,
                         ) -> pb.CloseStdinResponse:
        await self._get(request.process).close_stdin()
        return pb.CloseStdinResponse()

    async def SendSignal(self, request: pb.SendSignalRequest, context: Ctx,
                         ) -> pb.SendSignalResponse:
        proc = self._get(request.process)
        proc.signal(parse_signal(request.signal, request.signal_name))
        return pb.SendSignalResponse()

    async def Resize(self, request: pb.ResizeRequest, context: Ctx,
                     ) -> pb.ResizeResponse:
        proc = self._get(request.process)
        proc.resize(*_pty_size(request.size, "size"))
        return pb.ResizeResponse()

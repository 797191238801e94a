"""guestd's gRPC server: listen addresses, the edge interceptor, startup and stop.

The edge interceptor is the one place where (a) the access token from
Guest.Init is enforced and (b) guestd's errors (`guestd.errors`) become gRPC
statuses; servicers just raise. Unexpected exceptions are logged with their
traceback here and reach the client as INTERNAL with a one-line message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from guestd.errors import InvalidArgument, status_of
from guestd.fileio import write_request_of
from guestd.files import FilesystemService
from guestd.guest import GuestService
from guestd.metrics import Metrics
from guestd.process.registry import Registry, adopt_survivors
from guestd.process.service import ProcessService
from guestd.process.table import ProcessManager
from guestd.rpc_types import Ctx
from guestd.state import GuestState
from guestd.transfers import Transfers
from guestd.vsock import serve_relay, vsock_listener
from moru_proto.guest.v1 import filesystem_pb2_grpc, guest_pb2_grpc, process_pb2_grpc

log = logging.getLogger("guestd")
Handler = Any  # grpc.RpcMethodHandler; its stub types the behaviours as sync-only
TOKEN_HEADER = "x-moru-access-token"
# Methods whose requests guestd decodes itself (bulk data without copies).
REQUEST_DECODERS: dict[str, Callable[[bytes], Any]] = {
    "/moru.guest.v1.Filesystem/Write": write_request_of,
}
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # hostd pings every 30 s on idle channels; allow it rather than GOAWAY.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
]


@dataclass(frozen=True)
class Config:
    listen: list[str]
    data_listen: str = ""  # the data listener (guestd.transfers); "" for none
    guest_mode: bool = False
    output_buffer_bytes: int = 1024 * 1024
    keepalive_seconds: float = 15.0


@dataclass(frozen=True)
class Address:
    kind: str  # unix | tcp | vsock
    grpc_target: str  # what grpc's add_insecure_port gets (unix/tcp)
    port: int = 0
    cid: int = socket.VMADDR_CID_ANY if hasattr(socket, "VMADDR_CID_ANY") else -1


def parse_listen(addr: str) -> Address:
    """`unix:PATH`, `tcp:HOST:PORT` or `vsock:PORT` (also `vsock:CID:PORT`)."""
    scheme, _, rest = addr.partition(":")
    if scheme == "unix" and rest.startswith("/"):
        return Address("unix", f"unix:{rest}")
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return Address("tcp", f"{host}:{port}", int(port))
    if scheme == "vsock":
        parts = rest.split(":")
        if all(p.isdigit() for p in parts) and 1 <= len(parts) <= 2:
            if len(parts) == 2:
                return Address("vsock", "", int(parts[1]), int(parts[0]))
            return Address("vsock", "", int(parts[0]))
    raise ValueError(f"--listen: expected unix:/PATH, tcp:HOST:PORT or vsock:PORT, got {addr!r}")


def _compare_digest(a: bytes, b: bytes) -> bool:
    import hmac  # here, not at start: it loads OpenSSL, and most guests check no token

    return hmac.compare_digest(a, b)


def _md_token(details: grpc.HandlerCallDetails) -> str:
    for key, value in details.invocation_metadata or ():
        if key == TOKEN_HEADER:
            return value if isinstance(value, str) else value.decode()
    return ""


class EdgeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Token check and error mapping around every handler."""

    def __init__(self, state: GuestState) -> None:
        self.state = state
        self._wrapped: dict[tuple[int, bool], tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler: Handler = await continuation(handler_call_details)
        if handler is None:
            return None
        token = self.state.access_token
        denied = bool(token) and not _compare_digest(
            _md_token(handler_call_details).encode(), token.encode())
        # One wrapper per registered handler and verdict, not per call.
        key = (id(handler), denied)
        hit = self._wrapped.get(key)
        if hit is None or hit[0] is not handler:
            hit = (handler, _wrap(handler, denied,
                                  REQUEST_DECODERS.get(handler_call_details.method)))
            self._wrapped[key] = hit
        return hit[1]


async def _fail(ctx: Ctx, exc: BaseException) -> None:
    code, msg = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=exc)
    await ctx.abort(code, msg)


async def _deny(ctx: Ctx) -> None:
    await ctx.abort(grpc.StatusCode.UNAUTHENTICATED,
                    f"{TOKEN_HEADER}: missing or wrong access token")


def _send_bytes_as_is(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """A servicer may yield an already serialized message (bytes): bulk output
    is encoded with one copy instead of protobuf's two (process.service)."""
    if serialize is None:
        return None
    inner = serialize

    def ser(msg: Any) -> bytes:
        return msg if type(msg) is bytes else inner(msg)

    return ser


class _Undecodable:
    """A request whose bytes are not the method's message (grpc would say UNKNOWN)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(decode: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if decode is None:
        return None
    inner = decode

    def d(raw: bytes) -> Any:
        try:
            return inner(raw)
        except Exception as e:  # any decode failure is the client's
            return _Undecodable(e)

    return d


def _decoded(req: Any) -> Any:
    if isinstance(req, _Undecodable):
        raise InvalidArgument(f"request: not a valid protobuf message for this method "
                              f"({type(req.error).__name__})")
    return req


async def _decoded_stream(reqs: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for r in reqs:
        yield _decoded(r)


def _wrap(h: Handler, denied: bool, decode: Callable[[bytes], Any] | None = None) -> Handler:
    ser: dict[str, Any] = {"request_deserializer": _lenient(decode or h.request_deserializer),
                           "response_serializer": _send_bytes_as_is(h.response_serializer)}
    passthrough = (grpc.aio.AbortError, asyncio.CancelledError)
    streamed_req = bool(h.stream_unary or h.stream_stream)

    def checked(req: Any) -> Any:
        return _decoded_stream(req) if streamed_req else _decoded(req)

    if h.unary_unary or h.stream_unary:
        fn: Any = h.unary_unary or h.stream_unary

        async def unary(req: Any, ctx: Ctx) -> Any:
            if denied:
                await _deny(ctx)
            try:
                return await fn(checked(req), ctx)
            except passthrough:
                raise
            except Exception as exc:
                await _fail(ctx, exc)

        make = (grpc.unary_unary_rpc_method_handler if h.unary_unary
                else grpc.stream_unary_rpc_method_handler)
        return make(unary, **ser)
    sfn: Any = h.unary_stream or h.stream_stream

    async def stream(req: Any, ctx: Ctx) -> AsyncIterator[Any]:
        if denied:
            await _deny(ctx)
        try:
            async for item in sfn(checked(req), ctx):
                yield item
        except passthrough:
            raise
        except Exception as exc:
            await _fail(ctx, exc)

    make_s = (grpc.unary_stream_rpc_method_handler if h.unary_stream
              else grpc.stream_stream_rpc_method_handler)
    return make_s(stream, **ser)


def _fresh_unix_path(addr: Address) -> str:
    """The socket path of a unix address, its stale socket removed and its directory made."""
    path = addr.grpc_target[len("unix:"):]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    return path


def _private_dir() -> str:
    """A new 0700 directory for the relay's inner sockets (tempfile.mkdtemp without
    importing tempfile, which costs the guest's boot more than this does)."""
    base = os.environ.get("TMPDIR") or "/tmp"
    while True:
        path = os.path.join(base, f"guestd-{os.urandom(5).hex()}")
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


class Guestd:
    """The running daemon: state, services and server (one per process)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.state = GuestState(guest_mode=cfg.guest_mode)
        self.manager = ProcessManager(lambda: self.state.env,
                                      buffer_bytes=cfg.output_buffer_bytes,
                                      keepalive=cfg.keepalive_seconds)
        self.server = grpc.aio.server(interceptors=[EdgeInterceptor(self.state)],
                                      options=SERVER_OPTIONS)
        self.transfers = Transfers(cfg.data_listen)
        process_pb2_grpc.add_ProcessServicer_to_server(
            ProcessService(self.manager, self.transfers), self.server)
        filesystem_pb2_grpc.add_FilesystemServicer_to_server(
            FilesystemService(cfg.keepalive_seconds, self.transfers), self.server)
        guest_pb2_grpc.add_GuestServicer_to_server(GuestService(self.state, Metrics()),
                                                   self.server)
        self._relays: list[asyncio.Task[None]] = []
        self._tmpdir: str | None = None

    def _bind_data(self, addr: Address) -> None:
        if addr.kind == "vsock":
            listener = vsock_listener(addr.port, addr.cid)
        elif addr.kind == "unix":
            path = _fresh_unix_path(addr)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(128)
        else:
            host, _, port = addr.grpc_target.rpartition(":")
            listener = socket.create_server((host.strip("[]"), int(port)), backlog=128)
        self._relays.append(asyncio.create_task(self.transfers.serve(listener)))

    def _bind(self, addr: Address) -> None:
        if addr.kind == "vsock":
            if self._tmpdir is None:
                self._tmpdir = _private_dir()
            inner = os.path.join(self._tmpdir, f"vsock-{addr.port}.sock")
            self.server.add_insecure_port(f"unix:{inner}")
            listener = vsock_listener(addr.port, addr.cid)
            self._relays.append(asyncio.create_task(serve_relay(listener, inner)))
            return
        if addr.kind == "unix":
            _fresh_unix_path(addr)
        self.server.add_insecure_port(addr.grpc_target)

    async def run(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        for a in self.cfg.listen:
            self._bind(parse_listen(a))
        if self.cfg.data_listen:
            self._bind_data(parse_listen(self.cfg.data_listen))
        if self.cfg.guest_mode:  # commands an earlier guestd started and left running
            adopt_survivors(self.manager, Registry())
        await self.server.start()
        log.info("guestd listening on %s", ", ".join(self.cfg.listen))
        try:
            await stop.wait()
        finally:
            await self.close()

    async def close(self) -> None:
        for t in self._relays:
            t.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        await self.server.stop(grace=1.0)
        if not self.cfg.guest_mode:
            self.manager.kill_all()  # on a dev host, leave no children behind
        if self._tmpdir:
            with contextlib.suppress(OSError):
                for name in os.listdir(self._tmpdir):
                    os.unlink(os.path.join(self._tmpdir, name))
                os.rmdir(self._tmpdir)

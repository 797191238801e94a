"""Guest calls through hostd: Process/* and Filesystem/* forwarded as raw bytes.

A generic handler serves every method of moru.guest.v1.Process and
moru.guest.v1.Filesystem without decoding a message: requests and responses
stay serialized bytes (no (de)serializers on either side). The sandbox comes
from metadata `sandbox-id`; its access token is checked here and passed on,
because guestd checks it too. Call shapes (unary/streaming either way) come
from the proto descriptors. When the client goes away, the upstream call is
cancelled with it. moru.guest.v1.Guest is not exposed: hostd owns Init.

Every call watches its sandbox's end signal (`Sandbox.ended`): when the
sandbox is killed, expires, is paused or its VM dies, the upstream call is
cancelled and the client gets NOT_FOUND (ABORTED for a pause) naming the
sandbox and why, with the reason in trailing metadata `moru-end-reason`.
Without this, a call whose upstream hostd cancels (a Kill closes the
channel) never got a status at all.

Filesystem OpenRead/OpenWrite name guestd's data listener inside the guest:
with a DataRelay their answers are rewritten to point at it (hostd.data_relay).
So is the output channel of Process Start/Connect (its ticket is in the start
event, the stream's first message); without a DataRelay the request's
output_channel is cleared, so output comes as data events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple, NoReturn, Protocol

import grpc

from hostd.data_relay import DataRelay
from hostd.errors import InvalidArgument
from hostd.guest import TOKEN_HEADER
from moru_proto.guest.v1 import filesystem_pb2, process_pb2

SANDBOX_HEADER = "sandbox-id"
# Starts the details of an UNAVAILABLE that hostd passes on from the guest (the SDK
# tells it apart from hostd itself being unreachable).
GUEST_UNREACHABLE = "hostd cannot reach the sandbox's guest agent (its VM may have stopped)"
SERVICES = (
    process_pb2.DESCRIPTOR.services_by_name["Process"],
    filesystem_pb2.DESCRIPTOR.services_by_name["Filesystem"],
)

# Their tickets name guestd's data listener, which is inside the guest (vsock):
# forwarded only with a DataRelay; without one, Read and Write carry the same data.
DATA_METHODS = frozenset({
    "/moru.guest.v1.Filesystem/OpenRead",
    "/moru.guest.v1.Filesystem/OpenWrite",
})

# Sent by a client on the same machine that takes the guest connection itself
# (SCM_RIGHTS, hostd.data_relay): its file bytes are then not copied by hostd.
HANDOVER_HEADER = "moru-data-handover"

# Their start event may carry an output channel ticket for the data listener.
OUTPUT_METHODS: dict[str, Callable[[bytes], Any]] = {
    "/moru.guest.v1.Process/Start": process_pb2.StartRequest.FromString,
    "/moru.guest.v1.Process/Connect": process_pb2.ConnectRequest.FromString,
}

END_REASON_HEADER = "moru-end-reason"
END_SANDBOX_HEADER = "moru-sandbox-id"
# Short end reasons (Sandbox.end) -> how the status message says it.
END_TEXT = {
    "killed": "was killed",
    "timeout": "timed out (its timeout passed)",
    "vmm_exited": "stopped: its VM exited",
    "paused": "was paused (resume it and call again)",
    "error": "failed and was marked error",
    "host_restart": "was lost in a hostd restart",
    "oom": "was killed: out of memory",
}


class Ending(Protocol):
    """What a call watches: the sandbox's end signal (hostd.sandboxes.Sandbox has it)."""

    @property
    def id(self) -> str: ...

    ended: asyncio.Event
    end_reason: str


class Route(NamedTuple):
    channel: grpc.aio.Channel
    token: str  # sent upstream
    sandbox: Ending


# (sandbox_id, access_token) -> Route; raises hostd errors.
Resolver = Callable[[str, str], Route]
# Makes the multi-callable of one call shape for the method on a channel.
Opener = Callable[[grpc.aio.Channel], Any]


def end_status(
    sandbox_id: str, reason: str
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status a call gets when its sandbox ended under it ("error: why" keeps the why)."""
    reason = reason or "killed"
    code = grpc.StatusCode.ABORTED if reason == "paused" else grpc.StatusCode.NOT_FOUND
    text = END_TEXT.get(reason.split(":", 1)[0], f"ended ({reason})")
    detail = reason.split(":", 1)[1].strip() if ":" in reason else ""
    msg = f"sandbox {sandbox_id} {text} while this call was running"
    if detail:
        msg += f": {detail}"
    short = reason.split(":", 1)[0]
    return code, msg, ((END_REASON_HEADER, short), (END_SANDBOX_HEADER, sandbox_id))


def _shapes() -> dict[str, tuple[bool, bool]]:
    out = {}
    for svc in SERVICES:
        for m in svc.methods:
            out[f"/{svc.full_name}/{m.name}"] = (m.client_streaming, m.server_streaming)
    return out


def _md(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


async def _not_forwarded(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                        "method: the data listener is inside the guest and not forwarded by"
                        " hostd; use Filesystem.Read or Filesystem.Write")
    raise AssertionError("abort returned")


class GuestPassthrough(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self, resolve: Resolver, data: DataRelay | None = None) -> None:
        self._resolve = resolve
        self._data = data
        self._shapes = _shapes()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        if method in DATA_METHODS:
            if self._data is None:
                return grpc.unary_unary_rpc_method_handler(_not_forwarded)
            return grpc.unary_unary_rpc_method_handler(
                self._unary(lambda ch: ch.unary_unary(method, None, None), self._data)
            )
        shape = self._shapes.get(method)
        if shape is None:
            return None
        cs, ss = shape
        if not cs and not ss:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(lambda ch: ch.unary_unary(method, None, None))
            )
        if not cs and ss:
            if method in OUTPUT_METHODS:
                return grpc.unary_stream_rpc_method_handler(self._output(method, self._data))
            return grpc.unary_stream_rpc_method_handler(
                self._streamed(lambda ch: ch.unary_stream(method, None, None))
            )
        if cs and not ss:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(lambda ch: ch.stream_unary(method, None, None))
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streamed(lambda ch: ch.stream_stream(method, None, None))
        )

    def _target(
        self, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[Route, tuple[tuple[str, str], ...], float | None]:
        md = _md(context)
        sid = md.get(SANDBOX_HEADER, "")
        if not sid:
            raise InvalidArgument(SANDBOX_HEADER, "guest calls need the sandbox id in metadata")
        route = self._resolve(sid, md.get(TOKEN_HEADER, ""))
        out_md = ((TOKEN_HEADER, route.token),) if route.token else ()
        return route, out_md, context.time_remaining()

    # The two factories return the behaviour for one response shape; `opens`
    # makes the upstream call of the request's shape on the route's channel.
    # Upstream errors are passed on with their own code and details; a call
    # whose sandbox ended gets the end status instead (_Watch).

    def _unary(self, opens: Opener, data: DataRelay | None = None) -> Callable[..., Any]:
        async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            route, md, timeout = self._target(context)
            async with _Watch(route.sandbox, context) as w:
                call = opens(route.channel)(request, metadata=md, timeout=timeout)
                w.watch(call)
                try:
                    resp: bytes = await call
                    if data is None:
                        return resp
                    hand_over = _md(context).get(HANDOVER_HEADER) == "1"
                    return data.issue(route.sandbox.id, resp, hand_over=hand_over)
                except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
                    await w.fail(e)
                finally:
                    call.cancel()

        return handler

    def _streamed(self, opens: Opener) -> Callable[..., Any]:
        async def handler(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[bytes]:
            route, md, timeout = self._target(context)
            async with _Watch(route.sandbox, context) as w:
                call = opens(route.channel)(request, metadata=md, timeout=timeout)
                w.watch(call)
                try:
                    async for resp in call:
                        yield resp
                except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
                    await w.fail(e)
                finally:
                    call.cancel()

        return handler

    def _output(self, method: str, data: DataRelay | None) -> Callable[..., Any]:
        """Start/Connect: the output channel through the relay, or none without one."""
        us = self._streamed(lambda ch: ch.unary_stream(method, None, None))
        parse = OUTPUT_METHODS[method]

        async def handler(
            request: bytes, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[bytes]:
            if data is None:
                req = parse(request)
                if req.output_channel:
                    req.output_channel = False
                    request = req.SerializeToString()
                async for resp in us(request, context):
                    yield resp
                return
            first = True
            async for resp in us(request, context):
                if first:
                    first = False
                    resp = _relay_output(data, _md(context).get(SANDBOX_HEADER, ""), resp)
                yield resp

        return handler


def _relay_output(data: DataRelay, sandbox_id: str, resp: bytes) -> bytes:
    """A start event's output channel, pointed at the relay (other events as they are)."""
    ev = process_pb2.ProcessEvent.FromString(resp)
    out = ev.start.output
    if not ev.HasField("start") or not out.ticket:
        return resp
    ours = filesystem_pb2.Transfer.FromString(data.issue(sandbox_id, filesystem_pb2.Transfer(
        ticket=out.ticket, address=out.address).SerializeToString(), hand_over=True))
    out.ticket, out.address = ours.ticket, ours.address
    return ev.SerializeToString()


class _Watch:
    """Ties one forwarded call to its sandbox's end signal.

    The event is taken when the call starts (a resume gives the sandbox a
    fresh one); when it fires, the upstream call is cancelled, and the
    handler's error path turns that into the end status.
    """

    def __init__(self, sb: Ending, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.sb = sb
        self.context = context
        self.event = sb.ended
        self.reason = ""
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Watch:
        if self.event.is_set():
            await self.abort_if_ended()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def watch(self, call: Any) -> None:
        async def cancel_on_end() -> None:
            await self.event.wait()
            self.reason = self.sb.end_reason
            call.cancel()

        self._task = asyncio.get_running_loop().create_task(cancel_on_end())

    async def fail(self, e: grpc.aio.AioRpcError | asyncio.CancelledError) -> NoReturn:
        """The client's status for a failed upstream call: the end status when the
        sandbox ended, else the upstream's own (a cancel stays a cancel)."""
        await self.abort_if_ended()
        if isinstance(e, grpc.aio.AioRpcError):
            await _abort(self.context, e)
        raise e

    async def abort_if_ended(self) -> None:
        """Aborts the client's call with the end status when the sandbox ended."""
        if not self.event.is_set():
            return
        self.reason = self.reason or self.sb.end_reason
        code, msg, trailer = end_status(self.sb.id, self.reason)
        await self.context.abort(code, msg, trailing_metadata=trailer)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], e: grpc.aio.AioRpcError) -> None:
    code = e.code()
    if code == grpc.StatusCode.CANCELLED:
        raise asyncio.CancelledError
    details = e.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        # hostd answered; the hop behind it failed: say so, or clients blame hostd
        details = f"{GUEST_UNREACHABLE}: {details}"
    await context.abort(code, details)

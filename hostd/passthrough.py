"""Guest calls through hostd: Process/* and Filesystem/* forwarded as raw bytes.

A generic handler serves every method of moru.guest.v1.Process and
moru.guest.v1.Filesystem without decoding a message: requests and responses
stay serialized bytes (no (de)serializers on either side). The sandbox comes
from metadata `sandbox-id`; its access token is checked here and passed on,
because guestd checks it too. Call shapes (unary/streaming either way) come
from the proto descriptors. When the client goes away, the upstream call is
cancelled with it. moru.guest.v1.Guest is not exposed: hostd owns Init.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

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

# Not forwarded: their tickets name guestd's data listener, which is inside the
# guest (vsock) and not reachable by hostd's clients; Read and Write carry the
# same data through hostd.
NOT_FORWARDED = frozenset({
    "/moru.guest.v1.Filesystem/OpenRead",
    "/moru.guest.v1.Filesystem/OpenWrite",
})

# (sandbox_id, access_token) -> (channel, token to send upstream); raises hostd errors.
Resolver = Callable[[str, str], tuple[grpc.aio.Channel, str]]


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
    def __init__(self, resolve: Resolver) -> None:
        self._resolve = resolve
        self._shapes = _shapes()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        if method in NOT_FORWARDED:
            return grpc.unary_unary_rpc_method_handler(_not_forwarded)
        shape = self._shapes.get(method)
        if shape is None:
            return None
        cs, ss = shape
        if not cs and not ss:
            return grpc.unary_unary_rpc_method_handler(self._uu(method))
        if not cs and ss:
            return grpc.unary_stream_rpc_method_handler(self._us(method))
        if cs and not ss:
            return grpc.stream_unary_rpc_method_handler(self._su(method))
        return grpc.stream_stream_rpc_method_handler(self._ss(method))

    def _target(
        self, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[grpc.aio.Channel, tuple[tuple[str, str], ...], float | None]:
        md = _md(context)
        sid = md.get(SANDBOX_HEADER, "")
        if not sid:
            raise InvalidArgument(SANDBOX_HEADER, "guest calls need the sandbox id in metadata")
        channel, token = self._resolve(sid, md.get(TOKEN_HEADER, ""))
        out_md = ((TOKEN_HEADER, token),) if token else ()
        return channel, out_md, context.time_remaining()

    # Each factory returns the behaviour for one call shape. Upstream errors
    # are passed on with their own code and details.

    def _uu(self, method: str) -> Callable[..., Any]:
        async def handler(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            channel, md, timeout = self._target(context)
            try:
                resp: bytes = await channel.unary_unary(method, None, None)(
                    request, metadata=md, timeout=timeout
                )
                return resp
            except grpc.aio.AioRpcError as e:
                await _abort(context, e)
                raise

        return handler

    def _us(self, method: str) -> Callable[..., Any]:
        async def handler(
            request: bytes, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[bytes]:
            channel, md, timeout = self._target(context)
            call = channel.unary_stream(method, None, None)(request, metadata=md, timeout=timeout)
            try:
                async for resp in call:
                    yield resp
            except grpc.aio.AioRpcError as e:
                await _abort(context, e)
            finally:
                call.cancel()

        return handler

    def _su(self, method: str) -> Callable[..., Any]:
        async def handler(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
        ) -> bytes:
            channel, md, timeout = self._target(context)
            call = channel.stream_unary(method, None, None)(requests, metadata=md, timeout=timeout)
            try:
                resp: bytes = await call
                return resp
            except grpc.aio.AioRpcError as e:
                await _abort(context, e)
                raise
            finally:
                call.cancel()

        return handler

    def _ss(self, method: str) -> Callable[..., Any]:
        async def handler(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[bytes]:
            channel, md, timeout = self._target(context)
            call = channel.stream_stream(method, None, None)(requests, metadata=md, timeout=timeout)
            try:
                async for resp in call:
                    yield resp
            except grpc.aio.AioRpcError as e:
                await _abort(context, e)
            finally:
                call.cancel()

        return handler


async def _abort(context: grpc.aio.ServicerContext[Any, Any], e: grpc.aio.AioRpcError) -> None:
    code = e.code()
    if code == grpc.StatusCode.CANCELLED:
        raise asyncio.CancelledError
    details = e.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        # hostd answered; the hop behind it failed: say so, or clients blame hostd
        details = f"{GUEST_UNREACHABLE}: {details}"
    await context.abort(code, details)

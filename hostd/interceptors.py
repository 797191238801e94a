"""The edge: API key check and the one place hostd errors become gRPC statuses."""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from hostd.errors import InvalidArgument, MoruError

log = logging.getLogger("hostd.rpc")

# Always callable without an API key: load balancers and systemd probes.
OPEN_METHODS = ("/grpc.health.v1.Health/",)

# On every status hostd itself raises: the SDK then knows hostd is up and
# does not blame the connection for, say, a failed pause (UNAVAILABLE).
HOSTD_ANSWERED = (("moru-status-from", "hostd"),)


class _Undecodable:
    """A request whose bytes are not the method's message (grpc itself would say UNKNOWN)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(decode: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if decode is None:  # the passthrough: bytes stay bytes (guestd decodes and checks)
        return None
    inner = decode

    def d(raw: bytes) -> Any:
        try:
            return inner(raw)
        except Exception as e:  # any decode failure is the client's
            return _Undecodable(e)

    return d


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(
            "request",
            f"not a valid protobuf message for this method ({type(request.error).__name__})",
        )
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for r in requests:
        yield _decoded(r)


def _wrap(
    behavior: Callable[..., Any],
    streaming_response: bool,
    check: Callable[[Any], None],
    streaming_request: bool = False,
) -> Callable[..., Any]:
    """Wraps one handler behaviour so MoruErrors (and auth failures) abort the call."""

    def decoded(request: Any) -> Any:
        return _decoded_stream(request) if streaming_request else _decoded(request)

    if streaming_response:

        async def gen(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            try:
                check(context)
                result = behavior(decoded(request), context)
                async for item in result:
                    yield item
            except MoruError as e:
                await context.abort(e.code, e.message, trailing_metadata=HOSTD_ANSWERED)

        return gen

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            check(context)
            result = behavior(decoded(request), context)
            if inspect.isawaitable(result):
                result = await result
            return result
        except MoruError as e:
            await context.abort(e.code, e.message, trailing_metadata=HOSTD_ANSWERED)

    return unary


class EdgeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """API key (when configured) and error mapping for every method, passthrough included."""

    def __init__(self, api_key: str = "") -> None:
        self._expected = f"Bearer {api_key}".encode() if api_key else b""

    def _check(self, method: str) -> Callable[[Any], None]:
        expected = self._expected
        if not expected or method.startswith(OPEN_METHODS):
            return lambda _ctx: None

        def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            from hostd.errors import Unauthenticated

            md = dict(context.invocation_metadata() or ())
            got = md.get("authorization", "")
            got_b = got.encode() if isinstance(got, str) else got
            if not hmac.compare_digest(got_b, expected):
                raise Unauthenticated(
                    "missing or wrong API key: send metadata `authorization: Bearer <key>`"
                    " (MORU_API_KEY for the SDK)"
                )

        return check

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return handler
        check = self._check(handler_call_details.method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap(handler.unary_unary, False, check),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap(handler.unary_stream, True, check),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap(handler.stream_unary, False, check, streaming_request=True),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap(handler.stream_stream, True, check, streaming_request=True),
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

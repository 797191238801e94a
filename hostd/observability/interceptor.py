"""Times every RPC by method and counts non-OK statuses; tags logs with the sandbox id.

A grpc.aio server interceptor wraps each handler's behaviour, so the guest
passthrough (a generic handler) is measured without any change to it.
Put it FIRST in the server's interceptor list: it then wraps the edge
interceptor and sees the status that the edge's error mapping produced
(context.abort), not a raw hostd exception.

Streaming calls are timed from the first byte handled to the end of the
stream (a Process/Start call lasts as long as the process).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from hostd.observability.logs import sandbox_id_var

SANDBOX_HEADER = "sandbox-id"
# (method, status code name, seconds)
Observer = Callable[[str, str, float], None]


def _code_of(context: Any, exc: BaseException | None) -> str:
    """The final status: what the servicer/abort set, else what the exception implies."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"  # the client went away (or the server is stopping)
    code = None
    try:
        code = context.code()
    except Exception:
        code = None
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int) and code != 0:  # some grpc versions keep the raw int
        for sc in grpc.StatusCode:
            if sc.value[0] == code:
                return str(sc.name)
    if exc is None:
        return "OK"
    ecode = getattr(exc, "code", None)  # a hostd MoruError if we run inside the edge
    if isinstance(ecode, grpc.StatusCode):
        return str(ecode.name)
    return "UNKNOWN"


def _sandbox_id(request: Any, context: Any) -> str:
    sid = getattr(request, "sandbox_id", "")
    if isinstance(sid, str) and sid:
        return sid
    try:
        for k, v in context.invocation_metadata() or ():
            if k == SANDBOX_HEADER and isinstance(v, str):
                return v
    except Exception:
        pass
    return ""


def _wrap(
    method: str, behavior: Callable[..., Any], streaming_response: bool, observe: Observer
) -> Callable[..., Any]:
    if streaming_response:

        async def gen(request: Any, context: Any) -> AsyncIterator[Any]:
            token = sandbox_id_var.set(_sandbox_id(request, context))
            t0 = time.perf_counter()
            exc: BaseException | None = None
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as e:
                exc = e
                raise
            finally:
                observe(method, _code_of(context, exc), time.perf_counter() - t0)
                with contextlib.suppress(ValueError):  # finalized in another context
                    sandbox_id_var.reset(token)

        return gen

    async def unary(request: Any, context: Any) -> Any:
        token = sandbox_id_var.set(_sandbox_id(request, context))
        t0 = time.perf_counter()
        exc: BaseException | None = None
        try:
            result = behavior(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result
        except BaseException as e:
            exc = e
            raise
        finally:
            observe(method, _code_of(context, exc), time.perf_counter() - t0)
            sandbox_id_var.reset(token)

    return unary


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Feeds `observe(method, code, seconds)` once per finished RPC."""

    def __init__(self, observe: Observer) -> None:
        self._observe = observe

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        obs = self._observe
        kw = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap(method, handler.unary_unary, False, obs), **kw
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap(method, handler.unary_stream, True, obs), **kw
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap(method, handler.stream_unary, False, obs), **kw
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap(method, handler.stream_stream, True, obs), **kw
        )

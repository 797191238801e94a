"""The private event loop the synchronous API runs on.

Why a loop thread rather than grpc's sync stubs: one implementation (the async
one) serves both APIs, so they cannot drift apart. The cost is one thread hop
per call (tens of microseconds), small next to a hostd round trip.

The loop lives in one daemon thread per process (re-created after fork).
Blocking sync calls wait on a concurrent future; Ctrl-C cancels the call.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="moru-sdk-loop", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "a synchronous moru call was made from inside a moru callback; "
                "use AsyncSandbox there or call from another thread"
            )
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def stop(self) -> None:
        from moru._connection import close_channels

        if self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(close_channels(), self.loop).result(5)
            except Exception:
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)


_lock = threading.Lock()
_current: _LoopThread | None = None


def runner() -> _LoopThread:
    """The process's loop thread (started on first use)."""
    global _current
    with _lock:
        if _current is None or _current.pid != os.getpid():
            _current = _LoopThread()
        return _current


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine on the private loop and waits for its result."""
    return runner().run(coro)


def iterate(agen: AsyncIterator[T]) -> Iterator[T]:
    """A blocking iterator over an async iterator living on the private loop."""
    r = runner()

    async def step() -> tuple[bool, T | None]:
        try:
            return True, await agen.__anext__()
        except StopAsyncIteration:
            return False, None

    try:
        while True:
            more, item = r.run(step())
            if not more:
                return
            yield item  # type: ignore[misc]
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            try:
                r.run(aclose())
            except Exception:
                pass


@atexit.register
def _shutdown() -> None:
    if _current is not None and _current.pid == os.getpid():
        _current.stop()

"""Operations: lifecycle calls (Create, Kill, Pause, Resume) that a cancel cannot cut in half.

grpc.aio cancels a handler's task when the client cancels or disconnects,
and again when the server stops; it may do so more than once. Create and
Kill release what they hold by awaiting (the VM's processes exiting, netlink,
the store), so a second cancel landing in that cleanup used to abandon the
rest of it: a run dir, a network namespace, a store row left behind, and on
shutdown "Cannot operate on a closed database" once the store was closed
under a Create still cleaning up.

`Operations.run(coro)` runs the operation in its own task and waits for it
behind `asyncio.shield`. The first cancel of the caller is passed on to the
operation exactly once; later ones are absorbed while its cleanup finishes;
then the caller gets its CancelledError. `drain()` (server shutdown) cancels
what is still in flight and waits until all of it has cleaned up, before the
store, network and cgroups are closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("hostd.operations")

T = TypeVar("T")


class Operations:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cancelled: set[asyncio.Task[Any]] = set()  # a cancel passed on already

    def __len__(self) -> int:
        return len(self._tasks)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._cancelled.discard)
        cancelled: asyncio.CancelledError | None = None
        while True:
            try:
                result = await asyncio.shield(task)
                break
            except asyncio.CancelledError as e:
                if task.done():  # the operation itself ended cancelled
                    raise
                # Passed on once, counted here: task.cancelling() also counts a
                # cancel of the operation's own (an asyncio.timeout inside it
                # expiring at this moment), which it takes back as a TimeoutError.
                if task not in self._cancelled:
                    self._cancelled.add(task)
                    task.cancel()
                cancelled = e
        if cancelled is not None:
            raise cancelled
        return result

    async def drain(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        """Cancels the operations in flight and waits (up to timeout) until they are done."""
        if not self._tasks:
            return
        t0 = time.monotonic()
        pending = set(self._tasks)
        log.info("waiting for %d operation(s) in flight to clean up", len(pending))
        for t in pending - self._cancelled:  # once only: a second cancel would cut its cleanup
            self._cancelled.add(t)
            t.cancel()
        _, left = await asyncio.wait(pending, timeout=timeout)
        if left:
            log.warning("%d operation(s) still cleaning up after %.0f s", len(left), timeout)
        else:
            log.info("operations in flight cleaned up in %.2f s", time.monotonic() - t0)


__all__ = ["Operations"]

"""hostd.operations.Operations: a cancel reaches an operation once; its cleanup always finishes.

Plain asyncio, no VM: the operation stands in for Create (cleanup that awaits,
as vm.destroy() and the network teardown do).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from hostd.operations import Operations


class Op:
    def __init__(self, cleanup: float = 0.3) -> None:
        self.cleanup = cleanup
        self.cancels = 0
        self.cleaned = False

    async def __call__(self, result: str = "ok", fail: bool = False) -> str:
        try:
            await asyncio.sleep(0.2)
            if fail:
                raise ValueError("boom")
            return result
        except asyncio.CancelledError:
            self.cancels += 1
            await asyncio.sleep(self.cleanup)  # cut short by a second cancel before the fix
            self.cleaned = True
            raise


def test_result_and_errors_pass_through() -> None:
    async def main() -> None:
        ops = Operations()
        assert await ops.run(Op()("x")) == "x"
        with pytest.raises(ValueError, match="boom"):
            await ops.run(Op()(fail=True))
        assert len(ops) == 0

    asyncio.run(main())


def test_repeated_cancels_reach_the_operation_once_and_its_cleanup_finishes() -> None:
    async def main() -> None:
        ops, op = Operations(), Op()
        caller = asyncio.create_task(ops.run(op()))
        await asyncio.sleep(0.05)
        for _ in range(3):  # client cancel, then server shutdown, ...
            caller.cancel()
            await asyncio.sleep(0.05)
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert (op.cancels, op.cleaned) == (1, True)

    asyncio.run(main())


def test_drain_cancels_in_flight_operations_and_waits_for_their_cleanup() -> None:
    async def main() -> None:
        ops = Operations()
        ops_ = [Op(cleanup=0.5) for _ in range(3)]
        callers = [asyncio.create_task(ops.run(op())) for op in ops_]
        await asyncio.sleep(0.05)
        callers[0].cancel()  # already cancelled once: drain must not cancel it again
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await ops.drain(10)
        assert time.monotonic() - t0 >= 0.4
        assert [(o.cancels, o.cleaned) for o in ops_] == [(1, True)] * 3
        assert len(ops) == 0
        for c in callers:
            with pytest.raises(asyncio.CancelledError):
                await c

    asyncio.run(main())


def test_a_cancel_reaches_an_operation_whose_own_timeout_fires_at_that_moment() -> None:
    """The caller's cancel lands while a timeout inside the operation has a cancel
    of its own pending (asyncio.timeout cancels the task, then uncancels it and
    raises TimeoutError). Counting the task's pending cancels took that one for
    the caller's and never passed the caller's on: the Create went on to the end
    and its sandbox was left to nobody."""

    async def main() -> None:
        ops = Operations()
        tasks: list[asyncio.Task[object]] = []

        async def op() -> str:
            me = asyncio.current_task()
            assert me is not None
            tasks.append(me)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                # What an expired asyncio.timeout does: its own cancel taken back
                # (a TimeoutError instead), unless another cancel is pending too.
                if me.uncancel() > 0:
                    raise
            await asyncio.sleep(5)
            return "finished"

        caller = asyncio.ensure_future(ops.run(op()))
        await asyncio.sleep(0.05)
        caller.cancel()  # the client cancels ...
        tasks[0].cancel()  # ... as a timeout inside the operation expires
        await asyncio.wait([caller], timeout=2)
        assert caller.done() and caller.cancelled()
        assert tasks[0].cancelled(), "the operation ran on after its caller was cancelled"

    asyncio.run(main())

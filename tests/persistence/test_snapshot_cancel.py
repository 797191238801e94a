"""save's tail (ending the VM once the snapshot is complete) is not cut short by a cancel."""

from __future__ import annotations

import asyncio

import pytest

from hostd.vmm.base import SnapshotError
from hostd.vmm.snapfile import despite_cancel


def test_despite_cancel_finishes_the_work_then_reraises_the_cancel() -> None:
    done: list[str] = []

    async def end_vm() -> None:
        await asyncio.sleep(0.2)
        done.append("ended")

    async def caller() -> None:
        await despite_cancel(end_vm())
        done.append("caller went on")  # must not happen: it was cancelled

    async def main() -> None:
        t = asyncio.create_task(caller())
        await asyncio.sleep(0.05)
        t.cancel()
        await asyncio.sleep(0.05)
        t.cancel()  # a second cancel is absorbed as well
        with pytest.raises(asyncio.CancelledError):
            await t
        assert done == ["ended"]

    asyncio.run(main())


def test_despite_cancel_passes_errors_on() -> None:
    async def fails() -> None:
        raise SnapshotError("QEMU did not exit")

    with pytest.raises(SnapshotError, match="did not exit"):
        asyncio.run(despite_cancel(fails()))

"""The copies a Create from a ready snapshot starts first (disk overlay, guest RAM image).

They run beside the network set-up. QEMU needs only the overlay and a RAM
file of full size to start (`Vmm.stage_restore`'s `started`); the RAM image
goes on being copied into that file while QEMU and its vsock backend start,
and the restore loads the device state once the copy is done. Without
networking this takes the copy (~90 ms) and the process start (~70 ms) off
each other's path.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from hostd.ready_snapshots import ReadySnapshots
from hostd.vmm.base import VmSpec


class Staging:
    """One Create's copies, as a task; `close` cancels them (nothing staged is left)."""

    def __init__(self, ready: ReadySnapshots, spec: VmSpec, snapshot: Path) -> None:
        self.started = asyncio.Event()
        self.task = asyncio.create_task(self._run(ready, spec, snapshot))

    async def _run(self, ready: ReadySnapshots, spec: VmSpec, snapshot: Path) -> float:
        t0 = time.monotonic()
        with ready.using(snapshot):
            await ready.stage(spec, snapshot, self.started)
        return time.monotonic() - t0

    async def in_place(self) -> None:
        """Until the VMM may start (raises what the copies raised, if they failed first)."""
        waiter = asyncio.ensure_future(self.started.wait())
        try:
            await asyncio.wait([waiter, self.task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not self.started.is_set():
            self.task.result()

    async def close(self) -> None:
        """Cancels the copies if they still run and waits for them (their cleanup done)."""
        self.task.cancel()
        await asyncio.wait([self.task])
        if not self.task.cancelled():
            self.task.exception()  # retrieved: a failure is reported where the task is awaited

"""The metrics sampler: one guest Metrics call per running sandbox per interval.

Each answer is kept on the sandbox (hostd's Metrics RPC reads it) with the
host's view of the sandbox's cgroup beside the guest's, and an answer from an
initialised guestd counts as that sandbox's health check (`answered`), so an
idle sandbox costs guestd one call per interval, not two.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import grpc

from hostd.guest import GuestClient
from hostd.state import State

if TYPE_CHECKING:
    from hostd.sandbox import Sandbox

log = logging.getLogger("hostd.sampler")


class MetricsSampler:
    def __init__(
        self,
        sandboxes: Callable[[], Iterable[Sandbox]],
        answered: Callable[[str], None],
        interval: float,
    ) -> None:
        self._sandboxes = sandboxes
        self._answered = answered
        self.interval = interval

    async def run(self) -> None:
        """Samples every running sandbox each interval; runs until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            running = [
                sb for sb in self._sandboxes() if not sb.gone and sb.rec.state is State.RUNNING
            ]
            async with asyncio.TaskGroup() as tg:
                for sb in running:
                    tg.create_task(self.sample(sb))

    async def sample(self, sb: Sandbox) -> None:
        """One sample of `sb`; a guest that does not answer (or a Kill) just skips it."""
        ch = sb.res.channel
        if ch is None:
            return
        try:
            s = await GuestClient(ch, sb.rec.access_token).metrics()
        except grpc.aio.AioRpcError as e:
            log.debug("metrics of %s: %s", sb.id, e.details())
            return
        except grpc.aio.UsageError as e:  # a Kill closed the channel before the call
            log.debug("metrics of %s: %s", sb.id, e)
            return
        except asyncio.CancelledError:
            # grpc.aio cancels calls in flight on a channel a Kill closes; only a
            # cancel of this task itself goes on.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return
        if s.guest_initialized:
            self._answered(sb.id)
        cg = sb.res.cgroup
        if cg is not None:
            with contextlib.suppress(OSError, ValueError):
                s = dataclasses.replace(
                    s,
                    host_cpu_seconds=cg.cpu_usage_seconds(),
                    host_memory_bytes=cg.memory_usage_bytes(),
                )
        sb.metrics.append(s)

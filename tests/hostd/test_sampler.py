"""The metrics sampler survives a sandbox whose guest channel a Kill closed under it.

Real grpc.aio channels, no VM: `Sandbox.res.channel` is a channel to a unix
socket that accepts and never answers (a guest that is slow to reply). grpc.aio
raises UsageError for a call on a closed channel and cancels (CancelledError)
calls in flight when the channel closes; before the fix the first escaped the
sampler's TaskGroup (ending hostd's background loops, and hostd with them) and
the second cut a Create or Resume short after the sandbox was made.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import grpc
import pytest

from hostd.sampler import MetricsSampler
from hostd.sandbox import Sandbox
from hostd.state import State
from hostd.store import SandboxRecord


def _sampler() -> MetricsSampler:
    return MetricsSampler(list, lambda _id: None, interval=1.0)


def _sandbox() -> Sandbox:
    now = time.time()
    rec = SandboxRecord("sbx_" + "s" * 20, "base", State.RUNNING, now, now, now + 300)
    return Sandbox(rec=rec)


@pytest.fixture
def silent_guest(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A unix socket that accepts connections and never answers."""
    path = tmp_path / "g.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(8)
    yield f"unix:{path}"
    srv.close()


def test_channel_closed_before_the_call(tmp_path: Path, silent_guest: str) -> None:
    async def main() -> None:
        sampler, sb = _sampler(), _sandbox()
        sb.res.channel = grpc.aio.insecure_channel(silent_guest)
        await sb.res.channel.close()
        await sampler.sample(sb)  # UsageError before the fix
        assert not sb.metrics

    asyncio.run(main())


def test_channel_closed_during_the_call(tmp_path: Path, silent_guest: str) -> None:
    async def main() -> None:
        sampler, sb = _sampler(), _sandbox()
        ch = sb.res.channel = grpc.aio.insecure_channel(silent_guest)
        task = asyncio.create_task(sampler.sample(sb))
        await asyncio.sleep(0.3)
        await ch.close()  # what Kill's release does
        await task  # CancelledError before the fix
        assert not sb.metrics

    asyncio.run(main())


def test_a_real_cancel_of_the_sampler_still_cancels(tmp_path: Path, silent_guest: str) -> None:
    async def main() -> None:
        sampler, sb = _sampler(), _sandbox()
        sb.res.channel = grpc.aio.insecure_channel(silent_guest)
        task = asyncio.create_task(sampler.sample(sb))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await sb.res.channel.close()

    asyncio.run(main())

"""What makes a claim cheap, without VMs: a member's warm-up command and the
refill that waits for a claim to settle (hostd/pool_members.py).

warm_member runs against a real guestd (a local process, as the guestd tests
run it); the Sandbox around its channel is a stand-in holding just the
channel, token and id, because a real one needs a VM. The whole pool with
VMs (warm-up included) is tests/hostd/test_pool.py.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from hostd import pool_members
from hostd.config import Config
from hostd.pool_members import Claimer, warm_member
from hostd.resources import Capacity
from moru_proto.guest.v1 import guest_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guestd"))
from guestd_harness import Guestd

TOKEN = "pool-only-token"


@pytest.fixture
def guestd() -> Iterator[Guestd]:
    g = Guestd()
    g.guest.Init(guest_pb2.InitRequest(sandbox_id="m1", access_token=TOKEN))
    yield g
    g.close()


def member(g: Guestd, token: str = TOKEN) -> Any:
    """A stand-in for a prepared Sandbox: warm_member reads only these."""
    channel = grpc.aio.insecure_channel(g.target)
    return SimpleNamespace(id="m1", rec=SimpleNamespace(access_token=token),
                           res=SimpleNamespace(channel=channel))  # fmt: skip


def ran(g: Guestd, marker: Path) -> None:
    async def go() -> None:
        sb = member(g)
        try:
            await warm_member(sb)
        finally:
            await sb.res.channel.close()

    asyncio.run(go())
    assert marker.exists()


def test_warm_member_runs_the_first_command_as_the_sdk_sends_it(
    guestd: Guestd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "ran"
    monkeypatch.setattr(pool_members, "WARM_COMMAND", f"true && touch {marker}")
    ran(guestd, marker)


def test_warm_member_fails_when_the_command_fails_or_the_token_is_wrong(
    guestd: Guestd, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def go(token: str) -> None:
        sb = member(guestd, token)
        try:
            await warm_member(sb)
        finally:
            await sb.res.channel.close()

    monkeypatch.setattr(pool_members, "WARM_COMMAND", "exit 3")
    with pytest.raises(RuntimeError, match="ended with 3"):
        asyncio.run(go(TOKEN))
    monkeypatch.setattr(pool_members, "WARM_COMMAND", "true")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        asyncio.run(go("not-the-token"))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_refill_waits_until_the_last_claim_has_settled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pool_members, "REFILL_AFTER_CLAIM_SECONDS", 0.3)
    c = Claimer(Config(), None, None, Capacity(Config()), {})  # type: ignore[arg-type]

    async def go() -> tuple[float, float]:
        t0 = time.monotonic()
        await c.settle()  # no claim yet: at once
        t1 = time.monotonic()
        c._claimed_at = time.monotonic()  # what claim() records first
        await c.settle()
        return t1 - t0, time.monotonic() - c._claimed_at

    first, waited = asyncio.run(go())
    assert first < 0.3
    assert waited >= 0.3

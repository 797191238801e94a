"""Unit tests of the warm pool's logic (hostd/pool.py), without VMs.

The VM parts are fakes here, on purpose: `prepare` returns a FakeMember
instead of booting a guest, `destroy` marks it destroyed, and `alive` reads
a flag the test flips. Claims, capacity, refill, backoff and recycling are
the real code. The pool with real VMs is tested in tests/hostd/test_pool.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest

from hostd.config import Config, ConfigError, WarmPoolEntry, load
from hostd.events import EventBus, EventType, Reason
from hostd.pool import PoolShape, WarmPool
from hostd.resources import Capacity

SHAPE = PoolShape("base", 2, 512, 2048)


@dataclass
class FakeMember:
    """Stands in for a prepared sandbox (no VM)."""

    id: str
    alive: bool = True
    destroyed: bool = False


@dataclass
class Fakes:
    made: list[FakeMember] = field(default_factory=list)
    fail: int = 0  # the next N prepares raise
    delay: float = 0.0
    attempts: list[float] = field(default_factory=list)
    gate: asyncio.Event | None = None

    async def prepare(self, shape: PoolShape, mid: str) -> FakeMember:
        self.attempts.append(asyncio.get_running_loop().time())
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.delay)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("boot failed (fake)")
        m = FakeMember(mid)
        self.made.append(m)
        return m

    async def destroy(self, m: FakeMember) -> None:
        m.destroyed = True


def make_pool(
    fakes: Fakes,
    target: int = 2,
    cap: Capacity | None = None,
    bus: EventBus | None = None,
    clock: Callable[[], float] | None = None,
    **kw: float,
) -> WarmPool[FakeMember]:
    n = itertools.count()
    extra = {"clock": clock} if clock is not None else {}
    return WarmPool(
        {SHAPE: target},
        prepare=fakes.prepare,
        destroy=fakes.destroy,
        alive=lambda m: m.alive,
        new_id=lambda: f"sbx_m{next(n)}",
        capacity=cap or Capacity(Config(max_sandboxes=16, memory_budget_mb=16384)),
        bus=bus or EventBus(),
        backoff_start=kw.pop("backoff_start", 0.05),
        **kw,  # type: ignore[arg-type]
        **extra,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def running(pool: WarmPool[FakeMember]) -> AsyncIterator[None]:
    task = asyncio.create_task(pool.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(cond: Callable[[], bool], within: float = 5.0) -> None:
    """Polls `cond` (state of the fakes, not an event) until true, bounded."""
    async with asyncio.timeout(within):
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def sync(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Runs an async test in its own event loop (no pytest plugin for that here)."""

    @functools.wraps(fn)
    def run() -> None:
        asyncio.run(fn())

    return run


def ready(pool: WarmPool[FakeMember]) -> int:
    return pool.stats()[0].ready


@sync
async def test_fills_to_target_and_claims_are_distinct() -> None:
    f = Fakes()
    pool = make_pool(f, target=3)
    async with running(pool):
        await until(lambda: ready(pool) == 3)

        async def claim() -> FakeMember | None:
            await asyncio.sleep(0)
            return pool.claim(SHAPE)

        got = await asyncio.gather(*(claim() for _ in range(5)))
    members = [m for m in got if m is not None]
    assert len(members) == 3
    assert len({m.id for m in members}) == 3, "two claims got the same member"
    assert got.count(None) == 2
    st = pool.stats()[0]
    assert st.claims == 3 and st.misses == 2


@sync
async def test_exhaustion_returns_none_and_other_shapes_never_match() -> None:
    f = Fakes(delay=10.0)  # refill never finishes within the test
    pool = make_pool(f, target=1)
    async with running(pool):
        assert pool.claim(SHAPE) is None
        assert pool.claim(PoolShape("base", 1, 512, 2048)) is None
        assert pool.claim(PoolShape("python", 2, 512, 2048)) is None
    assert pool.stats()[0].misses == 1  # only the configured shape counts a miss


@sync
async def test_refill_starts_right_after_a_claim() -> None:
    f = Fakes()
    pool = make_pool(f, target=1)
    async with running(pool):
        await until(lambda: ready(pool) == 1)
        first = pool.claim(SHAPE)
        assert first is not None
        # Well before the 1 s check period: the claim itself wakes the refill.
        await until(lambda: ready(pool) == 1, within=0.5)
        second = pool.claim(SHAPE)
    assert second is not None and second.id != first.id


@sync
async def test_dead_member_is_never_handed_out() -> None:
    gate = asyncio.Event()
    gate.set()
    f = Fakes(gate=gate)
    pool = make_pool(f, target=2)
    bus = pool.bus
    async with bus.subscribe() as sub, running(pool):
        await until(lambda: ready(pool) == 2)
        gate.clear()  # no refill completes from here on
        for m in f.made:
            m.alive = False
        assert pool.claim(SHAPE) is None
        await until(lambda: all(m.destroyed for m in f.made[:2]))
        removed = []
        while not sub.queue.empty():
            ev = sub.queue.get_nowait()
            if ev.type is EventType.POOL_MEMBER_REMOVED:
                removed.append(ev)
        assert {e.reason for e in removed} == {Reason.VMM_EXITED}
    assert pool.capacity.count == 0


@sync
async def test_a_dead_member_is_destroyed_at_once_while_a_refill_runs() -> None:
    gate = asyncio.Event()
    gate.set()
    f = Fakes(gate=gate)
    pool = make_pool(f, target=2)
    async with running(pool):
        await until(lambda: ready(pool) == 2)
        gate.clear()
        assert pool.claim(SHAPE) is f.made[0]  # starts a refill that hangs on the gate
        await until(lambda: pool.stats()[0].preparing == 1)
        f.made[1].alive = False
        assert pool.claim(SHAPE) is None
        await until(lambda: f.made[1].destroyed, within=0.5)
        # The claimed member's room (now its sandbox's) and the refill's.
        assert pool.capacity.count == 2


@sync
async def test_prune_drops_a_member_that_died_while_waiting() -> None:
    f = Fakes()
    pool = make_pool(f, target=1)
    async with running(pool):
        await until(lambda: ready(pool) == 1)
        dead = f.made[0]
        dead.alive = False
        await until(lambda: dead.destroyed, within=3.0)  # within the 1 s check period
        await until(lambda: ready(pool) == 1)
        m = pool.claim(SHAPE)
    assert m is not None and m is not dead


@sync
async def test_members_older_than_max_age_are_recycled() -> None:
    now = [1000.0]
    f = Fakes()
    pool = make_pool(f, target=1, clock=lambda: now[0], max_age=60.0)
    async with running(pool):
        await until(lambda: ready(pool) == 1)
        old = f.made[0]
        now[0] += 61.0
        pool.claim(PoolShape("other", 1, 1, 1))  # no-op; the keeper checks every second
        await until(lambda: old.destroyed, within=3.0)
        await until(lambda: ready(pool) == 1)
        m = pool.claim(SHAPE)
    assert m is not None and m is not old
    assert pool.stats()[0].recycled == 1


@sync
async def test_failed_prepare_backs_off_doubling() -> None:
    f = Fakes(fail=4)
    bus = EventBus()
    pool = make_pool(f, target=1, bus=bus, backoff_start=0.1, backoff_max=0.4)
    async with bus.subscribe() as sub, running(pool):
        await until(lambda: ready(pool) == 1, within=5.0)
    gaps = [b - a for a, b in itertools.pairwise(f.attempts)]
    assert len(f.attempts) == 5
    # 0.1, 0.2, 0.4, 0.4 (capped): never a busy loop, never past the cap by much.
    for gap, want in zip(gaps, (0.1, 0.2, 0.4, 0.4), strict=True):
        assert want * 0.9 <= gap < want + 0.5
    st = pool.stats()[0]
    assert st.refill_failures == 4 and st.last_error == ""
    kinds = [sub.queue.get_nowait().type for _ in range(sub.queue.qsize())]
    assert kinds.count(EventType.POOL_REFILL_FAILED) == 4
    assert kinds.count(EventType.POOL_MEMBER_READY) == 1
    assert pool.capacity.count == 1  # only the ready member holds room


@sync
async def test_members_count_against_capacity_and_leave_room_for_a_sandbox() -> None:
    cap = Capacity(Config(max_sandboxes=3, memory_budget_mb=4096))
    f = Fakes()
    pool = make_pool(f, target=5, cap=cap)
    async with running(pool):
        await until(lambda: ready(pool) == 2)
        await asyncio.sleep(0.2)
        assert ready(pool) == 2, "the pool took the last sandbox slot of the node"
        cap.reserve("sbx_real1", 512)  # the room the pool left
        # The node is full: a Create asks the pool to give a member's room back.
        assert await pool.evict()
        cap.reserve("sbx_real2", 512)
        assert cap.count == 3
        await asyncio.sleep(0.2)
        assert ready(pool) == 1  # no refill into the last slots
    assert pool.stats()[0].evicted == 1


@sync
async def test_evict_cancels_a_prepare_in_flight_and_frees_its_room() -> None:
    cap = Capacity(Config(max_sandboxes=2, memory_budget_mb=4096))
    f = Fakes(delay=30.0)
    pool = make_pool(f, target=1, cap=cap)
    async with running(pool):
        await until(lambda: pool.stats()[0].preparing == 1)
        assert cap.count == 1
        assert await pool.evict()
        assert cap.count == 0
        cap.reserve("sbx_real", 512)


@sync
async def test_close_destroys_every_member() -> None:
    f = Fakes()
    pool = make_pool(f, target=2)
    async with running(pool):
        await until(lambda: ready(pool) == 2)
    await pool.close()
    assert all(m.destroyed for m in f.made)
    assert pool.capacity.count == 0
    assert pool.claim(SHAPE) is None


def test_status_line() -> None:
    pool = make_pool(Fakes(), target=2)
    assert pool.status_line() == "base:2:512:2048 0/2 ready, 0 claims, 0 misses"


# -- config -----------------------------------------------------------------


def test_warm_pool_config_from_file_env_and_flags(tmp_path: pytest.TempPathFactory) -> None:
    from pathlib import Path

    f = Path(str(tmp_path)) / "hostd.toml"
    f.write_text('warm_pool = {base = 2, "python:1:1024" = 1}\nwarm_pool_max_age_seconds = 60\n')
    cfg = load(f, environ={})
    assert cfg.warm_pool_entries() == [
        WarmPoolEntry("base", 0, 0, 0, 2),
        WarmPoolEntry("python", 1, 1024, 0, 1),
    ]
    assert cfg.warm_pool_max_age_seconds == 60
    assert load(None, environ={"MORU_WARM_POOL": "base=3"}).warm_pool == {"base": 3}
    assert load(None, overrides={"warm_pool": "base=1,python=2"}, environ={}).warm_pool == {
        "base": 1,
        "python": 2,
    }
    assert load(None, environ={}).warm_pool == {}
    with pytest.raises(ConfigError, match=r"warm_pool: expected NAME=COUNT"):
        load(None, environ={"MORU_WARM_POOL": "base"})
    with pytest.raises(ConfigError, match=r"warm_pool.base: expected an integer"):
        load(None, environ={"MORU_WARM_POOL": "base=two"})
    with pytest.raises(ConfigError, match=r"warm_pool.base:x: VCPUS"):
        load(None, environ={"MORU_WARM_POOL": "base:x=1"})


# -- metrics ------------------------------------------------------------------


@sync
async def test_pool_metrics_render() -> None:
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from hostd.observability.prometheus import Metrics

    f = Fakes()
    pool = make_pool(f, target=2)
    async with running(pool):
        await until(lambda: ready(pool) == 2)
        pool.claim(SHAPE)
    cap = Capacity(Config(max_sandboxes=4, memory_budget_mb=4096))
    mgr = SimpleNamespace(ids=list, sandbox=None, capacity=cap, pool=pool)
    text = generate_latest(Metrics(mgr).registry).decode()
    lv = 'shape="base:2:512:2048",template="base"'
    for line in (
        f"moru_warm_pool_size{{{lv}}} 2.0",
        f"moru_warm_pool_claims_total{{{lv}}} 1.0",
        f"moru_warm_pool_misses_total{{{lv}}} 0.0",
        f"moru_warm_pool_refill_seconds_count{{{lv}}}",
        "moru_warm_pool_ready{",
        'moru_sandbox_creates_total{path="warm_pool"} 0.0',
    ):
        assert line in text, line

"""The warm pool: sandboxes prepared before anyone asks, so a Create is a claim.

`WarmPool` keeps, per shape (template, vCPUs, memory, disk), a configured
number of members ready. It knows nothing of VMs: it is given a `prepare`
callable that makes a member (everything but the identity a claim gives),
a `destroy` callable, an `alive` check, the node's `Capacity` and the
`EventBus`. The sandbox manager owns those; the pool owns the counting.

- `claim(shape)` is synchronous (no await between looking and taking), so
  two Creates in one event loop never get the same member. A member found
  dead is dropped, never handed out. None: the caller boots as before.
- Every member, ready or being prepared, holds a capacity reservation under
  its id, as a sandbox does; a claimed member's reservation becomes the
  sandbox's. A refill starts only if a sandbox of the same shape would still
  fit afterwards, and `evict()` gives a member's room back to a Create that
  found the node full: the pool never starves real sandboxes.
- Refill starts right after a claim; a failed prepare waits 1 s, doubling up
  to `backoff_max` seconds, before the next attempt.
- Members older than `max_age` are destroyed and replaced.
- Members have no store row: after a hostd crash the restart's orphan sweep
  removes them (cgroup, network, run dir); `close()` destroys them on a
  clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from hostd.errors import ResourceExhausted
from hostd.events import Event, EventBus, EventType, Reason
from hostd.resources import Capacity

log = logging.getLogger("hostd.pool")

CHECK_SECONDS = 1.0  # how often members are checked for death and age
BACKOFF_START = 1.0


@dataclass(frozen=True)
class PoolShape:
    """What a Create must ask for exactly to be served from the pool."""

    template: str
    vcpus: int
    memory_mb: int
    disk_mb: int

    def __str__(self) -> str:
        return f"{self.template}:{self.vcpus}:{self.memory_mb}:{self.disk_mb}"


class PoolMember(Protocol):
    @property
    def id(self) -> str: ...


M = TypeVar("M", bound=PoolMember)


@dataclass
class _Ready(Generic[M]):
    member: M
    born: float


@dataclass
class ShapeStats:
    """One shape's pool state (for /metrics and the status line)."""

    shape: PoolShape
    target: int
    ready: int = 0
    preparing: int = 0
    claims: int = 0
    misses: int = 0
    refill_failures: int = 0
    recycled: int = 0
    evicted: int = 0
    died: int = 0
    refill_seconds_sum: float = 0.0
    refills: int = 0
    last_refill_seconds: float = 0.0
    last_error: str = ""


@dataclass
class _Slot(Generic[M]):
    """One shape: its ready members, the prepare in flight, its counters."""

    stats: ShapeStats
    ready: list[_Ready[M]] = field(default_factory=list)
    preparing: asyncio.Task[M] | None = None
    preparing_id: str = ""
    dead: list[M] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class WarmPool(Generic[M]):
    def __init__(
        self,
        targets: dict[PoolShape, int],
        *,
        prepare: Callable[[PoolShape, str], Coroutine[object, object, M]],
        destroy: Callable[[M], Coroutine[object, object, None]],
        alive: Callable[[M], bool],
        new_id: Callable[[], str],
        capacity: Capacity,
        bus: EventBus,
        max_age: float = 3600.0,
        backoff_max: float = 60.0,
        backoff_start: float = BACKOFF_START,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._prepare = prepare
        self._destroy = destroy
        self._alive = alive
        self._new_id = new_id
        self.capacity = capacity
        self.bus = bus
        self.max_age = max_age
        self.backoff_max = backoff_max
        self.backoff_start = backoff_start
        self._clock = clock
        self._slots: dict[PoolShape, _Slot[M]] = {
            s: _Slot(ShapeStats(s, n)) for s, n in targets.items() if n > 0
        }
        self._closed = False
        self._check = asyncio.Event()

    # -- the create path -----------------------------------------------------

    def claim(self, shape: PoolShape) -> M | None:
        """A ready, live member of exactly `shape`, now the caller's; None: prepare one yourself.

        The member's capacity reservation (under its id) passes to the caller.
        """
        slot = self._slots.get(shape)
        if slot is None or self._closed:
            return None
        slot.wake.set()  # refill right away, whatever happens here
        while slot.ready:
            r = slot.ready.pop(0)  # oldest first: it is the next to age out
            if self._alive(r.member):
                slot.stats.claims += 1
                slot.stats.ready = len(slot.ready)
                return r.member
            slot.dead.append(r.member)  # _watch destroys it (still reserved until then)
            self._check.set()
        slot.stats.ready = 0
        slot.stats.misses += 1
        return None

    def matches(self, shape: PoolShape) -> bool:
        return shape in self._slots

    async def evict(self) -> bool:
        """Frees one member's room for a Create that found the node full; False: none held."""
        for slot in self._slots.values():
            if slot.ready:
                r = slot.ready.pop()
                slot.stats.ready = len(slot.ready)
                slot.stats.evicted += 1
                await self._discard(
                    slot, r.member, Reason.NODE_FULL, "evicted: the node needs room"
                )
                return True
        for slot in self._slots.values():
            task = slot.preparing
            if task is not None and not task.done():
                slot.stats.evicted += 1
                task.cancel()
                # The task's own cleanup releases the VM; wait for it to have.
                with contextlib.suppress(BaseException):
                    await asyncio.shield(asyncio.wait([task]))
                self.capacity.release(slot.preparing_id)
                return True
        return False

    # -- background ------------------------------------------------------------

    async def run(self) -> None:
        """Keeps every shape filled until cancelled (one refill at a time per shape).

        Checking members (death, age) is its own loop: a refill takes seconds to
        a minute, and a dead member must not hold its room or resources meanwhile.
        """
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch(), name="warm-pool watch")
            for slot in self._slots.values():
                tg.create_task(self._keep(slot), name=f"warm-pool {slot.stats.shape}")

    async def _watch(self) -> None:
        while True:
            for slot in self._slots.values():
                await self._prune(slot)
            self._check.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CHECK_SECONDS):
                    await self._check.wait()

    async def _keep(self, slot: _Slot[M]) -> None:
        delay, next_try = 0.0, 0.0
        while True:
            want = len(slot.ready) < slot.stats.target and self._room(slot)
            if want and self._clock() >= next_try:
                if await self._refill(slot):
                    delay = 0.0
                    continue
                delay = min(self.backoff_max, max(self.backoff_start, delay * 2))
                next_try = self._clock() + delay
            slot.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(
                    CHECK_SECONDS
                    if not want
                    else max(0.0, min(CHECK_SECONDS, next_try - self._clock()))
                ):
                    await slot.wake.wait()

    def _room(self, slot: _Slot[M]) -> bool:
        """Room for one more member AND, after it, one real sandbox of the same shape."""
        cap, mem = self.capacity, slot.stats.shape.memory_mb
        return (
            cap.count + 2 <= cap.max_sandboxes
            and cap.memory_used_mb + 2 * mem <= cap.memory_budget_mb
        )

    async def _refill(self, slot: _Slot[M]) -> bool:
        shape = slot.stats.shape
        mid = self._new_id()
        t0 = self._clock()
        try:
            self.capacity.reserve(mid, shape.memory_mb)
        except ResourceExhausted:
            return True  # no room after all: not a failure (the loop waits for room)
        try:
            slot.preparing = asyncio.create_task(self._prepare(shape, mid), name=f"prepare {mid}")
            slot.preparing_id = mid
            slot.stats.preparing = 1
            try:
                member = await slot.preparing
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # hostd stopping: the prepare undoes itself; wait for it, then give back.
                    slot.preparing.cancel()
                    await asyncio.wait([slot.preparing])
                    self.capacity.release(mid)
                    raise
                self.capacity.release(mid)  # evicted while preparing
                return True
            except Exception as e:
                self.capacity.release(mid)
                slot.stats.refill_failures += 1
                slot.stats.last_error = str(e).splitlines()[0] if str(e) else repr(e)
                log.warning("warm pool %s: preparing a member failed: %s", shape,
                            slot.stats.last_error)  # fmt: skip
                self.bus.publish(Event(mid, EventType.POOL_REFILL_FAILED, Reason.CREATE_FAILED,
                                       shape.template, slot.stats.last_error,
                                       self._clock() - t0))  # fmt: skip
                return False
        finally:
            slot.preparing = None
            slot.stats.preparing = 0
        took = self._clock() - t0
        if self._closed:
            await self._discard(slot, member, Reason.HOST_RESTART, "hostd is stopping")
            return True
        slot.ready.append(_Ready(member, self._clock()))
        st = slot.stats
        st.ready = len(slot.ready)
        st.refills += 1
        st.refill_seconds_sum += took
        st.last_refill_seconds = took
        st.last_error = ""
        self.bus.publish(Event(member.id, EventType.POOL_MEMBER_READY, Reason.UNSPECIFIED,
                               shape.template, str(shape), took))  # fmt: skip
        log.info("warm pool %s: member %s ready in %.2f s (%d/%d)", shape, member.id, took,
                 st.ready, st.target)  # fmt: skip
        return True

    async def _prune(self, slot: _Slot[M]) -> None:
        while slot.dead:
            await self._discard(slot, slot.dead.pop(), Reason.VMM_EXITED, "died while waiting")
        now = self._clock()
        for r in list(slot.ready):
            if r not in slot.ready:
                continue  # claimed or evicted while this loop awaited
            if not self._alive(r.member):
                slot.ready.remove(r)
                await self._discard(slot, r.member, Reason.VMM_EXITED, "died while waiting")
            elif now - r.born > self.max_age:
                slot.ready.remove(r)
                slot.stats.recycled += 1
                await self._discard(slot, r.member, Reason.TIMEOUT,
                                    f"recycled after {self.max_age:g} s")  # fmt: skip
        slot.stats.ready = len(slot.ready)

    async def _discard(self, slot: _Slot[M], member: M, reason: Reason, why: str) -> None:
        if reason is Reason.VMM_EXITED:
            slot.stats.died += 1
        try:
            await self._destroy(member)
        except Exception:
            log.exception("warm pool: destroying member %s left something behind", member.id)
        finally:
            self.capacity.release(member.id)
        slot.wake.set()
        self.bus.publish(Event(member.id, EventType.POOL_MEMBER_REMOVED, reason,
                               slot.stats.shape.template, why))  # fmt: skip
        log.info("warm pool %s: member %s removed (%s)", slot.stats.shape, member.id, why)

    async def close(self) -> None:
        """Destroys every member (hostd stopping); members never outlive their hostd."""
        self._closed = True
        for slot in self._slots.values():
            while slot.dead:
                await self._discard(slot, slot.dead.pop(), Reason.VMM_EXITED, "died while waiting")
            while slot.ready:
                r = slot.ready.pop()
                await self._discard(slot, r.member, Reason.HOST_RESTART, "hostd is stopping")
            slot.stats.ready = 0

    # -- reporting -------------------------------------------------------------

    def stats(self) -> list[ShapeStats]:
        return [s.stats for s in self._slots.values()]

    def status_line(self) -> str:
        parts = []
        for st in self.stats():
            line = f"{st.shape} {st.ready}/{st.target} ready"
            if st.preparing:
                line += ", 1 preparing"
            line += f", {st.claims} claims, {st.misses} misses"
            if st.last_error:
                line += f", last refill failed: {st.last_error}"
            parts.append(line)
        return "; ".join(parts) or "off"


__all__ = ["PoolMember", "PoolShape", "ShapeStats", "WarmPool"]

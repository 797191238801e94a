"""An in-process bus of sandbox lifecycle events (WatchEvents, metrics exporters).

Subscribers get their own bounded queue; a subscriber too slow to keep up
loses its oldest events rather than slowing hostd down (counted in
`dropped`). Hooks (plain callables) see every event synchronously, which is
how a Prometheus exporter can count creates, kills and their durations.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


class EventType(enum.Enum):
    CREATED = 1
    PAUSED = 2
    RESUMED = 3
    TIMEOUT_EXTENDED = 4
    KILLED = 5
    CREATE_FAILED = 6
    GUEST_OOM = 7
    # Warm pool (hostd/pool.py); sandbox_id is the member's (its id once claimed).
    POOL_MEMBER_READY = 8
    POOL_MEMBER_REMOVED = 9
    POOL_REFILL_FAILED = 10
    ERROR = 11
    REPAIRED = 12


class Reason(enum.Enum):
    UNSPECIFIED = 0
    USER = 1
    TIMEOUT = 2
    VMM_EXITED = 3
    OOM = 4
    CREATE_FAILED = 5
    HOST_RESTART = 6
    NODE_FULL = 7
    HEALTH = 8


@dataclass(frozen=True)
class Event:
    sandbox_id: str
    type: EventType
    reason: Reason = Reason.UNSPECIFIED
    template_id: str = ""
    message: str = ""
    # How long the operation took (create, kill, pause, resume), if timed.
    duration: float | None = None
    time: float = field(default_factory=time.time)


class Subscription:
    def __init__(self, sandbox_id: str, maxsize: int) -> None:
        self.sandbox_id = sandbox_id
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.dropped = 0

    def offer(self, ev: Event) -> None:
        if self.sandbox_id and ev.sandbox_id != self.sandbox_id:
            return
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(ev)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            yield await self.queue.get()


class EventBus:
    def __init__(self, queue_size: int = 1024) -> None:
        self._subs: set[Subscription] = set()
        self._hooks: list[Callable[[Event], None]] = []
        self._queue_size = queue_size

    def add_hook(self, hook: Callable[[Event], None]) -> None:
        self._hooks.append(hook)

    def publish(self, ev: Event) -> None:
        for hook in self._hooks:
            hook(ev)
        for sub in list(self._subs):
            sub.offer(ev)

    @asynccontextmanager
    async def subscribe(self, sandbox_id: str = "") -> AsyncIterator[Subscription]:
        sub = Subscription(sandbox_id, self._queue_size)
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)

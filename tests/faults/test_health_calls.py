"""The health check rides on the metrics sampler's answers: a sample from an
initialised guestd within the interval is the check, so an idle sandbox costs
guestd one call per interval instead of two. A restarted (uninitialised)
guestd's sample does not count, so it is still found and initialised again.

A real guestd (on this host, tests/guestd's harness) answers; the VM around
it is a stand-in (QEMU and its vsock backend "alive"), since only the guest
calls are under test here. Before: every check sent its own Health call.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "guestd"))

from guestd_harness import Guestd  # noqa: E402

from hostd.events import EventBus, EventType  # noqa: E402
from hostd.guest import GuestClient, open_channel  # noqa: E402
from hostd.health import HealthChecker, HealthPolicy  # noqa: E402
from hostd.state import State  # noqa: E402


class _AliveVm:
    """Stands in for QEMU and its vsock backend: both alive."""

    def is_alive(self) -> bool:
        return True

    def vsock_backend_alive(self) -> bool:
        return True

    def vsock_device_dead(self) -> bool:
        return False


def _sandbox(channel: Any) -> Any:
    rec = SimpleNamespace(sandbox_id="sbx_health", template_id="base", hostname="h",
                          access_token="", state=State.RUNNING, paused_to_disk=False,
                          end_at=0.0, error="")  # fmt: skip
    return SimpleNamespace(id=rec.sandbox_id, rec=rec, gone=False, lock=asyncio.Lock(),
                           res=SimpleNamespace(vm=_AliveVm(), channel=channel))  # fmt: skip


def test_a_sample_from_an_initialised_guestd_counts_as_the_check() -> None:
    g = Guestd()
    try:
        async def scenario() -> None:
            ch = open_channel(g.target)
            sb = _sandbox(ch)
            bus = EventBus()
            events: list[EventType] = []
            bus.add_hook(lambda ev: events.append(ev.type))
            checker = HealthChecker(lambda: [sb], None, bus,  # type: ignore[arg-type]
                                    lambda rec: {"AGAIN": "1"}, HealthPolicy(interval=30.0))
            client = GuestClient(ch, "")

            # A fresh guestd: its sample says uninitialised and does not count; the
            # check calls Health, sees it and initialises it.
            assert not (await client.metrics()).guest_initialized
            await checker.check_all()
            assert checker.health_calls == 1
            assert (await client.health()).initialized
            assert events == [EventType.REPAIRED]

            # Initialised now: the sampler's answer is the check.
            sample = await client.metrics()
            assert sample.guest_initialized
            checker.answered(sb.id)
            for _ in range(3):
                await checker.check_all()
            assert checker.health_calls == 1

            # An answer older than the interval no longer counts.
            checker.policy = HealthPolicy(interval=0.05)
            await asyncio.sleep(0.1)
            await checker.check_all()
            assert checker.health_calls == 2
            await ch.close(None)

        asyncio.run(scenario())
    finally:
        g.close()

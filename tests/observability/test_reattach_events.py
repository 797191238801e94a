"""Events hostd publishes while it re-attaches at start are counted by /metrics (issue 7).

A real hostd starts over a state store that holds two sandboxes it cannot
get back: one whose VMM is gone (no processes, no run dir) and one that was
still being created when the previous hostd died. Re-attaching discards both
and publishes killed/vmm_exited and create_failed/host_restart; the exporter
must have seen them, which needs Observability to exist before the manager
starts. No VM is booted: the records point at a run dir that does not exist.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from hostd.state import State
from hostd.store import SandboxRecord, Store

from .obs_hostd import ObsHostd, pb
from .promtext import value


def _record(sid: str, state: State) -> SandboxRecord:
    now = time.time()
    return SandboxRecord(
        sandbox_id=sid,
        template_id="base",
        state=state,
        created_at=now,
        started_at=now,
        end_at=now + 300,
        run_dir=f"/tmp/moru-no-such-run-dir/{sid}",
    )


@pytest.fixture
def h() -> Iterator[ObsHostd]:
    h = ObsHostd()
    try:
        yield h
    finally:
        left = h.close()
        assert not left, left


def test_events_published_while_reattaching_are_counted(h: ObsHostd) -> None:
    dead, creating = "sbx_" + "d" * 20, "sbx_" + "c" * 20
    store = Store(h.state / "hostd.db")
    store.put(_record(dead, State.RUNNING))
    store.put(_record(creating, State.CREATING))
    store.close()

    h.start()
    m = h.metrics()
    killed = value(m, "moru_sandbox_events_total", type="killed", reason="vmm_exited")
    failed = value(m, "moru_sandbox_events_total", type="create_failed", reason="host_restart")
    assert (killed, failed) == (1, 1), h.log_tail()
    # Both records are gone from the store and from the API.
    assert not h.sandboxes.List(pb.ListRequest(), metadata=h.md()).sandboxes

"""Console/cgroup watcher: guestd restarts, guest OOM events in order, host OOM counts.

Uses FakeManager (see fakes.py) with real console files, written the way
QEMU appends the guest serial console.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostd.events import EventType, Reason
from hostd.observability import Observability

from .fakes import FakeManager, sid
from .promtext import parse, value

RESTART = b"moru-init: guestd exited with status 137; restart 1 in 0.1s\r\n"
OOM = (
    b"[   12.345678] Out of memory: Killed process 321 (python3) total-vm:812345kB,"
    b" anon-rss:400000kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:900kB oom_score_adj:0\r\n"
)
MEMCG_OOM = b"[ 20.1] Memory cgroup out of memory: Killed process 99 (stress) total-vm:1kB\r\n"


@pytest.fixture
def root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="mo"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def scrape_local(obs: Observability) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    return parse(generate_latest(obs.registry))


def append(p: Path, data: bytes) -> None:
    with p.open("ab") as f:
        f.write(data)


def test_restarts_and_guest_ooms_become_counters_and_events(root: Path) -> None:
    async def main() -> None:
        mgr = FakeManager(root)
        obs = Observability(mgr)
        a = mgr.add(sid(1))
        async with mgr.bus.subscribe() as sub:
            obs.console.prime()
            con = a.res.vm.console_log
            append(con, b"[    0.000000] Linux version 6.1\r\nmoru-init: guestd exited wi")
            obs.console.scan_once()
            m = scrape_local(obs)
            assert value(m, "moru_guestd_restarts_total") == 0
            # The rest of a line split across two reads is still seen once.
            append(con, b"th status 1; restart 1 in 0.1s\r\n" + OOM + RESTART + MEMCG_OOM)
            obs.console.scan_once()
            obs.console.scan_once()
            m = scrape_local(obs)
            assert value(m, "moru_guestd_restarts_total") == 2
            assert value(m, "moru_oom_kills_total", source="guest") == 2
            assert value(m, "moru_sandbox_events_total", type="guest_oom", reason="oom") == 2
            evs = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
        assert [(e.type, e.reason, e.sandbox_id) for e in evs] == [
            (EventType.GUEST_OOM, Reason.OOM, sid(1))
        ] * 2
        assert "pid 321 (python3)" in evs[0].message and "pid 99 (stress)" in evs[1].message

    asyncio.run(main())


def test_sandboxes_present_at_start_are_read_from_their_end(root: Path) -> None:
    mgr = FakeManager(root)
    a = mgr.add(sid(1))
    append(a.res.vm.console_log, RESTART * 3)  # counted by the previous hostd
    obs = Observability(mgr)
    obs.console.prime()
    b = mgr.add(sid(2))  # created later: read from the start
    append(b.res.vm.console_log, RESTART)
    append(a.res.vm.console_log, RESTART)
    obs.console.scan_once()
    assert value(scrape_local(obs), "moru_guestd_restarts_total") == 2


def test_truncated_console_is_read_again_from_the_start(root: Path) -> None:
    mgr = FakeManager(root)
    obs = Observability(mgr)
    obs.console.prime()
    a = mgr.add(sid(1))
    append(a.res.vm.console_log, b"x" * 500 + b"\n" + RESTART)
    obs.console.scan_once()
    a.res.vm.console_log.write_bytes(RESTART)  # rotated to a shorter file
    obs.console.scan_once()
    assert value(scrape_local(obs), "moru_guestd_restarts_total") == 2


def test_host_cgroup_oom_kills_are_counted_by_increase(root: Path) -> None:
    mgr = FakeManager(root)
    a = mgr.add(sid(1))
    a.res.cgroup.set(oom=4)  # before this hostd: not counted
    obs = Observability(mgr)
    obs.console.prime()
    obs.console.scan_once()
    assert value(scrape_local(obs), "moru_oom_kills_total", source="host") == 0
    a.res.cgroup.set(oom=6)
    obs.console.scan_once()
    assert value(scrape_local(obs), "moru_oom_kills_total", source="host") == 2
    mgr.remove(sid(1))
    obs.console.scan_once()  # a gone sandbox is forgotten, its count stays in the total
    assert value(scrape_local(obs), "moru_oom_kills_total", source="host") == 2

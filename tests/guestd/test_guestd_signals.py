"""Commands get default signal dispositions even when guestd was started with
signals ignored (under nohup, or as a shell's background job)."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
from guestd_harness import Guestd, collect, quiet_home, shell

from moru_proto.guest.v1 import guest_pb2
from moru_proto.guest.v1 import process_pb2 as pb

IGNORED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)


@pytest.fixture
def nohup_guestd() -> Iterator[Guestd]:
    g = Guestd(ignored_signals=tuple(int(s) for s in IGNORED))
    try:
        g.guest.Init(guest_pb2.InitRequest(env={"HOME": quiet_home(g)}))
        yield g
    finally:
        g.close()


def test_children_start_with_nothing_ignored(nohup_guestd: Guestd) -> None:
    r = collect(nohup_guestd.process.Start(shell("grep '^SigIgn' /proc/self/status"), timeout=30))
    assert r.end is not None and r.end.exit_code == 0
    mask = int(r.stdout.split()[1], 16)
    leaked = [s.name for s in IGNORED if mask & (1 << (int(s) - 1))]
    assert not leaked, f"ignored in the child: {leaked}"


def test_trap_works_and_guestd_survives_the_signal_it_was_told_to_ignore(
        nohup_guestd: Guestd) -> None:
    stream = nohup_guestd.process.Start(shell(
        "trap 'echo got-hup; exit 7' HUP; echo ready; while :; do sleep 0.05; done"), timeout=30)
    it = iter(stream)
    pid = next(it).start.pid
    first = next(ev for ev in it if ev.HasField("data"))
    assert first.data.stdout == b"ready\n"
    nohup_guestd.process.SendSignal(
        pb.SendSignalRequest(process=pb.ProcessSelector(pid=pid), signal=1), timeout=10)
    r = collect(it)
    assert r.stdout == b"got-hup\n" and r.end is not None and r.end.exit_code == 7
    nohup_guestd.proc.send_signal(signal.SIGHUP)  # still ignored by guestd itself
    r = collect(nohup_guestd.process.Start(shell("echo alive"), timeout=30))
    assert r.stdout == b"alive\n" and nohup_guestd.proc.poll() is None

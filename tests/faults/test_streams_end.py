"""Every open call ends when its sandbox ends (kill, expiry, pause), with a status
naming the sandbox and why: the sync SDK, the async SDK and a raw gRPC client.

Before, a `commands.run("sleep 100", timeout=0)` blocked forever once its
sandbox was killed or expired (hostd cancelled the upstream call and never
answered its own client); a pause left it hanging on a frozen guest.
The bounds below only catch a hang; how fast calls end is measured by
benchmarks/bench_faults.py.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from hostd_framework import EventWatcher, Hostd, wait_for

from moru import AsyncSandbox, Sandbox
from moru.exceptions import SandboxEndedException
from moru_proto.guest.v1 import process_pb2
from moru_proto.host.v1 import sandbox_pb2 as pb

HANG = 60.0  # seconds after which a call that has not ended counts as hung


class Outcome:
    """What a call running in a thread ended with (None while still running)."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.returned = False
        self.done = threading.Event()

    def run(self, fn: Callable[[], Any]) -> threading.Thread:
        def body() -> None:
            try:
                fn()
                self.returned = True
            except BaseException as e:  # recorded for the test
                self.error = e
            finally:
                self.done.set()

        t = threading.Thread(target=body, daemon=True)
        t.start()
        return t


def sdk_sync(sbx: Sandbox, cmd: str) -> Outcome:
    o = Outcome()
    o.run(lambda: sbx.commands.run(cmd, timeout=0))
    return o


def sdk_async(sandbox_id: str, cmd: str) -> Outcome:
    async def go() -> None:
        a = await AsyncSandbox.connect(sandbox_id)
        await a.commands.run(cmd, timeout=0)

    o = Outcome()
    o.run(lambda: asyncio.run(go()))
    return o


def raw_grpc(h: Hostd, info: pb.SandboxInfo, cmd: str) -> Outcome:
    req = process_pb2.StartRequest(config=process_pb2.ProcessConfig(shell=cmd))

    def go() -> None:
        for _ in h.process.Start(req, metadata=h.md(info)):
            pass

    o = Outcome()
    o.run(go)
    return o


def wait_running(sbx: Sandbox, markers: list[str]) -> None:
    def all_there() -> bool:
        seen = " ".join(" ".join([p.cmd, *p.args]) for p in sbx.commands.list())
        return all(m in seen for m in markers)

    wait_for(all_there, 120, interval=0.3, what=f"commands {markers} running")


def assert_ended(o: Outcome, sandbox_id: str, reason: str, name: str = "") -> None:
    assert o.done.wait(HANG), f"{name} call still runs {HANG:.0f} s after its sandbox ended"
    assert not o.returned, "the call returned normally"
    e = o.error
    if isinstance(e, grpc.RpcError):  # the raw client
        want = grpc.StatusCode.ABORTED if reason == "paused" else grpc.StatusCode.NOT_FOUND
        assert e.code() == want, (e.code(), e.details())
        assert sandbox_id in (e.details() or "")
        trailers: dict[str, Any] = dict(e.trailing_metadata() or ())  # type: ignore[arg-type]
        assert trailers.get("moru-end-reason") == reason, trailers
        return
    assert isinstance(e, SandboxEndedException), repr(e)
    assert e.sandbox_id == sandbox_id
    assert e.reason == reason
    assert sandbox_id in str(e)


@pytest.fixture
def sbx(hostd: Hostd) -> Iterator[Sandbox]:
    s = Sandbox.create(timeout=1800)
    try:
        yield s
    finally:
        s.kill()


@pytest.mark.vm
def test_kill_ends_open_calls_sync_async_and_raw(hostd: Hostd, sbx: Sandbox) -> None:
    info = hostd.sandboxes.Get(pb.GetRequest(sandbox_id=sbx.sandbox_id), metadata=hostd.md())
    calls = {
        "sync": sdk_sync(sbx, "sleep 101"),
        "async": sdk_async(sbx.sandbox_id, "sleep 102"),
        "raw": raw_grpc(hostd, info, "sleep 103"),
    }
    wait_running(sbx, ["sleep 101", "sleep 102", "sleep 103"])
    sbx.kill()
    for name, o in calls.items():
        assert_ended(o, sbx.sandbox_id, "killed", name)


@pytest.mark.vm
def test_pause_then_expiry_end_open_calls(hostd: Hostd, sbx: Sandbox) -> None:
    info = hostd.sandboxes.Get(pb.GetRequest(sandbox_id=sbx.sandbox_id), metadata=hostd.md())
    # Pause: the call ends (ABORTED, reason paused); the sandbox resumes and works.
    calls = {"sync": sdk_sync(sbx, "sleep 201"), "raw": raw_grpc(hostd, info, "sleep 202")}
    wait_running(sbx, ["sleep 201", "sleep 202"])
    sbx.beta_pause()
    for name, o in calls.items():
        assert_ended(o, sbx.sandbox_id, "paused", name)
    back = Sandbox.connect(sbx.sandbox_id)
    assert back.commands.run("echo back").stdout.strip() == "back"
    # Expiry: the reaper kills it on its timeout; the open call ends (reason timeout).
    calls = {"sync": sdk_sync(back, "sleep 301"), "raw": raw_grpc(hostd, info, "sleep 302")}
    wait_running(back, ["sleep 301", "sleep 302"])
    with EventWatcher(hostd, sbx.sandbox_id) as events:
        back.set_timeout(1)
        for name, o in calls.items():
            assert_ended(o, sbx.sandbox_id, "timeout", name)
        # Released (the event comes after the cleanup), so nothing is left behind.
        ev = events.wait(sbx.sandbox_id, pb.EVENT_TYPE_KILLED, HANG)
    assert ev.reason == pb.EVENT_REASON_TIMEOUT
    assert not back.is_running()

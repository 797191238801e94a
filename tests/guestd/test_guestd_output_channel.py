"""Output channels: once the client connects, a command's output as frames on the
data listener (process.proto, OutputChannel), with the end event on the Start
stream after them."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest
from guestd_harness import Guestd, Result, argv, collect, quiet_home, shell

from moru_proto.guest.v1 import guest_pb2
from moru_proto.guest.v1 import process_pb2 as pb

KINDS = {1: "stdout", 2: "stderr", 3: "pty"}
GB = 1024**3


@pytest.fixture(scope="module")
def g() -> Iterator[Guestd]:
    gd = Guestd("--keepalive-seconds", "0.5", data_listener=True)
    gd.guest.Init(guest_pb2.InitRequest(env={"HOME": quiet_home(gd)}))
    yield gd
    gd.close()


def _exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = s.recv_into(view[got:])
        if not k:
            raise EOFError(f"channel closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def open_channel(ev: pb.ProcessEvent) -> socket.socket:
    out = ev.start.output
    assert out.ticket and out.address.startswith("unix:"), ev
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(out.address.removeprefix("unix:"))
    s.sendall(out.ticket)
    return s


def read_frames(s: socket.socket, r: Result, limit: int = -1) -> bool:
    """Frames into `r` until the end frame (True), EOF or `limit` frames (False)."""
    while limit:
        limit -= 1
        try:
            kind, n = struct.unpack(">BI", _exactly(s, 5))
        except EOFError:
            return False
        body = _exactly(s, n)
        if kind in KINDS:
            name = KINDS[kind]
            setattr(r, name, getattr(r, name) + body)
            r.order.append((name, body))
        elif kind == 4:
            for name, v in zip(("stdout", "stderr", "pty"), struct.unpack(">QQQ", body),
                               strict=True):
                r.dropped[name] = r.dropped.get(name, 0) + v
        else:
            assert (kind, n) == (5, 0)
            return True
    return False


def feed(r: Result, ev: pb.ProcessEvent) -> None:
    """One stream event into `r` (as guestd_harness.collect does)."""
    one = collect([ev])
    r.stdout += one.stdout
    r.stderr += one.stderr
    r.order += one.order
    for k, v in one.dropped.items():
        r.dropped[k] = r.dropped.get(k, 0) + v
    r.end = one.end or r.end


def run_channel(events: Iterator[pb.ProcessEvent]) -> tuple[Result, bool]:
    """Connects the channel at once; (result of events and frames, whether guestd switched)."""
    first = next(events)
    r = Result(pid=first.start.pid)
    switched = False
    with open_channel(first) as s:
        for ev in events:
            if ev.HasField("to_channel"):
                assert not switched
                switched = True
                assert read_frames(s, r)
                assert s.recv(1) == b""  # closed after the end frame
            else:
                feed(r, ev)
    return r, switched


def test_interleaved_output_keeps_order_and_exit_code(g: Guestd) -> None:
    cmd = ("for i in 1 2 3; do echo out$i; sleep 0.05; echo err$i >&2; sleep 0.05; done;"
           " exit 3")
    r, switched = run_channel(iter(g.process.Start(shell(cmd, output_channel=True))))
    assert switched
    assert r.stdout == b"out1\nout2\nout3\n"
    assert r.stderr == b"err1\nerr2\nerr3\n"
    assert [k for k, _ in r.order] == ["stdout", "stderr"] * 3
    assert r.end is not None and r.end.exit_code == 3 and r.end.exited


def test_output_stays_on_the_stream_until_the_channel_is_connected(g: Guestd) -> None:
    events = list(g.process.Start(shell("echo hi; echo ho >&2", output_channel=True)))
    assert events[0].start.output.ticket
    assert not any(ev.HasField("to_channel") for ev in events)
    r = collect(events)
    assert (r.stdout, r.stderr) == (b"hi\n", b"ho\n")
    assert r.end is not None and r.end.exit_code == 0


def test_without_a_data_listener_output_comes_as_events(guestd: Guestd) -> None:
    events = list(guestd.process.Start(shell("echo hi", output_channel=True)))
    assert not events[0].start.HasField("output")
    r = collect(events)
    assert r.stdout == b"hi\n" and r.end is not None and r.end.exit_code == 0


def test_connect_replays_kept_output_over_a_channel(g: Guestd) -> None:
    started = g.process.Start(shell("echo early; sleep 0.5; echo late"))
    pid = next(iter(started)).start.pid
    started.cancel()  # type: ignore[no-untyped-call]  # the process outlives its stream
    time.sleep(0.2)
    sel = pb.ProcessSelector(pid=pid)
    r, switched = run_channel(iter(g.process.Connect(pb.ConnectRequest(process=sel,
                                                                       output_channel=True))))
    assert switched
    assert r.stdout == b"early\nlate\n"
    assert r.end is not None and r.end.exit_code == 0


def test_a_broken_channel_hands_the_rest_to_the_stream(g: Guestd) -> None:
    events = iter(g.process.Start(shell("sleep 0.3; seq 1 300000", output_channel=True)))
    first = next(events)
    r = Result()
    with open_channel(first) as s:
        assert next(events).HasField("to_channel")
        read_frames(s, r, limit=1)
    assert r.stdout  # some output came over the channel
    rest = collect(events)
    # The stream goes on from where guestd's reader stood; what sat in the
    # closed socket is gone with it, the rest arrives as data events.
    assert rest.end is not None and rest.end.exit_code == 0
    assert rest.stdout.endswith(b"\n299999\n300000\n")


def test_1gb_over_a_channel_with_bounded_rss(g: Guestd) -> None:
    for _ in range(2):  # warm up: the baseline includes the first stream's buffers
        run_channel(iter(g.process.Start(argv("head", "-c", str(32 << 20), "/dev/zero",
                                              output_channel=True))))
    base = g.vm_hwm_kib()
    events = iter(g.process.Start(argv("head", "-c", str(GB), "/dev/zero", output_channel=True)))
    first = next(events)
    total = 0
    t0 = time.monotonic()
    with open_channel(first) as s:
        for ev in events:
            if ev.HasField("to_channel"):
                break
            total += len(ev.data.stdout)
        buf = bytearray(1 << 20)
        while True:
            kind, n = struct.unpack(">BI", _exactly(s, 5))
            if kind == 5:
                break
            assert kind == 1
            while n:
                k = s.recv_into(buf, min(n, len(buf)))
                assert k
                n -= k
                total += k
    end = collect(events).end
    secs = time.monotonic() - t0
    grown_mib = (g.vm_hwm_kib() - base) / 1024
    print(f"1 GiB over a channel in {secs:.2f} s = {GB / secs / 1e6:.0f} MB/s;"
          f" guestd VmHWM +{grown_mib:.1f} MiB")
    assert total == GB
    assert end is not None and end.exit_code == 0
    assert grown_mib < 32, f"guestd peak RSS grew by {grown_mib:.1f} MiB for 1 GiB of output"

"""Through a real hostd and microVM: large command output moves to an output
channel on hostd's data relay (moru._output_channel) with today's semantics."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import moru._output_channel as output_channel
from moru import Sandbox
from moru.exceptions import CommandExitException, SandboxEndedException, TimeoutException

pytestmark = pytest.mark.vm


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The channels the SDK opened (a spy: the real open runs)."""
    seen: list[Any] = []
    real = output_channel.OutputChannel.open

    async def spy(info: Any) -> Any:
        ch = await real(info)
        seen.append(ch)
        return ch

    monkeypatch.setattr(output_channel.OutputChannel, "open", spy)
    yield seen


def test_large_output_over_the_channel_keeps_order_and_exit_code(
        shared_sandbox: Sandbox, opened: list[Any]) -> None:
    kinds: list[str] = []
    with pytest.raises(CommandExitException) as ei:
        shared_sandbox.commands.run(
            "echo first >&2; sleep 0.5; head -c 5000000 /dev/zero | tr '\\0' a; sleep 0.5;"
            " echo last >&2; exit 4",
            on_stdout=lambda s: kinds.append("out"), on_stderr=lambda s: kinds.append("err"))
    r = ei.value
    assert len(opened) == 1 and opened[0] is not None
    assert r.exit_code == 4
    assert r.stdout == "a" * 5_000_000
    assert r.stderr == "first\nlast\n"
    assert kinds[0] == "err" and kinds[-1] == "err" and set(kinds[1:-1]) == {"out"}, kinds


def test_the_channel_is_the_guest_connection_itself(
        shared_sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """hostd's relay hands the guest connection over instead of copying it."""
    peers: list[str] = []
    real = output_channel.OutputChannel.open

    async def spy(info: Any) -> Any:
        ch = await real(info)
        assert ch is not None
        peers.append(ch._sock.getpeername())
        return ch

    monkeypatch.setattr(output_channel.OutputChannel, "open", spy)
    assert shared_sandbox.commands.run("head -c 3000000 /dev/zero | tr '\\0' c").stdout == (
        "c" * 3_000_000)
    assert len(peers) == 1
    assert peers[0].endswith("/v.sock"), peers  # vhost-device-vsock's socket, not the relay


def test_lines_on_a_channel_arrive_one_by_one(shared_sandbox: Sandbox,
                                              opened: list[Any]) -> None:
    """Interactive output after the move to a channel: each line must reach the
    client on its own. The command prints the next line only once the test has
    seen the previous one (a file it writes), so a line held back for more
    output stalls the command until it gives up (exit 9) instead of passing."""
    shared_sandbox.commands.run("rm -f /tmp/ack*")
    seen = threading.Condition()
    text: list[str] = []

    def on_stdout(s: str) -> None:
        with seen:
            text.append(s)
            seen.notify_all()

    def printed(line: str) -> bool:
        return line in "".join(text)

    def ack() -> None:
        for i in range(1, 6):
            with seen:
                seen.wait_for(functools.partial(printed, f"line{i}\n"), timeout=120)
            shared_sandbox.files.write(f"/tmp/ack{i}", "")

    acker = threading.Thread(target=ack, daemon=True)
    acker.start()
    cmd = ("head -c 200000 /dev/zero | tr '\\0' x; echo; for i in 1 2 3 4 5; do echo line$i;"
           " n=0; while [ ! -e /tmp/ack$i ]; do sleep 0.1; n=$((n+1));"
           " [ $n -le 600 ] || exit 9; done; done")
    r = shared_sandbox.commands.run(cmd, on_stdout=on_stdout, timeout=600)
    acker.join(10)
    assert len(opened) == 1, "the output never moved to a channel"
    assert r.stdout == "x" * 200_000 + "\n" + "".join(f"line{i}\n" for i in range(1, 6))


def test_small_output_stays_on_the_stream(shared_sandbox: Sandbox, opened: list[Any]) -> None:
    assert shared_sandbox.commands.run("echo hi").stdout == "hi\n"
    assert opened == []


def test_connect_to_a_running_command_streams_over_a_channel(
        shared_sandbox: Sandbox, opened: list[Any]) -> None:
    cmd = "echo early; sleep 1; head -c 3000000 /dev/zero | tr '\\0' b; sleep 0.5; echo done"
    h = shared_sandbox.commands.run(cmd, background=True)
    h.disconnect()  # the process goes on; connect replays what it kept
    again = shared_sandbox.commands.connect(h.pid)
    assert again.wait().stdout == "early\n" + "b" * 3_000_000 + "done\n"
    assert len(opened) == 1


def test_timeout_and_kill_of_a_command_on_a_channel(
        shared_sandbox: Sandbox, opened: list[Any]) -> None:
    cmd = "head -c 2000000 /dev/zero; sleep 600"
    with pytest.raises(TimeoutException):
        shared_sandbox.commands.run(cmd, timeout=3)
    assert len(opened) == 1
    h = shared_sandbox.commands.run(cmd, background=True, timeout=0)
    for _ in range(600):  # all of it, so the kill cuts nothing short
        if len(h.stdout) == 2_000_000:
            break
        threading.Event().wait(0.1)
    assert len(opened) == 2, "the output never moved to a channel"
    assert h.kill() is True
    with pytest.raises(CommandExitException) as ei:
        h.wait()
    assert ei.value.exit_code == -1 and len(ei.value.stdout) == 2_000_000


HANG = 60.0  # a call not ended this long after its sandbox counts as hung


def _stream_in_thread(sbx: Sandbox, opened: list[Any]) -> tuple[threading.Event, list[Any]]:
    """A never-ending stream of output, running until its call ends; waits until
    its output moved to a channel."""
    done = threading.Event()
    errors: list[Any] = []
    before = len(opened)

    def go() -> None:
        try:
            sbx.commands.run("while :; do head -c 1000000 /dev/zero; sleep 0.2; done", timeout=0,
                             on_stdout=lambda s: None)
        except BaseException as e:  # recorded for the test
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=go, daemon=True).start()
    for _ in range(600):
        if len(opened) > before or done.is_set():
            break
        done.wait(0.1)
    assert len(opened) > before, "the output never moved to a channel"
    return done, errors


def test_calls_on_a_channel_end_when_the_sandbox_pauses_or_is_killed(
        hostd: Any, opened: list[Any]) -> None:
    sbx = Sandbox.create(timeout=1800)
    try:
        # A pause leaves the channel's connection open on a frozen guest.
        done, errors = _stream_in_thread(sbx, opened)
        sbx.beta_pause()
        assert done.wait(HANG), "the call hung after its sandbox paused"
        assert isinstance(errors[0], SandboxEndedException) and errors[0].reason == "paused"
        back = Sandbox.connect(sbx.sandbox_id)
        done, errors = _stream_in_thread(back, opened)
        back.kill()
        assert done.wait(HANG), "the call hung after its sandbox was killed"
        assert isinstance(errors[0], SandboxEndedException) and errors[0].reason == "killed"
    finally:
        sbx.kill()


def _guestd_hwm_kib(sbx: Sandbox) -> int:
    # The command's parent is guestd.
    out = sbx.commands.run("grep VmHWM /proc/$PPID/status").stdout
    return int(out.split()[1])


def test_guestd_memory_stays_bounded_on_a_large_stream(
        shared_sandbox: Sandbox, opened: list[Any]) -> None:
    size = 128 << 20  # 128x guestd's output buffer; 1 GiB: benchmarks/bench_commands.py
    cmd = f"head -c {size} /dev/zero"
    shared_sandbox.commands.run(f"head -c {32 << 20} /dev/zero", timeout=600)  # warm up
    base = _guestd_hwm_kib(shared_sandbox)
    n = 0

    def count(s: str) -> None:
        nonlocal n
        n += len(s)

    h = shared_sandbox.commands.run(cmd, background=True, timeout=600, on_stdout=count)
    h.wait()
    grown_mib = (_guestd_hwm_kib(shared_sandbox) - base) / 1024
    print(f"guestd VmHWM +{grown_mib:.1f} MiB for {size >> 20} MiB of stdout")
    assert n == size
    assert len(opened) == 2
    assert grown_mib < 64, f"guestd peak RSS grew by {grown_mib:.1f} MiB"

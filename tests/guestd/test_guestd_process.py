"""Process service against a real guestd: output, exit, signals, stdin, pty, reconnect."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import grpc
import pytest
from guestd_harness import Guestd, argv, collect, quiet_home, shell

from moru_proto.guest.v1 import process_pb2 as pb


def sel(pid: int = 0, tag: str = "") -> pb.ProcessSelector:
    return pb.ProcessSelector(tag=tag) if tag else pb.ProcessSelector(pid=pid)


def next_data(it: Iterator[pb.ProcessEvent]) -> pb.DataEvent:
    """The next output event, skipping keepalives."""
    for ev in it:
        if ev.HasField("data"):
            return ev.data
    raise AssertionError("stream ended before output")


def test_stdout_and_stderr_apart_and_in_order(guestd: Guestd) -> None:
    cmd = "for i in 1 2 3; do echo out$i; sleep 0.05; echo err$i >&2; sleep 0.05; done"
    r = collect(guestd.process.Start(shell(cmd)))
    assert r.stdout == b"out1\nout2\nout3\n"
    assert r.stderr == b"err1\nerr2\nerr3\n"
    assert [k for k, _ in r.order] == ["stdout", "stderr"] * 3
    assert r.end is not None and r.end.exited and r.end.exit_code == 0


@pytest.mark.parametrize("code", [0, 1, 3, 255])
def test_exit_codes(guestd: Guestd, code: int) -> None:
    r = collect(guestd.process.Start(argv("sh", "-c", f"exit {code}")))
    assert r.end is not None
    assert (r.end.exited, r.end.exit_code, r.end.signal) == (True, code, 0)
    assert r.end.status == f"exit status {code}"


def test_killed_by_signal_is_reported(guestd: Guestd) -> None:
    r = collect(guestd.process.Start(shell("kill -KILL $$")))
    assert r.end is not None and not r.end.exited
    assert (r.end.exit_code, r.end.signal, r.end.status) == (-1, 9, "signal: SIGKILL")


def _pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].split()[0] != "Z":
                    alive.append(pid)
        except FileNotFoundError:
            pass
    return alive


def test_sigusr1_reaches_the_whole_process_group(guestd: Guestd) -> None:
    stream = guestd.process.Start(shell("sleep 30 & echo $!; sleep 30 & echo $!; wait"))
    it = iter(stream)
    pid = next(it).start.pid
    out = b""
    while out.count(b"\n") < 2:
        out += next_data(it).stdout
    children = [int(x) for x in out.split()]
    assert _pids_alive(children) == children
    guestd.process.SendSignal(pb.SendSignalRequest(process=sel(pid), signal_name="usr1"))
    r = collect(it)
    assert r.end is not None and r.end.signal == signal.SIGUSR1
    deadline = time.monotonic() + 5
    while _pids_alive(children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pids_alive(children) == []


@pytest.mark.parametrize(
    "how", [{"signal": 15}, {"signal_name": "SIGTERM"}, {"signal_name": "term"}])
def test_signal_by_number_or_name(guestd: Guestd, how: dict[str, object]) -> None:
    stream = guestd.process.Start(argv("sleep", "30"))
    it = iter(stream)
    pid = next(it).start.pid
    guestd.process.SendSignal(pb.SendSignalRequest(process=sel(pid), **how))  # type: ignore[arg-type]
    r = collect(it)
    assert r.end is not None and r.end.signal == 15


def test_trapped_signal_is_delivered_not_fatal(guestd: Guestd) -> None:
    stream = guestd.process.Start(shell(
        "trap 'echo got-hup; exit 7' HUP; echo ready; while :; do sleep 0.05; done"))
    it = iter(stream)
    pid = next(it).start.pid
    assert next_data(it).stdout == b"ready\n"
    guestd.process.SendSignal(pb.SendSignalRequest(process=sel(pid), signal=1))
    r = collect(it)
    assert r.stdout == b"got-hup\n" and r.end is not None and r.end.exit_code == 7, (r, r.end)


def test_stdin_send_and_close(guestd: Guestd) -> None:
    stream = guestd.process.Start(argv("cat", stdin=True))
    it = iter(stream)
    pid = next(it).start.pid
    guestd.process.SendInput(pb.SendInputRequest(process=sel(pid), data=b"hello "))
    guestd.process.SendInput(pb.SendInputRequest(process=sel(pid), data=b"world\n"))
    guestd.process.CloseStdin(pb.CloseStdinRequest(process=sel(pid)))
    r = collect(it)
    assert r.stdout == b"hello world\n" and r.end is not None and r.end.exit_code == 0
    with pytest.raises(grpc.RpcError) as e:
        guestd.process.SendInput(pb.SendInputRequest(process=sel(pid), data=b"late"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_stream_input_with_close(guestd: Guestd) -> None:
    stream = guestd.process.Start(argv("wc", "-c", stdin=True, tag="wc-stream"))
    it = iter(stream)
    next(it)
    chunk = b"x" * 100_000

    def reqs() -> Iterator[pb.StreamInputRequest]:
        yield pb.StreamInputRequest(process=sel(tag="wc-stream"), data=chunk)
        for _ in range(9):
            yield pb.StreamInputRequest(data=chunk)
        yield pb.StreamInputRequest(close=True)

    resp = guestd.process.StreamInput(reqs())
    assert resp.bytes_written == 1_000_000
    r = collect(it)
    assert r.stdout.strip() == b"1000000"


def test_input_errors(guestd: Guestd) -> None:
    stream = guestd.process.Start(argv("sleep", "30"))
    it = iter(stream)
    pid = next(it).start.pid
    try:
        with pytest.raises(grpc.RpcError) as e:
            guestd.process.SendInput(pb.SendInputRequest(process=sel(pid), data=b"x"))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "without stdin" in (e.value.details() or "")
        with pytest.raises(grpc.RpcError) as e:
            guestd.process.CloseStdin(pb.CloseStdinRequest(process=sel(pid)))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as e:
            guestd.process.Resize(
                pb.ResizeRequest(process=sel(pid), size=pb.PtySize(cols=80, rows=24)))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        guestd.process.SendSignal(pb.SendSignalRequest(process=sel(pid), signal=9))
        collect(it)
    s2 = guestd.process.Start(argv("cat", stdin=True))
    it2 = iter(s2)
    pid2 = next(it2).start.pid
    guestd.process.CloseStdin(pb.CloseStdinRequest(process=sel(pid2)))
    collect(it2)
    with pytest.raises(grpc.RpcError) as e:
        guestd.process.CloseStdin(pb.CloseStdinRequest(process=sel(pid2)))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_pty_size_and_resize(guestd: Guestd) -> None:
    stream = guestd.process.Start(shell(
        "echo pid=$$; stty size; tty >/dev/null && echo is-tty; read line; stty size",
        pty=pb.PtySize(cols=100, rows=30), stdin=True))
    it = iter(stream)
    pid = next(it).start.pid
    out = b""
    while b"is-tty" not in out:
        out += next_data(it).pty
    assert b"30 100" in out
    assert f"pid={pid}".encode() in out  # the reported pid is the command itself
    guestd.process.Resize(pb.ResizeRequest(process=sel(pid), size=pb.PtySize(cols=120, rows=40)))
    guestd.process.SendInput(pb.SendInputRequest(process=sel(pid), data=b"go\n"))
    r = collect(it)
    assert b"40 120" in r.pty
    assert r.end is not None and r.end.exit_code == 0


def test_pty_processes_start_reliably_with_a_controlling_terminal(guestd: Guestd) -> None:
    for _ in range(10):
        r = collect(guestd.process.Start(argv(
            "sh", "-c", "ps -o tty= -p $$", pty=pb.PtySize(cols=80, rows=24))))
        assert r.end is not None and r.end.exit_code == 0, r
        assert r.pty.strip().startswith(b"pts/"), r.pty


def test_disconnect_then_connect_by_pid_and_tag_replays_everything(guestd: Guestd) -> None:
    cmd = "for i in $(seq 1 20); do echo line$i; echo e$i >&2; sleep 0.02; done"
    stream = guestd.process.Start(shell(cmd, tag="replay-me"))
    it = iter(stream)
    pid = next(it).start.pid
    next(it)
    stream.cancel()  # type: ignore[no-untyped-call]
    expected = "".join(f"line{i}\n" for i in range(1, 21)).encode()
    by_pid = collect(guestd.process.Connect(pb.ConnectRequest(process=sel(pid))))
    by_tag = collect(guestd.process.Connect(pb.ConnectRequest(process=sel(tag="replay-me"))))
    for r in (by_pid, by_tag):
        assert r.pid == pid
        assert r.stdout == expected
        assert r.stderr == "".join(f"e{i}\n" for i in range(1, 21)).encode()
        assert r.dropped == {}
        assert r.end is not None and r.end.exit_code == 0


def test_connect_to_running_process_follows_live(guestd: Guestd) -> None:
    stream = guestd.process.Start(shell("echo a; sleep 0.5; echo b", tag="live"))
    it = iter(stream)
    next(it)
    stream.cancel()  # type: ignore[no-untyped-call]
    r = collect(guestd.process.Connect(pb.ConnectRequest(process=sel(tag="live"))))
    assert r.stdout == b"a\nb\n"


def test_overflow_reports_dropped_bytes(small_buffer_guestd: Guestd) -> None:
    g = small_buffer_guestd
    stream = g.process.Start(argv("head", "-c", "1000000", "/dev/zero"))
    it = iter(stream)
    pid = next(it).start.pid
    stream.cancel()  # type: ignore[no-untyped-call]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        infos = g.process.List(pb.ListRequest(include_ended=True)).processes
        if any(p.pid == pid and not p.running for p in infos):
            break
        time.sleep(0.05)
    r = collect(g.process.Connect(pb.ConnectRequest(process=sel(pid))))
    assert r.dropped.get("stdout", 0) > 0
    assert r.dropped["stdout"] + len(r.stdout) == 1_000_000
    assert 65536 <= len(r.stdout) <= 65536 * 5 // 4  # capacity, plus at most one chunk


def test_single_slow_reader_gets_backpressure_not_drops(small_buffer_guestd: Guestd) -> None:
    g = small_buffer_guestd
    total = 0
    dropped = 0
    for ev in g.process.Start(argv("head", "-c", "2000000", "/dev/zero")):
        if ev.HasField("data"):
            total += len(ev.data.stdout)
            time.sleep(0.002)
        elif ev.HasField("dropped"):
            dropped += ev.dropped.stdout_bytes
    assert (total, dropped) == (2_000_000, 0)


def test_env_cwd_defaults_and_user(fresh_guestd: Guestd) -> None:
    g = fresh_guestd
    r = collect(g.process.Start(argv("sh", "-c", 'echo "$PWD|$HOME|$USER|$LOGNAME|$(id -u)"')))
    assert r.stdout == b"/root|/root|root|root|0\n"
    r = collect(g.process.Start(argv("pwd", cwd="/tmp")))
    assert r.stdout == b"/tmp\n"
    r = collect(g.process.Start(argv(
        "sh", "-c", 'echo "$(id -un)|$(id -u)|$(id -g)|$USER|$HOME|$PWD"', user="nobody")))
    assert r.stdout == b"nobody|65534|65534|nobody|/nonexistent|/\n", r
    r = collect(g.process.Start(argv("id", "-un", user="65534")))
    assert r.stdout == b"nobody\n"


def test_env_precedence_image_init_process(fresh_guestd: Guestd) -> None:
    from moru_proto.guest.v1 import guest_pb2

    g = fresh_guestd
    g.guest.Init(guest_pb2.InitRequest(env={"SHADOWED": "init", "FROM_INIT": "init",
                                            "BOTH": "init", "HOME": quiet_home(g)}))
    r = collect(g.process.Start(shell(
        'echo "$MORU_IMAGE_VAR|$SHADOWED|$FROM_INIT|$BOTH"', env={"BOTH": "process"})))
    assert r.stdout == b"image|init|init|process\n"


def test_timeout_kills_the_group_and_says_so(guestd: Guestd) -> None:
    t0 = time.monotonic()
    r = collect(guestd.process.Start(shell("sleep 30 & sleep 30", timeout_seconds=0.5)))
    assert time.monotonic() - t0 < 5
    assert r.end is not None and r.end.timed_out and r.end.signal == 9


def test_keepalive_on_quiet_stream_and_long_command_survives(guestd: Guestd) -> None:
    r = collect(guestd.process.Start(argv("sleep", "1.6")))
    assert r.keepalives >= 2
    assert r.end is not None and r.end.exit_code == 0


def test_command_starting_a_daemon_still_ends(guestd: Guestd) -> None:
    t0 = time.monotonic()
    r = collect(guestd.process.Start(shell("(sleep 30 & echo $!) ; echo started")))
    daemon = int(r.stdout.split()[0])
    os.kill(daemon, signal.SIGKILL)  # ours to clean up: it outlived its group's leader
    assert r.stdout.endswith(b"\nstarted\n") and time.monotonic() - t0 < 5


def test_list_and_tags(guestd: Guestd) -> None:
    stream = guestd.process.Start(argv("sleep", "30", tag="listed"))
    it = iter(stream)
    pid = next(it).start.pid
    try:
        procs = guestd.process.List(pb.ListRequest()).processes
        mine = [p for p in procs if p.pid == pid]
        assert mine and mine[0].tag == "listed" and mine[0].running
        assert list(mine[0].config.argv) == ["sleep", "30"]
        with pytest.raises(grpc.RpcError) as e:
            collect(guestd.process.Start(argv("true", tag="listed")))
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "listed" in (e.value.details() or "")
    finally:
        guestd.process.SendSignal(pb.SendSignalRequest(process=sel(pid), signal=9))
        collect(it)
    assert not any(p.pid == pid for p in guestd.process.List(pb.ListRequest()).processes)
    ended = guestd.process.List(pb.ListRequest(include_ended=True)).processes
    assert any(p.pid == pid and not p.running and p.end.signal == 9 for p in ended)


def _code(fn, *a) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        res = fn(*a)
        if hasattr(res, "__iter__"):
            collect(res)
    return e.value.code(), e.value.details() or ""


@pytest.mark.parametrize(("req", "code", "word"), [
    (pb.StartRequest(), grpc.StatusCode.INVALID_ARGUMENT, "config"),
    (pb.StartRequest(config=pb.ProcessConfig(argv=["true"], shell="true")),
     grpc.StatusCode.INVALID_ARGUMENT, "config"),
    (argv("true", cwd="relative/dir"), grpc.StatusCode.INVALID_ARGUMENT, "cwd"),
    (argv("true", cwd="/no/such/dir"), grpc.StatusCode.NOT_FOUND, "/no/such/dir"),
    (argv("true", user="no-such-user"), grpc.StatusCode.NOT_FOUND, "no-such-user"),
    (argv("no-such-command-xyz"), grpc.StatusCode.NOT_FOUND, "no-such-command-xyz"),
    (argv("/etc/passwd"), grpc.StatusCode.PERMISSION_DENIED, "/etc/passwd"),
    (argv("true", pty=pb.PtySize(cols=0, rows=24)), grpc.StatusCode.INVALID_ARGUMENT, "pty"),
    (argv("true", timeout_seconds=-1), grpc.StatusCode.INVALID_ARGUMENT, "timeout"),
])
def test_start_errors(guestd: Guestd, req: pb.StartRequest, code: grpc.StatusCode,
                      word: str) -> None:
    got, msg = _code(guestd.process.Start, req)
    assert got == code and word in msg, msg


def test_selector_and_signal_errors(guestd: Guestd) -> None:
    p = guestd.process
    for fn, req in [
        (p.Connect, pb.ConnectRequest(process=sel(999_999_999))),
        (p.SendSignal, pb.SendSignalRequest(process=sel(999_999_999), signal=15)),
        (p.SendInput, pb.SendInputRequest(process=sel(tag="no-such-tag"), data=b"x")),
        (p.CloseStdin, pb.CloseStdinRequest(process=sel(tag="no-such-tag"))),
        (p.Resize, pb.ResizeRequest(process=sel(tag="no-such-tag"),
                                    size=pb.PtySize(cols=1, rows=1))),
    ]:
        code, msg = _code(fn, req)
        assert code == grpc.StatusCode.NOT_FOUND and ("pid" in msg or "tag" in msg), msg
    code, _ = _code(p.Connect, pb.ConnectRequest())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    stream = p.Start(argv("sleep", "30", pty=pb.PtySize(cols=80, rows=24)))
    it = iter(stream)
    pid = next(it).start.pid
    try:
        for req in [pb.SendSignalRequest(process=sel(pid), signal_name="SIGNOPE"),
                    pb.SendSignalRequest(process=sel(pid), signal=999),
                    pb.SendSignalRequest(process=sel(pid))]:
            code, msg = _code(p.SendSignal, req)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "signal" in msg, msg
        code, msg = _code(p.Resize, pb.ResizeRequest(process=sel(pid), size=pb.PtySize(cols=5)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "size" in msg
    finally:
        p.SendSignal(pb.SendSignalRequest(process=sel(pid), signal=9))
        collect(it)
    code, msg = _code(p.SendSignal, pb.SendSignalRequest(process=sel(pid), signal=15))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "ended" in msg


def test_no_zombies_left(guestd: Guestd) -> None:
    for _ in range(5):
        collect(guestd.process.Start(argv("true")))
    kids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(") ", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == guestd.pid and fields[0] == "Z":
                kids.append(pid)
    assert kids == []


def test_child_gets_only_its_stdio_default_signals_and_own_session(guestd: Guestd) -> None:
    # posix_spawn does not close fds the way Popen's close_fds did: guestd's
    # own fds must all be close-on-exec. Python ignores SIGPIPE; a child must not.
    r = collect(guestd.process.Start(argv("ls", "/proc/self/fd")))
    assert sorted(r.stdout.split()) == [b"0", b"1", b"2", b"3"], r  # 3: ls's own listing
    r = collect(guestd.process.Start(argv("grep", "SigIgn", "/proc/self/status")))
    ignored = int(r.stdout.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)), r.stdout
    r = collect(guestd.process.Start(shell("yes | head -c 4; echo \" ${PIPESTATUS[0]}\"")))
    assert r.stdout == b"y\ny\n 141\n", r  # yes was killed by SIGPIPE (128 + 13)
    r = collect(guestd.process.Start(argv("sh", "-c", "ps -o sid= -p $$; echo $$")))
    sid, pid = r.stdout.split()
    assert sid == pid  # its own session (and so process group)
    cwd = os.readlink(f"/proc/{guestd.pid}/cwd")
    collect(guestd.process.Start(argv("true", cwd="/tmp")))
    assert os.readlink(f"/proc/{guestd.pid}/cwd") == cwd  # guestd's own cwd is restored

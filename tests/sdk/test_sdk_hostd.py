"""The SDK against a real hostd and real microVMs: the issue's own test list.

Sandboxes are reused where tests are independent (`shared_sandbox`); VM boots
are slow under TCG.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hostd_framework import Hostd, wait_for

from moru import AsyncSandbox, Sandbox
from moru.exceptions import (
    AuthenticationException,
    CommandExitException,
    ConnectionException,
    FailedPreconditionException,
    InvalidArgumentException,
    NotEnoughSpaceException,
    NotFoundException,
    RateLimitException,
    SandboxException,
    TimeoutException,
)

pytestmark = pytest.mark.vm


def test_list_three_sandboxes_with_metadata_filters(hostd: Hostd) -> None:
    tag = f"t{os.getpid()}"
    made = [
        Sandbox.create(metadata={"suite": tag, "role": "a", "n": "1"}),
        Sandbox.create(metadata={"suite": tag, "role": "b", "n": "2"}),
        Sandbox.create(metadata={"suite": tag, "role": "a", "n": "3"}),
    ]
    try:
        ids = [s.sandbox_id for s in made]
        assert sorted(i.sandbox_id for i in Sandbox.list(metadata={"suite": tag})) == sorted(ids)
        role_a = {i.sandbox_id for i in Sandbox.list(metadata={"suite": tag, "role": "a"})}
        assert role_a == {ids[0], ids[2]}
        assert [i.sandbox_id for i in Sandbox.list(metadata={"suite": tag, "n": "2"})] == [ids[1]]
        assert list(Sandbox.list(metadata={"suite": tag, "role": "zzz"})) == []
        # Every page is iterated: one sandbox per page.
        paged = [i.sandbox_id for i in Sandbox.list(metadata={"suite": tag}, page_size=1)]
        assert sorted(paged) == sorted(ids)
        # Static kill and set_timeout, by id.
        Sandbox.set_timeout(ids[1], 1234)
        info = Sandbox.get_info(ids[1])
        assert 1200 < (info.end_at - info.started_at).total_seconds() < 1300
        assert Sandbox.kill(ids[1]) is True
        assert Sandbox.kill(ids[1]) is False
        left = {i.sandbox_id for i in Sandbox.list(metadata={"suite": tag})}
        assert left == {ids[0], ids[2]}
    finally:
        for s in made:
            s.kill()


def test_connect_from_a_second_process(shared_sandbox: Sandbox, tmp_path: Any) -> None:
    session = tmp_path / "session.json"
    session.write_text(json.dumps({"sandbox_id": shared_sandbox.sandbox_id}))
    shared_sandbox.files.write("/tmp/from-first.txt", "written by process 1")
    code = (
        "import json, sys\n"
        "from moru import Sandbox\n"
        f"data = json.load(open({str(session)!r}))\n"
        "sbx = Sandbox.connect(data['sandbox_id'])\n"
        "print(sbx.files.read('/tmp/from-first.txt'))\n"
        "print(sbx.commands.run('echo from process 2').stdout, end='')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "written by process 1\nfrom process 2\n"


def test_on_stdout_callbacks_in_order(shared_sandbox: Sandbox) -> None:
    got: list[str] = []
    errs: list[str] = []
    r = shared_sandbox.commands.run(
        "for i in $(seq 1 50); do echo line$i; echo err$i >&2; sleep 0.01; done",
        on_stdout=got.append,
        on_stderr=errs.append,
    )
    assert "".join(got) == "".join(f"line{i}\n" for i in range(1, 51)) == r.stdout
    assert "".join(errs) == "".join(f"err{i}\n" for i in range(1, 51)) == r.stderr


def test_background_command_wait_and_kill(shared_sandbox: Sandbox) -> None:
    h = shared_sandbox.commands.run("sleep 0.5; echo done", background=True)
    assert h.pid > 0
    assert h.wait().stdout == "done\n"

    seen: list[str] = []
    h = shared_sandbox.commands.run(
        "echo started; sleep 600", background=True, timeout=0, on_stdout=seen.append
    )
    wait_for(lambda: seen == ["started\n"], 30, 0.05, "first output")
    assert h.pid in [p.pid for p in shared_sandbox.commands.list()]
    assert h.kill() is True
    with pytest.raises(CommandExitException) as ei:
        h.wait()
    assert ei.value.exit_code == -1 and "SIGKILL" in (ei.value.error or "").upper()
    assert h.pid not in [p.pid for p in shared_sandbox.commands.list()]
    assert shared_sandbox.commands.kill(h.pid) is False


def test_background_iteration_stdin_and_reconnect(shared_sandbox: Sandbox) -> None:
    h = shared_sandbox.commands.run("cat", background=True, stdin=True)
    h.send_stdin("hello\n")
    h.close_stdin()
    assert [c for c in h] == [("hello\n", None, None)]
    h = shared_sandbox.commands.run("echo one; sleep 1; echo two", background=True)
    h.disconnect()
    again = shared_sandbox.commands.connect(h.pid)
    assert again.wait().stdout == "one\ntwo\n"


def test_command_timeout_is_the_commands_own(shared_sandbox: Sandbox) -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutException, match="command's timeout, not the sandbox's"):
        shared_sandbox.commands.run("sleep 30", timeout=1)
    assert time.monotonic() - t0 < 15
    assert shared_sandbox.is_running()
    # No client-side deadline on a long command's stream.
    assert shared_sandbox.commands.run("sleep 3; echo ok", timeout=0).stdout == "ok\n"


def test_50mb_binary_write_and_read_sha256(shared_sandbox: Sandbox, tmp_path: Any) -> None:
    src = tmp_path / "blob"
    digest = hashlib.sha256()
    with src.open("wb") as f:
        for _ in range(50):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            f.write(chunk)
    with src.open("rb") as f:  # a file object: streamed, never whole in memory
        info = shared_sandbox.files.write("/tmp/blob.bin", f)
    assert info.size == 50 << 20
    back = hashlib.sha256()
    n = 0
    for piece in shared_sandbox.files.read("/tmp/blob.bin", format="stream"):
        back.update(piece)
        n += len(piece)
    assert n == 50 << 20 and back.hexdigest() == digest.hexdigest()
    whole = shared_sandbox.files.read("/tmp/blob.bin", format="bytes")
    assert hashlib.sha256(whole).hexdigest() == digest.hexdigest()
    inside = shared_sandbox.commands.run("sha256sum /tmp/blob.bin").stdout.split()[0]
    assert inside == digest.hexdigest()
    shared_sandbox.files.remove("/tmp/blob.bin")


def test_context_manager_kills_on_exception(hostd: Hostd) -> None:
    seen: dict[str, Sandbox] = {}
    with pytest.raises(ZeroDivisionError), Sandbox.create() as sandbox:
        seen["s"] = sandbox
        _ = 1 / 0
    assert not seen["s"].is_running()
    assert seen["s"].sandbox_id not in {i.sandbox_id for i in Sandbox.list()}


@pytest.fixture(scope="module")
def small_hostd() -> Iterator[Hostd]:
    """A second hostd whose memory budget fits no VM and that has no networking."""
    h = Hostd(memory_budget_mb=64)
    try:
        h.start(timeout=120)
        yield h
    finally:
        left = h.close()
        assert not left, left


def test_each_exception_from_a_real_failure(
    hostd: Hostd, shared_sandbox: Sandbox, small_hostd: Hostd
) -> None:
    with pytest.raises(NotFoundException, match="sbx_doesnotexist00000000"):
        Sandbox.connect("sbx_doesnotexist00000000")
    with pytest.raises(NotFoundException):
        Sandbox.create("no-such-template")
    with pytest.raises(NotFoundException, match="/no/such/file"):
        shared_sandbox.files.read("/no/such/file")
    with pytest.raises(AuthenticationException, match="MORU_API_KEY"):
        list(Sandbox.list(api_key="wrong-key"))
    with pytest.raises(InvalidArgumentException, match="timeout"):
        Sandbox.create(timeout=-5)
    with pytest.raises(InvalidArgumentException):
        shared_sandbox.files.read("relative/path")
    with pytest.raises(TimeoutException):
        shared_sandbox.commands.run("sleep 10", timeout=0.5)
    with pytest.raises(CommandExitException) as ei:
        shared_sandbox.commands.run("echo out; echo bad >&2; exit 7")
    assert (ei.value.exit_code, ei.value.stdout, ei.value.stderr) == (7, "out\n", "bad\n")
    # A 1 MiB tmpfs in the guest makes a 2 MiB upload hit ENOSPC.
    shared_sandbox.commands.run("mkdir -p /mnt/tiny && mount -t tmpfs -o size=1m tmpfs /mnt/tiny")
    try:
        with pytest.raises(NotEnoughSpaceException):
            shared_sandbox.files.write("/mnt/tiny/big", b"x" * (2 << 20))
    finally:
        shared_sandbox.commands.run("umount /mnt/tiny")
    h = shared_sandbox.commands.run("sleep 60", background=True)
    try:
        with pytest.raises(FailedPreconditionException):
            h.send_stdin("no stdin here")  # started without stdin=True
    finally:
        h.kill()
    small = f"unix:{small_hostd.sock}"
    with pytest.raises(RateLimitException, match="memory"):
        Sandbox.create(hostd=small, api_key="")
    with pytest.raises(FailedPreconditionException, match="network"):
        Sandbox.create(allow_internet_access=False, hostd=small, api_key="")
    with pytest.raises(ConnectionException, match="moru-hostd serve"):
        Sandbox.create(hostd="unix:/tmp/moru-no-such-hostd.sock")
    for exc in (NotFoundException, TimeoutException, CommandExitException, RateLimitException):
        assert issubclass(exc, SandboxException)


def test_wrong_access_token_is_refused(shared_sandbox: Sandbox) -> None:
    info = shared_sandbox.get_info()
    forged = Sandbox(AsyncSandbox(info, "forged-token", shared_sandbox.connection_config))
    with pytest.raises(AuthenticationException):
        forged.commands.run("true")


def test_files_api(shared_sandbox: Sandbox) -> None:
    f = shared_sandbox.files
    base = f"/tmp/files-{os.getpid()}"
    assert f.make_dir(base) is True and f.make_dir(base) is False
    events: list[Any] = []
    watch = f.watch_dir(base, on_event=events.append)
    try:
        f.write(f"{base}/a.txt", "hello")
        f.write(f"{base}/gen.txt", (s for s in ["x" * 10, b"y" * 10]))
        wait_for(lambda: any(e.name == "a.txt" for e in events), 30, 0.05, "watch event")
    finally:
        watch.stop()
    assert f.read(f"{base}/gen.txt") == "x" * 10 + "y" * 10
    assert f.exists(f"{base}/a.txt") and not f.exists(f"{base}/nope")
    assert f.get_info(f"{base}/a.txt").size == 5
    moved = f.rename(f"{base}/a.txt", f"{base}/b.txt")
    assert moved.path == f"{base}/b.txt"
    assert sorted(e.name for e in f.list(base)) == ["b.txt", "gen.txt"]
    f.remove(base)
    assert not f.exists(base)


def test_async_sandbox_same_api(shared_sandbox: Sandbox) -> None:
    import asyncio

    async def main() -> None:
        sbx = await AsyncSandbox.connect(shared_sandbox.sandbox_id)
        got: list[str] = []
        r = await sbx.commands.run("echo a; echo b", on_stdout=got.append)
        assert r.stdout == "a\nb\n" and "".join(got) == r.stdout
        h = await sbx.commands.run("echo bg", background=True)
        assert [c async for c in h] == [("bg\n", None, None)]
        await sbx.files.write("/tmp/async.txt", b"async")
        assert await sbx.files.read("/tmp/async.txt") == "async"
        assert await sbx.is_running()
        ids = [i.sandbox_id async for i in AsyncSandbox.list(metadata={"suite": "sdk-shared"})]
        assert ids == [sbx.sandbox_id]

    asyncio.run(main())


def test_keep_alive_threads_share_the_loop(shared_sandbox: Sandbox) -> None:
    """The sync API is safe from several threads at once."""
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            assert shared_sandbox.commands.run(f"echo {i}").stdout == f"{i}\n"
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors

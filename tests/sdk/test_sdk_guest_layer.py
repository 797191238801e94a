"""The SDK's guest layer (commands, files) against a REAL bare guestd.

No hostd and no VM: guestd ignores `sandbox-id`, so `Sandbox._for_guest(address)`
sends the same calls hostd would forward. The guestd runs on this machine as
the test user, so paths are scratch dirs under /tmp.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from moru import AsyncSandbox, Sandbox
from moru.exceptions import (
    CommandExitException,
    ConnectionException,
    FailedPreconditionException,
    InvalidArgumentException,
    NotFoundException,
    TimeoutException,
)


@pytest.fixture
def sbx(guestd_address: str) -> Sandbox:
    return Sandbox._for_guest(guestd_address)


def test_run_collects_output_and_exit_code(sbx: Sandbox) -> None:
    r = sbx.commands.run("echo out; echo err >&2")
    assert (r.stdout, r.stderr, r.exit_code, r.error) == ("out\n", "err\n", 0, None)


def test_non_zero_exit_raises_with_the_result(sbx: Sandbox) -> None:
    with pytest.raises(CommandExitException) as ei:
        sbx.commands.run("echo partial; exit 3")
    assert ei.value.exit_code == 3 and ei.value.stdout == "partial\n"
    assert ei.value.result.exit_code == 3


def test_envs_cwd(sbx: Sandbox, scratch: str) -> None:
    r = sbx.commands.run("echo $A-$B; pwd", envs={"A": "1", "B": "two"}, cwd=scratch)
    assert r.stdout == f"1-two\n{scratch}\n"


def test_on_stdout_in_order(sbx: Sandbox) -> None:
    got: list[str] = []
    r = sbx.commands.run("for i in $(seq 1 20); do echo $i; sleep 0.02; done", on_stdout=got.append)
    assert "".join(got) == r.stdout == "".join(f"{i}\n" for i in range(1, 21))


def test_command_timeout_kills_only_the_command(sbx: Sandbox) -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutException, match="not the sandbox's"):
        sbx.commands.run("sleep 20", timeout=1)
    assert time.monotonic() - t0 < 10
    assert sbx.commands.run("echo alive").stdout == "alive\n"


def test_no_client_deadline_on_streams(guestd_address: str) -> None:
    """A command longer than request_timeout still completes (E2B's bug)."""
    from dataclasses import replace

    from moru._async_sandbox import AsyncSandbox as A
    from moru._guest import GuestTarget

    core = A._for_guest(guestd_address)
    core._target = GuestTarget(replace(core._config, request_timeout=0.5), "local", None)
    from moru._sync_guest import Commands

    assert Commands(core._target).run("sleep 2; echo late", timeout=0).stdout == "late\n"


def test_background_handle(sbx: Sandbox) -> None:
    h = sbx.commands.run("echo a; sleep 0.3; echo b", background=True)
    chunks = list(h)
    assert "".join(c[0] or "" for c in chunks) == "a\nb\n"
    assert h.wait().stdout == "a\nb\n"
    h = sbx.commands.run("sleep 60", background=True, timeout=0)
    assert h.pid in [p.pid for p in sbx.commands.list()]
    assert sbx.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException):
        h.wait()
    assert sbx.commands.kill(h.pid) is False


def test_stdin_and_connect(sbx: Sandbox) -> None:
    h = sbx.commands.run("cat; echo end", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "one\n")
    h.send_stdin(b"two\n")
    h.close_stdin()
    assert h.wait().stdout == "one\ntwo\nend\n"
    h = sbx.commands.run("echo first; sleep 0.5; echo second", background=True)
    h.disconnect()
    assert sbx.commands.connect(h.pid).wait().stdout == "first\nsecond\n"
    with pytest.raises(NotFoundException):
        sbx.commands.connect(999_999)
    h = sbx.commands.run("sleep 30", background=True)
    try:
        with pytest.raises(FailedPreconditionException):
            h.send_stdin("x")
    finally:
        h.kill()


def _blocks(n: int) -> Iterator[bytes]:
    for i in range(n):
        yield bytes([i % 256]) * (1 << 20)


def test_files_roundtrip_of_every_data_kind(sbx: Sandbox, scratch: str) -> None:
    f = sbx.files
    assert f.write(f"{scratch}/s.txt", "héllo").size == len("héllo".encode())
    assert f.read(f"{scratch}/s.txt") == "héllo"
    f.write(f"{scratch}/b.bin", b"\x00\x01")
    assert f.read(f"{scratch}/b.bin", format="bytes") == b"\x00\x01"
    f.write(f"{scratch}/io.bin", io.BytesIO(b"abc" * 1000))
    assert f.read(f"{scratch}/io.bin", format="bytes") == b"abc" * 1000
    f.write(f"{scratch}/it.bin", _blocks(5))
    assert f.get_info(f"{scratch}/it.bin").size == 5 << 20
    assert (
        hashlib.sha256(f.read(f"{scratch}/it.bin", format="bytes")).digest()
        == hashlib.sha256(b"".join(_blocks(5))).digest()
    )
    assert sum(len(c) for c in f.read(f"{scratch}/it.bin", format="stream")) == 5 << 20


def test_files_ops_and_errors(sbx: Sandbox, scratch: str) -> None:
    f = sbx.files
    assert f.make_dir(f"{scratch}/d/e") is True
    assert f.make_dir(f"{scratch}/d/e") is False
    f.write(f"{scratch}/d/e/x", "x")
    names = sorted(e.path for e in f.list(f"{scratch}/d", depth=2))
    assert names == [f"{scratch}/d/e", f"{scratch}/d/e/x"]
    assert f.get_info(f"{scratch}/d").type == "dir"
    f.rename(f"{scratch}/d/e/x", f"{scratch}/d/y")
    assert f.exists(f"{scratch}/d/y") and not f.exists(f"{scratch}/d/e/x")
    f.remove(f"{scratch}/d")
    assert not f.exists(f"{scratch}/d")
    with pytest.raises(NotFoundException):
        f.read(f"{scratch}/missing")
    with pytest.raises(NotFoundException):
        f.read(f"{scratch}/missing", format="stream")
    with pytest.raises(InvalidArgumentException):
        f.read("relative.txt")


def test_watch_dir(sbx: Sandbox, scratch: str) -> None:
    got: list[str] = []
    w = sbx.files.watch_dir(scratch, on_event=lambda e: got.append(f"{e.type}:{e.name}"))
    try:
        sbx.files.write(f"{scratch}/new.txt", "1")
        deadline = time.monotonic() + 10
        while not any(g.endswith(":new.txt") for g in got) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        w.stop()
    assert any(g.endswith(":new.txt") for g in got), got


def test_async_twin(guestd_address: str, scratch: str) -> None:
    async def main() -> None:
        sbx = AsyncSandbox._for_guest(guestd_address)
        seen: list[str] = []

        async def cb(s: str) -> None:
            seen.append(s)

        r = await sbx.commands.run("echo x; echo y", on_stdout=cb)
        assert r.stdout == "x\ny\n" == "".join(seen)
        h = await sbx.commands.run("echo bg", background=True)
        assert [c async for c in h] == [("bg\n", None, None)]

        async def agen() -> AsyncIterator[bytes | str]:
            yield b"a"
            yield "b"

        await sbx.files.write(f"{scratch}/a.txt", agen())
        assert await sbx.files.read(f"{scratch}/a.txt") == "ab"
        chunks = [c async for c in await sbx.files.read(f"{scratch}/a.txt", format="stream")]
        assert b"".join(chunks) == b"ab"
        w = await sbx.files.watch_dir(scratch)
        await sbx.files.write(f"{scratch}/w.txt", "w")
        async for ev in w:
            if ev.name == "w.txt":
                break
        await w.stop()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_unreachable_address_is_a_connection_error() -> None:
    sbx = Sandbox._for_guest("unix:/tmp/moru-sdk-no-such.sock")
    with pytest.raises(ConnectionException, match=r"unix:/tmp/moru-sdk-no-such\.sock"):
        sbx.commands.run("true")


def test_sdk_calls_from_a_callback(sbx: Sandbox) -> None:
    """Callbacks run in the caller's thread, so they may call the SDK."""
    inner: list[str] = []
    sbx.commands.run(
        "echo go", on_stdout=lambda s: inner.append(sbx.commands.run("echo in").stdout)
    )
    assert inner == ["in\n"]

"""Terminals (`sandbox.pty`, `moru sandbox connect`) and file calls as a user,
through the public SDK and CLI, in the session's shared sandbox (a real microVM).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostd_framework import wait_for

from moru import (
    AsyncSandbox,
    CommandExitException,
    NotFoundException,
    PermissionDeniedException,
    PtySize,
    Sandbox,
)

pytestmark = pytest.mark.vm

MORU = "/opt/moru/venv/bin/moru"


def wait_for_quietly(pred: Any, timeout: float) -> bool:
    try:
        return bool(wait_for(pred, timeout, 0.2))
    except TimeoutError:
        return False


class Screen:
    """What a terminal printed so far (bytes from the on_data callback)."""

    def __init__(self) -> None:
        self.data = b""

    def __call__(self, chunk: bytes) -> None:
        self.data += chunk

    def wait_line(self, line: bytes, what: str) -> None:
        """Until `line` appears as a whole output line (not inside the echoed
        command: bash may put escape codes and a bare CR before it)."""
        pat = re.compile(rb"[\r\n]" + re.escape(line) + rb"\r\n")
        try:
            wait_for(lambda: pat.search(self.data), 60, 0.1, what)
        except TimeoutError:
            raise AssertionError(f"{what}: no line {line!r} in {self.data[-2000:]!r}") from None


def test_pty_echo_resize_exit(shared_sandbox: Sandbox) -> None:
    sbx = shared_sandbox
    screen = Screen()
    term = sbx.pty.create(PtySize(rows=24, cols=80), on_data=screen, envs={"PS1": "$ "})
    sbx.pty.send_stdin(term.pid, b"echo hi\n")
    screen.wait_line(b"hi", "echo")
    sbx.pty.send_stdin(term.pid, b"stty size\n")
    screen.wait_line(b"24 80", "initial size")
    sbx.pty.resize(term.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(term.pid, b"stty size\n")
    screen.wait_line(b"30 100", "size after resize")
    sbx.pty.send_stdin(term.pid, b"exit 7\n")
    with pytest.raises(CommandExitException) as exc:
        term.wait()
    assert exc.value.exit_code == 7
    # connect replays what the terminal printed; kill of an ended one is False.
    again = sbx.pty.connect(term.pid)
    assert b"30 100" in b"".join(c[2] for c in again if c[2])
    assert sbx.pty.kill(term.pid) is False


def test_pty_kill_and_async_surface(shared_sandbox: Sandbox) -> None:
    async def main() -> None:
        sbx = await AsyncSandbox.connect(shared_sandbox.sandbox_id)
        screen = Screen()
        term = await sbx.pty.create(
            PtySize(rows=10, cols=40), on_data=screen, cwd="/tmp", user="user"
        )
        await sbx.pty.send_stdin(term.pid, b"echo $(id -un):$(pwd):$TERM\n")
        await asyncio.to_thread(screen.wait_line, b"user:/tmp:xterm-256color", "user, cwd, TERM")
        assert await sbx.pty.kill(term.pid) is True
        with pytest.raises(CommandExitException):
            await term.wait()

    asyncio.run(main())


def test_file_calls_act_as_the_user(shared_sandbox: Sandbox) -> None:
    files = shared_sandbox.files
    home = f"/home/user/files-{secrets.token_hex(3)}"
    assert files.make_dir(home, user="user") is True
    assert files.get_info(home).owner == "user"
    entry = files.write(f"{home}/a.txt", "mine", user="user")
    assert entry.owner == "user"
    assert files.read(f"{home}/a.txt", user="user") == "mine"
    assert [e.name for e in files.list(home, user="user")] == ["a.txt"]
    assert files.exists(f"{home}/a.txt", user="user") is True
    files.rename(f"{home}/a.txt", f"{home}/b.txt", user="user")
    assert files.get_info(f"{home}/b.txt", user="user").owner == "user"

    events: list[Any] = []
    watch = files.watch_dir(home, on_event=events.append, user="user")
    files.write(f"{home}/c.txt", "x", user="user")
    wait_for(lambda: any(e.name == "c.txt" for e in events), 30, 0.1, "watch event")
    watch.stop()

    files.remove(f"{home}/b.txt", user="user")
    assert files.exists(f"{home}/b.txt") is False

    # What root may and `user` may not: each call fails as it would for them.
    files.write("/root/secret.txt", "root only")
    denied = [
        lambda: files.read("/root/secret.txt", user="user"),
        lambda: files.write("/root/new.txt", "x", user="user"),
        lambda: files.write("/etc/hostname", "x", user="user"),
        lambda: files.list("/root", user="user"),
        lambda: files.get_info("/root/secret.txt", user="user"),
        lambda: files.exists("/root/secret.txt", user="user"),
        lambda: files.make_dir("/root/d", user="user"),
        lambda: files.rename("/root/secret.txt", f"{home}/stolen.txt", user="user"),
        lambda: files.remove("/root/secret.txt", user="user"),
        lambda: files.watch_dir("/root", user="user"),
    ]
    for i, call in enumerate(denied):
        with pytest.raises(PermissionDeniedException):
            call()
            pytest.fail(f"call {i} was allowed")
    assert files.read("/root/secret.txt") == "root only"
    assert files.read("/root/secret.txt", user="root") == "root only"
    with pytest.raises(NotFoundException, match="user"):
        files.read("/root/secret.txt", user="nosuchuser")
    files.remove("/root/secret.txt")
    files.remove(home)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[tuple[list[str], str]]:
    """A private tmux server (its socket in the test's temp dir) for driving the
    CLI on a real terminal."""
    if shutil.which("tmux") is None:
        pytest.fail("tmux is missing: scripts/install.sh installs it")
    base = ["tmux", "-S", str(tmp_path / "tmux.sock")]
    try:
        yield base, "t"
    finally:
        subprocess.run([*base, "kill-server"], capture_output=True)


def test_cli_connect_is_an_interactive_shell(
    shared_sandbox: Sandbox, tmux: tuple[list[str], str]
) -> None:
    base, name = tmux
    guest_host = shared_sandbox.commands.run("hostname").stdout.strip()
    env = " ".join(
        f"{k}={os.environ[k]}"
        for k in ("MORU_HOSTD", "MORU_API_KEY", "PYTHONPATH")
        if k in os.environ
    )
    cmd = f"env {env} {MORU} sandbox connect {shared_sandbox.sandbox_id}; sleep 30"
    subprocess.run(
        [*base, "new-session", "-d", "-s", name, "-x", "100", "-y", "30", cmd], check=True
    )

    def pane() -> str:
        out = subprocess.run([*base, "capture-pane", "-p", "-t", name], capture_output=True)
        return out.stdout.decode(errors="replace")

    def keys(*k: str) -> None:
        subprocess.run([*base, "send-keys", "-t", name, *k], check=True)

    # The guest's login bash prompts with its hostname, then answers.
    wait_for(lambda: f"@{guest_host}" in pane(), 90, 0.2, "the guest shell's prompt")
    keys("echo in-$((6*7))-guest", "Enter")
    wait_for(lambda: "in-42-guest" in pane(), 90, 0.2, "the guest shell's answer")

    def size() -> str:
        fmt = "#{pane_height} #{pane_width}"
        out = subprocess.run([*base, "display", "-p", "-t", name, fmt], capture_output=True)
        return out.stdout.decode().strip()

    keys("stty size", "Enter")
    first = size()
    assert wait_for_quietly(lambda: first in pane(), 30), (first, pane())
    subprocess.run([*base, "resize-window", "-t", name, "-x", "120", "-y", "40"], check=True)
    second = size()
    assert second != first

    def asked_again() -> bool:
        # The resize travels as SIGWINCH -> Resize; ask until the guest sees it.
        keys("clear; stty size", "Enter")
        return wait_for_quietly(lambda: second in pane(), 2)

    wait_for(asked_again, 60, 0, f"the new size {second} after SIGWINCH")
    keys("exit", "Enter")
    # After the shell exits, the CLI returns and the local shell's `sleep` runs:
    # the pane no longer shows the guest prompt waiting for input.
    wait_for(
        lambda: (
            subprocess.run(
                [*base, "list-panes", "-t", name, "-F", "#{pane_current_command}"],
                capture_output=True,
            ).stdout.strip()
            == b"sleep"
        ),
        60,
        0.2,
        "the CLI to return when the guest shell exits",
    )

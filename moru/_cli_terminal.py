"""`moru sandbox connect ID`: an interactive shell in the sandbox, on this terminal.

The local terminal goes to raw mode; keys are sent to a login bash running on
a pseudo-terminal in the guest (`sandbox.pty`), its output is written here as
it comes, and a window resize (SIGWINCH) resizes the guest's terminal. It ends
when the shell exits (or the sandbox ends); the terminal is restored.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import tty
from collections.abc import Iterator

from moru._async_sandbox import AsyncSandbox
from moru._commands import AsyncCommandHandle
from moru._connection import close_channels
from moru._errors import CommandExitException
from moru._models import PtySize


def _size() -> PtySize:
    """The local terminal's size (not shutil's, which prefers $COLUMNS/$LINES)."""
    try:
        cols, rows = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        cols, rows = 80, 24
    return PtySize(rows=rows, cols=cols)


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)  # keys typed ahead are kept (TCSAFLUSH drops them)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _session(sandbox_id: str, hostd: str | None, api_key: str | None) -> int:
    sbx = await AsyncSandbox.connect(sandbox_id, hostd=hostd, api_key=api_key)
    out = sys.stdout.fileno()

    def write(data: bytes) -> None:
        while data:
            n = os.write(out, data)
            data = data[n:]

    initial = _size()
    term = await sbx.pty.create(initial, on_data=write)
    loop = asyncio.get_running_loop()
    inp = sys.stdin.fileno()
    keys: asyncio.Queue[bytes] = asyncio.Queue()

    def on_key() -> None:
        data = os.read(inp, 4096)
        keys.put_nowait(data)
        if not data:
            loop.remove_reader(inp)

    async def send_keys() -> None:
        while True:
            data = await keys.get()
            if not data:  # local EOF (stdin not a terminal): end the shell's input
                await sbx.pty.send_stdin(term.pid, b"\x04")
                return
            await sbx.pty.send_stdin(term.pid, data)

    resizes: set[asyncio.Task[None]] = set()

    def on_winch() -> None:
        task = loop.create_task(sbx.pty.resize(term.pid, _size()))
        resizes.add(task)
        task.add_done_callback(resizes.discard)

    loop.add_reader(inp, on_key)
    loop.add_signal_handler(signal.SIGWINCH, on_winch)
    if _size() != initial:  # resized before the handler was in place
        on_winch()
    sender = loop.create_task(send_keys())
    try:
        with _raw(inp):
            await _wait_end(term)
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)
        loop.remove_reader(inp)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
        if term.exit_code is None:  # we are leaving early: no shell left behind
            with contextlib.suppress(Exception):
                await sbx.pty.kill(term.pid)
        await close_channels()
    code = term.exit_code
    return 0 if code is None else code


async def _wait_end(term: AsyncCommandHandle) -> None:
    with contextlib.suppress(CommandExitException):
        await term.wait()


def connect(sandbox_id: str, hostd: str | None, api_key: str | None) -> int:
    """Runs the interactive session; returns the shell's exit code."""
    return asyncio.run(_session(sandbox_id, hostd, api_key))

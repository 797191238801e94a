"""The host processes of a QEMU VM (QEMU, vhost-device-vsock): spawn, find again, signal, wait."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

POLL = 0.01


async def run_both(a: Coroutine[Any, Any, Any], b: Coroutine[Any, Any, Any]) -> None:
    """Runs a and b at once; if one fails, the other is cancelled and waited for (so it
    starts nothing after the caller cleans up), then the first error is raised."""
    tasks = [asyncio.ensure_future(a), asyncio.ensure_future(b)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def join_cgroups(procs_files: tuple[Path, ...]) -> Callable[[], None]:
    """A pre-exec hook that moves the child into every cgroup before it execs."""
    paths = [str(p) for p in procs_files]

    def hook() -> None:
        pid = str(os.getpid()).encode()
        for p in paths:
            fd = os.open(p, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    return hook


class Proc:
    """A VM process: our child (popen set) or one found again after a restart."""

    def __init__(self, name: str, pid: int, marker: str, popen: subprocess.Popen[bytes] | None):
        self.name = name
        self.pid = pid
        self.marker = marker  # a string its command line must contain (the run_dir)
        self.popen = popen

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return is_our_process(self.pid, self.marker)

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stopped(self) -> bool:
        """Whether it is stopped by a signal (paused)."""
        return proc_state(self.pid) in ("T", "t")

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Waits (polling: after a restart it is not our child) until it is gone."""
        end = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > end:
                return False
            await asyncio.sleep(POLL)
        return True


def proc_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat ("" when gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def is_our_process(pid: int, marker: str) -> bool:
    """Whether pid runs (not a zombie) with marker in its command line."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return proc_state(pid) not in ("", "Z", "X") and marker.encode() in cmdline


def _per_thread(pid: int, name: str) -> list[str] | None:
    """/proc/<pid>/task/<tid>/<name> of each of pid's threads; None when pid is gone."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            out.append(Path(f"/proc/{pid}/task/{tid}/{name}").read_text().strip())
    return out


def thread_names(pid: int) -> list[str] | None:
    """The names (comm) of pid's threads; None when pid is gone."""
    return _per_thread(pid, "comm")


def epoll_watches(pid: int) -> list[set[int]] | None:
    """The `data` words registered in each epoll instance pid holds (/proc fdinfo); None when
    pid is gone or its fds cannot be read."""
    found: list[set[int]] = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue  # closed meanwhile
        data: set[int] = set()
        for line in info.splitlines():
            words = line.split()
            if words[:1] == ["tfd:"] and "data:" in words:
                with contextlib.suppress(ValueError, IndexError):
                    data.add(int(words[words.index("data:") + 1], 16))  # printed in hex
        found.append(data)
    return found


def thread_wchans(pid: int) -> list[str] | None:
    """Where each of pid's threads sleeps in the kernel (/proc wchan; "0" when running or
    hidden); None when pid is gone."""
    return _per_thread(pid, "wchan")


def read_tail(path: Path, nbytes: int = 2048) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""

"""One sandbox's cgroup(s), cgroup v1 or v2: usage, limits, freeze, weight, removal.

`CgroupManager` (hostd/cgroups.py) lays out the hierarchy and makes these;
this module is what the rest of hostd holds for a sandbox once it exists.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import os
import signal
import time
from pathlib import Path


class CgroupError(RuntimeError):
    """A cgroup could not be created, found or removed; the message names the path."""


def read_value(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise CgroupError(f"cannot read {path}: {e.strerror}") from e


def write_value(path: Path, value: str | int) -> None:
    try:
        path.write_text(str(value))
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror}") from e


def _keyed(text: str, key: str) -> int:
    """The value of `key` in a "key value" per line file (memory.events, cpu.stat...)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    return 0


def _rmdir(path: Path) -> None:
    os.rmdir(path)


def pids_of(procs_file: Path) -> set[int]:
    try:
        return {int(x) for x in procs_file.read_text().split()}
    except FileNotFoundError:
        return set()


async def _rmdir_when_empty(dirs: list[Path], procs: list[Path], timeout: float) -> None:  # noqa: ASYNC109
    """SIGKILLs what is left in the cgroups, waits until empty, removes them."""
    end = time.monotonic() + timeout
    while True:
        left: set[int] = set()
        for p in procs:
            left |= pids_of(p)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > end:
            raise CgroupError(f"processes {sorted(left)} still in {dirs[0]} after SIGKILL")
        await asyncio.sleep(0.02)
    for d in dirs:
        while True:
            try:
                _rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                # A killed task can linger a moment after leaving cgroup.procs.
                if e.errno != errno.EBUSY or time.monotonic() > end:
                    raise CgroupError(f"cannot remove {d}: {e.strerror}") from e
                await asyncio.sleep(0.02)


# cgroup v2's default cpu.weight (v1: cpu.shares 1024); warm pool members run at 1.
DEFAULT_CPU_WEIGHT = 100


class SandboxCgroup(abc.ABC):
    """The cgroup(s) of one sandbox."""

    sandbox_id: str

    @property
    @abc.abstractmethod
    def procs_files(self) -> tuple[Path, ...]:
        """The cgroup.procs files a VM process writes its pid to (VmSpec.cgroup_procs_files)."""

    @abc.abstractmethod
    def cpu_usage_seconds(self) -> float: ...

    @abc.abstractmethod
    def memory_usage_bytes(self) -> int: ...

    @abc.abstractmethod
    def oom_kill_count(self) -> int:
        """Processes of the sandbox the host OOM killer killed (0 while healthy)."""

    @abc.abstractmethod
    def exists(self) -> bool: ...

    @abc.abstractmethod
    def limits(self) -> dict[str, int]:
        """cfs_quota_us, cfs_period_us, memory_limit, pids_max as the kernel reports them."""

    @abc.abstractmethod
    async def freeze(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Stops every process of the sandbox; returns once they are frozen."""

    @abc.abstractmethod
    async def thaw(self) -> None: ...

    def reclaim(self) -> None:  # noqa: B027 (optional: a no-op where unsupported)
        """Uncharges page cache an empty cgroup still holds."""

    @abc.abstractmethod
    def set_cpu_weight(self, weight: int) -> None:
        """CPU share against sibling sandboxes, in cgroup v2 units (1..10000, default 100)."""

    @abc.abstractmethod
    async def remove(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Kills leftover processes, waits until empty, removes the cgroup. Idempotent."""

    def pids(self) -> set[int]:
        out: set[int] = set()
        for p in self.procs_files:
            out |= pids_of(p)
        return out


class V1Cgroup(SandboxCgroup):
    def __init__(self, sandbox_id: str, dirs: dict[str, Path]) -> None:
        self.sandbox_id = sandbox_id
        self.dirs = dirs  # controller -> directory

    @property
    def procs_files(self) -> tuple[Path, ...]:
        seen: dict[Path, Path] = {}
        for d in self.dirs.values():
            seen.setdefault(d.resolve(), d / "cgroup.procs")
        return tuple(seen.values())

    def exists(self) -> bool:
        return self.dirs["memory"].is_dir()

    def cpu_usage_seconds(self) -> float:
        return int(read_value(self.dirs["cpuacct"] / "cpuacct.usage")) / 1e9

    def memory_usage_bytes(self) -> int:
        return int(read_value(self.dirs["memory"] / "memory.usage_in_bytes"))

    def oom_kill_count(self) -> int:
        return _keyed(read_value(self.dirs["memory"] / "memory.oom_control"), "oom_kill")

    def limits(self) -> dict[str, int]:
        """The limits as the kernel reports them (for doctor and tests)."""
        return {
            "cfs_quota_us": int(read_value(self.dirs["cpu"] / "cpu.cfs_quota_us")),
            "cfs_period_us": int(read_value(self.dirs["cpu"] / "cpu.cfs_period_us")),
            "memory_limit": int(read_value(self.dirs["memory"] / "memory.limit_in_bytes")),
            "pids_max": int(read_value(self.dirs["pids"] / "pids.max")),
        }

    def set_cpu_weight(self, weight: int) -> None:
        write_value(self.dirs["cpu"] / "cpu.shares", max(2, weight * 1024 // DEFAULT_CPU_WEIGHT))

    def _freezer_state(self) -> str:
        return read_value(self.dirs["freezer"] / "freezer.state").strip()

    async def freeze(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        write_value(self.dirs["freezer"] / "freezer.state", "FROZEN")
        end = time.monotonic() + timeout
        while self._freezer_state() != "FROZEN":
            if time.monotonic() > end:
                raise CgroupError(f"{self.dirs['freezer']} did not freeze in {timeout}s")
            await asyncio.sleep(0.005)

    async def thaw(self) -> None:
        write_value(self.dirs["freezer"] / "freezer.state", "THAWED")

    def reclaim(self) -> None:
        """Uncharges what an empty cgroup still holds (page cache), e.g. after pause to disk."""
        write_value(self.dirs["memory"] / "memory.force_empty", 0)

    async def remove(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        fz = self.dirs["freezer"]
        if fz.is_dir() and self._freezer_state() != "THAWED":
            await self.thaw()  # SIGKILL does not reach frozen tasks
        dirs = list({d.resolve(): d for d in self.dirs.values() if d.is_dir()}.values())
        await _rmdir_when_empty(dirs, [d / "cgroup.procs" for d in dirs], timeout)


class V2Cgroup(SandboxCgroup):
    def __init__(self, sandbox_id: str, path: Path) -> None:
        self.sandbox_id = sandbox_id
        self.path = path

    @property
    def procs_files(self) -> tuple[Path, ...]:
        return (self.path / "cgroup.procs",)

    def exists(self) -> bool:
        return self.path.is_dir()

    def cpu_usage_seconds(self) -> float:
        return _keyed(read_value(self.path / "cpu.stat"), "usage_usec") / 1e6

    def memory_usage_bytes(self) -> int:
        return int(read_value(self.path / "memory.current"))

    def oom_kill_count(self) -> int:
        return _keyed(read_value(self.path / "memory.events"), "oom_kill")

    def limits(self) -> dict[str, int]:
        quota, period = read_value(self.path / "cpu.max").split()
        mem = read_value(self.path / "memory.max").strip()
        pids = read_value(self.path / "pids.max").strip()
        return {
            "cfs_quota_us": -1 if quota == "max" else int(quota),
            "cfs_period_us": int(period),
            "memory_limit": -1 if mem == "max" else int(mem),
            "pids_max": -1 if pids == "max" else int(pids),
        }

    def set_cpu_weight(self, weight: int) -> None:
        write_value(self.path / "cpu.weight", min(10000, max(1, weight)))

    def _frozen(self) -> bool:
        return _keyed(read_value(self.path / "cgroup.events"), "frozen") == 1

    async def freeze(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        write_value(self.path / "cgroup.freeze", 1)
        end = time.monotonic() + timeout
        while not self._frozen():
            if time.monotonic() > end:
                raise CgroupError(f"{self.path} did not freeze in {timeout}s")
            await asyncio.sleep(0.005)

    async def thaw(self) -> None:
        write_value(self.path / "cgroup.freeze", 0)

    def reclaim(self) -> None:
        """Reclaims what an empty cgroup still holds (page cache), e.g. after pause to disk."""
        if (self.path / "memory.reclaim").exists():  # Linux >= 5.19
            with contextlib.suppress(CgroupError):  # EAGAIN when not all could be reclaimed
                write_value(self.path / "memory.reclaim", str(self.memory_usage_bytes()))

    async def remove(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        if not self.path.is_dir():
            return
        kill = self.path / "cgroup.kill"
        if kill.exists():  # Linux >= 5.14 kills frozen tasks too, atomically
            write_value(kill, 1)
        else:
            await self.thaw()
        await _rmdir_when_empty([self.path], [self.path / "cgroup.procs"], timeout)

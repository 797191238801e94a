"""One cgroup per sandbox, holding its VMM and vsock device: CPU quota, memory and pids limits.

Both cgroup versions are supported, detected at start:

- v1 (separate hierarchies, as on the project's build machines): one
  directory `<controller>/<root_name>/<sandbox_id>` per controller (cpu,
  cpuacct, memory, pids, freezer). cpu/cpuacct/memory go through cgroupspy;
  pids and freezer, which cgroupspy does not model, are plain file writes.
- v2 (unified, as on most production hosts): one directory
  `<base>/<root_name>/<sandbox_id>`, where base is the cgroup hostd itself
  runs in when that is not the root: under systemd with `Delegate=yes` that
  is the service's delegated subtree. hostd then moves itself into a
  `<base>/hostd` leaf, since v2 forbids processes in a cgroup whose
  controllers are delegated to children.

The memory limit is guest memory plus the VMM's own overhead, so a guest
that fills its memory is OOM-killed inside the guest, not on the host.

CPU: each sandbox's quota is its vcpus; with a reserve for hostd
(`cpu_reserve`, hostd's `cpu_reserve_cores`), the root group's quota is the
host's CPUs minus the reserve, so all sandboxes together (and any one of
them) leave hostd that much, and one sandbox's quota is capped to it too.
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

from cgroupspy.nodes import Node

FS_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
# What QEMU (TCG translation cache included), its vsock device and their
# page tables use on top of guest memory.
DEFAULT_VMM_OVERHEAD = 256 << 20
DEFAULT_PIDS_MAX = 1024
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer")
V2_CONTROLLERS = ("cpu", "memory", "pids")


class CgroupError(RuntimeError):
    """A cgroup could not be created, found or removed; the message names the path."""


def detect_version(fs_root: Path = FS_ROOT) -> int:
    """2 on a pure unified hierarchy, else 1 (hybrid hosts count as v1)."""
    return 2 if (fs_root / "cgroup.controllers").is_file() else 1


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise CgroupError(f"cannot read {path}: {e.strerror}") from e


def _write(path: Path, value: str | int) -> None:
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


def _pids_of(procs_file: Path) -> set[int]:
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
            left |= _pids_of(p)
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
            out |= _pids_of(p)
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
        return int(_read(self.dirs["cpuacct"] / "cpuacct.usage")) / 1e9

    def memory_usage_bytes(self) -> int:
        return int(_read(self.dirs["memory"] / "memory.usage_in_bytes"))

    def oom_kill_count(self) -> int:
        return _keyed(_read(self.dirs["memory"] / "memory.oom_control"), "oom_kill")

    def limits(self) -> dict[str, int]:
        """The limits as the kernel reports them (for doctor and tests)."""
        return {
            "cfs_quota_us": int(_read(self.dirs["cpu"] / "cpu.cfs_quota_us")),
            "cfs_period_us": int(_read(self.dirs["cpu"] / "cpu.cfs_period_us")),
            "memory_limit": int(_read(self.dirs["memory"] / "memory.limit_in_bytes")),
            "pids_max": int(_read(self.dirs["pids"] / "pids.max")),
        }

    def set_cpu_weight(self, weight: int) -> None:
        _write(self.dirs["cpu"] / "cpu.shares", max(2, weight * 1024 // DEFAULT_CPU_WEIGHT))

    def _freezer_state(self) -> str:
        return _read(self.dirs["freezer"] / "freezer.state").strip()

    async def freeze(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        _write(self.dirs["freezer"] / "freezer.state", "FROZEN")
        end = time.monotonic() + timeout
        while self._freezer_state() != "FROZEN":
            if time.monotonic() > end:
                raise CgroupError(f"{self.dirs['freezer']} did not freeze in {timeout}s")
            await asyncio.sleep(0.005)

    async def thaw(self) -> None:
        _write(self.dirs["freezer"] / "freezer.state", "THAWED")

    def reclaim(self) -> None:
        """Uncharges what an empty cgroup still holds (page cache), e.g. after pause to disk."""
        _write(self.dirs["memory"] / "memory.force_empty", 0)

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
        return _keyed(_read(self.path / "cpu.stat"), "usage_usec") / 1e6

    def memory_usage_bytes(self) -> int:
        return int(_read(self.path / "memory.current"))

    def oom_kill_count(self) -> int:
        return _keyed(_read(self.path / "memory.events"), "oom_kill")

    def limits(self) -> dict[str, int]:
        quota, period = _read(self.path / "cpu.max").split()
        mem = _read(self.path / "memory.max").strip()
        pids = _read(self.path / "pids.max").strip()
        return {
            "cfs_quota_us": -1 if quota == "max" else int(quota),
            "cfs_period_us": int(period),
            "memory_limit": -1 if mem == "max" else int(mem),
            "pids_max": -1 if pids == "max" else int(pids),
        }

    def set_cpu_weight(self, weight: int) -> None:
        _write(self.path / "cpu.weight", min(10000, max(1, weight)))

    def _frozen(self) -> bool:
        return _keyed(_read(self.path / "cgroup.events"), "frozen") == 1

    async def freeze(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        _write(self.path / "cgroup.freeze", 1)
        end = time.monotonic() + timeout
        while not self._frozen():
            if time.monotonic() > end:
                raise CgroupError(f"{self.path} did not freeze in {timeout}s")
            await asyncio.sleep(0.005)

    async def thaw(self) -> None:
        _write(self.path / "cgroup.freeze", 0)

    def reclaim(self) -> None:
        """Reclaims what an empty cgroup still holds (page cache), e.g. after pause to disk."""
        if (self.path / "memory.reclaim").exists():  # Linux >= 5.19
            with contextlib.suppress(CgroupError):  # EAGAIN when not all could be reclaimed
                _write(self.path / "memory.reclaim", str(self.memory_usage_bytes()))

    async def remove(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        if not self.path.is_dir():
            return
        kill = self.path / "cgroup.kill"
        if kill.exists():  # Linux >= 5.14 kills frozen tasks too, atomically
            _write(kill, 1)
        else:
            await self.thaw()
        await _rmdir_when_empty([self.path], [self.path / "cgroup.procs"], timeout)


class CgroupManager:
    """Creates and finds sandbox cgroups under one `root_name` group."""

    def __init__(
        self,
        root_name: str = "moru",
        *,
        fs_root: Path = FS_ROOT,
        version: int | None = None,
        vmm_overhead_bytes: int = DEFAULT_VMM_OVERHEAD,
        self_cgroup: Path = Path("/proc/self/cgroup"),
        cpu_reserve: float = 0.0,
        host_cpus: int | None = None,
    ) -> None:
        self.root_name = root_name
        ncpu = host_cpus or os.cpu_count() or 1
        if not 0 <= cpu_reserve < ncpu:
            raise CgroupError(f"cpu_reserve: {cpu_reserve} is outside 0..{ncpu} (host CPUs)")
        # All sandboxes together (the root group) get what the reserve leaves;
        # None: no cap on the root group (reserve 0).
        self.sandbox_cpus: float | None = ncpu - cpu_reserve if cpu_reserve else None
        self.fs_root = fs_root
        self.version = version or detect_version(fs_root)
        self.vmm_overhead_bytes = vmm_overhead_bytes
        if self.version == 1:
            missing = [c for c in V1_CONTROLLERS if not (fs_root / c).is_dir()]
            if missing:
                raise CgroupError(
                    f"cgroup v1 controllers not mounted under {fs_root}: {', '.join(missing)}"
                )
            self.base = fs_root
        else:
            self.base = self._v2_base(self_cgroup)

    # --- v2 setup -------------------------------------------------------
    def _v2_base(self, self_cgroup: Path) -> Path:
        """The directory our root group lives in: the delegated subtree when not at the root."""
        rel = "/"
        for line in _read(self_cgroup).splitlines():
            if line.startswith("0::"):
                rel = line[3:].strip() or "/"
        base = self.fs_root / rel.lstrip("/") if rel != "/" else self.fs_root
        if base != self.fs_root and _pids_of(base / "cgroup.procs"):
            # "No internal processes": move ourselves (all threads) to a leaf.
            leaf = base / "hostd"
            leaf.mkdir(exist_ok=True)
            for pid in sorted(_pids_of(base / "cgroup.procs")):
                with contextlib.suppress(CgroupError):
                    _write(leaf / "cgroup.procs", pid)
        return base

    def _v2_enable(self, parent: Path) -> None:
        available = _read(parent / "cgroup.controllers").split()
        missing = [c for c in V2_CONTROLLERS if c not in available]
        if missing:
            raise CgroupError(
                f"cgroup v2 controllers {', '.join(missing)} not delegated to {parent} "
                "(run hostd with Delegate=yes or as root at the root cgroup)"
            )
        enabled = _read(parent / "cgroup.subtree_control").split()
        for c in V2_CONTROLLERS:
            if c not in enabled:
                _write(parent / "cgroup.subtree_control", f"+{c}")

    def _v2_root(self) -> Path:
        root = self.base / self.root_name
        if not root.is_dir():
            self._v2_enable(self.base)
            root.mkdir(exist_ok=True)
        self._v2_enable(root)
        _write(root / "cpu.max", f"{self._root_quota()} {CPU_PERIOD_US}")
        return root

    # --- API ------------------------------------------------------------
    def memory_limit(self, memory_bytes: int) -> int:
        return memory_bytes + self.vmm_overhead_bytes

    def cpu_quota(self, vcpus: int) -> int:
        """A sandbox's CFS quota (µs per period): its vcpus, within what the reserve leaves."""
        cpus = float(vcpus) if self.sandbox_cpus is None else min(vcpus, self.sandbox_cpus)
        return max(int(cpus * CPU_PERIOD_US), 1000)

    def _root_quota(self) -> str:
        if self.sandbox_cpus is None:
            return "max"
        return str(int(self.sandbox_cpus * CPU_PERIOD_US))

    def create(
        self,
        sandbox_id: str,
        vcpus: int,
        memory_bytes: int,
        pids_max: int = DEFAULT_PIDS_MAX,
    ) -> SandboxCgroup:
        """A new cgroup: CPU quota of `vcpus` CPUs, memory = `memory_bytes` (guest) + overhead."""
        if not sandbox_id or "/" in sandbox_id or sandbox_id.startswith("."):
            raise CgroupError(f"invalid sandbox id for a cgroup name: {sandbox_id!r}")
        limit = self.memory_limit(memory_bytes)
        quota = self.cpu_quota(vcpus)
        cg: SandboxCgroup
        try:
            if self.version == 1:
                cg = self._create_v1(sandbox_id, quota, limit, pids_max)
            else:
                cg = self._create_v2(sandbox_id, quota, limit, pids_max)
        except FileExistsError:
            raise CgroupError(f"cgroup for {sandbox_id} already exists") from None
        except OSError as e:
            raise CgroupError(f"creating cgroup for {sandbox_id}: {e}") from e
        return cg

    def _v1_root_cpu(self, root: Path) -> None:
        """The root group's quota: all sandboxes together leave the reserve to hostd.

        v1 refuses a parent quota below a child's, so children made by an older
        hostd without the reserve keep the old value until they are gone.
        """
        quota = -1 if self.sandbox_cpus is None else int(self._root_quota())
        if int(_read(root / "cpu.cfs_quota_us")) == quota:
            return
        with contextlib.suppress(CgroupError):
            _write(root / "cpu.cfs_period_us", CPU_PERIOD_US)
            _write(root / "cpu.cfs_quota_us", quota)

    def _create_v1(self, sandbox_id: str, quota: int, limit: int, pids_max: int) -> V1Cgroup:
        root = Node(str(self.fs_root).encode())
        dirs: dict[str, Path] = {}
        cg = V1Cgroup(sandbox_id, dirs)
        try:
            nodes: dict[str, Node] = {}
            for ctrl in V1_CONTROLLERS:
                ctrl_node = Node(ctrl.encode(), parent=root)
                group = ctrl_node.create_cgroup(self.root_name)  # tolerates EEXIST
                if ctrl == "cpu":
                    self._v1_root_cpu(Path(os.fsdecode(group.full_path)))
                path = Path(os.fsdecode(group.full_path)) / sandbox_id
                if path.resolve() in {d.resolve() for d in dirs.values()}:
                    dirs[ctrl] = path  # co-mounted (cpu,cpuacct): same directory
                    continue
                path.mkdir()
                dirs[ctrl] = path
                nodes[ctrl] = Node(sandbox_id.encode(), parent=group)
            cpu = nodes["cpu"].controller
            cpu.cfs_period_us = CPU_PERIOD_US
            cpu.cfs_quota_us = quota
            mem = nodes["memory"].controller
            mem.limit_in_bytes = limit
            memsw = dirs["memory"] / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # no swapping beyond the limit either
                _write(memsw, limit)
            _write(dirs["pids"] / "pids.max", pids_max)
        except BaseException:
            with contextlib.suppress(Exception):
                for d in dirs.values():
                    with contextlib.suppress(FileNotFoundError):
                        os.rmdir(d)
            raise
        return cg

    def _create_v2(self, sandbox_id: str, quota: int, limit: int, pids_max: int) -> V2Cgroup:
        path = self._v2_root() / sandbox_id
        path.mkdir()
        try:
            _write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            _write(path / "memory.max", limit)
            if (path / "memory.swap.max").exists():
                _write(path / "memory.swap.max", 0)
            _write(path / "pids.max", pids_max)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(path)
            raise
        return V2Cgroup(sandbox_id, path)

    def open(self, sandbox_id: str) -> SandboxCgroup:
        """The existing cgroup of sandbox_id (after a hostd restart)."""
        cg: SandboxCgroup
        if self.version == 1:
            cg = V1Cgroup(
                sandbox_id,
                {c: self.fs_root / c / self.root_name / sandbox_id for c in V1_CONTROLLERS},
            )
        else:
            cg = V2Cgroup(sandbox_id, self.base / self.root_name / sandbox_id)
        if not cg.exists():
            raise CgroupError(f"no cgroup for sandbox {sandbox_id}")
        return cg

    def list_ids(self) -> list[str]:
        """Sandbox ids that have a cgroup (to find leaks after a crash)."""
        if self.version == 1:
            root = self.fs_root / "memory" / self.root_name
        else:
            root = self.base / self.root_name
        if not root.is_dir():
            return []
        return sorted(d.name for d in root.iterdir() if d.is_dir())

    def remove_root(self) -> None:
        """Removes the (empty) `root_name` groups, e.g. after tests; no-op when in use."""
        if self.version == 1:
            roots = {(self.fs_root / c / self.root_name).resolve() for c in V1_CONTROLLERS}
        else:
            roots = {self.base / self.root_name}
        for r in roots:
            with contextlib.suppress(FileNotFoundError, OSError):
                os.rmdir(r)

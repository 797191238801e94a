"""The sandboxes' cgroup hierarchy: makes and finds one cgroup per sandbox
(hostd/sandbox_cgroup.py), holding its VMM and vsock device, with its CPU
quota, memory and pids limits.

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

import contextlib
import os
from pathlib import Path

from cgroupspy.nodes import Node

from hostd.sandbox_cgroup import (
    CgroupError,
    SandboxCgroup,
    V1Cgroup,
    V2Cgroup,
    pids_of,
    read_value,
    write_value,
)

FS_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
# What QEMU (TCG translation cache included), its vsock device and their
# page tables use on top of guest memory.
DEFAULT_VMM_OVERHEAD = 256 << 20
DEFAULT_PIDS_MAX = 1024
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer")
V2_CONTROLLERS = ("cpu", "memory", "pids")


def detect_version(fs_root: Path = FS_ROOT) -> int:
    """2 on a pure unified hierarchy, else 1 (hybrid hosts count as v1)."""
    return 2 if (fs_root / "cgroup.controllers").is_file() else 1


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
        for line in read_value(self_cgroup).splitlines():
            if line.startswith("0::"):
                rel = line[3:].strip() or "/"
        base = self.fs_root / rel.lstrip("/") if rel != "/" else self.fs_root
        if base != self.fs_root and pids_of(base / "cgroup.procs"):
            # "No internal processes": move ourselves (all threads) to a leaf.
            leaf = base / "hostd"
            leaf.mkdir(exist_ok=True)
            for pid in sorted(pids_of(base / "cgroup.procs")):
                with contextlib.suppress(CgroupError):
                    write_value(leaf / "cgroup.procs", pid)
        return base

    def _v2_enable(self, parent: Path) -> None:
        available = read_value(parent / "cgroup.controllers").split()
        missing = [c for c in V2_CONTROLLERS if c not in available]
        if missing:
            raise CgroupError(
                f"cgroup v2 controllers {', '.join(missing)} not delegated to {parent} "
                "(run hostd with Delegate=yes or as root at the root cgroup)"
            )
        enabled = read_value(parent / "cgroup.subtree_control").split()
        for c in V2_CONTROLLERS:
            if c not in enabled:
                write_value(parent / "cgroup.subtree_control", f"+{c}")

    def _v2_root(self) -> Path:
        root = self.base / self.root_name
        if not root.is_dir():
            self._v2_enable(self.base)
            root.mkdir(exist_ok=True)
        self._v2_enable(root)
        write_value(root / "cpu.max", f"{self._root_quota()} {CPU_PERIOD_US}")
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
        if int(read_value(root / "cpu.cfs_quota_us")) == quota:
            return
        with contextlib.suppress(CgroupError):
            write_value(root / "cpu.cfs_period_us", CPU_PERIOD_US)
            write_value(root / "cpu.cfs_quota_us", quota)

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
                write_value(memsw, limit)
            write_value(dirs["pids"] / "pids.max", pids_max)
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
            write_value(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            write_value(path / "memory.max", limit)
            if (path / "memory.swap.max").exists():
                write_value(path / "memory.swap.max", 0)
            write_value(path / "pids.max", pids_max)
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

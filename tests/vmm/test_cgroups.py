"""Sandbox cgroups: v1 for real (this host), v2 file logic against a stand-in tree.

cgroup v2 cannot run here (the host's cgroup2 mount is an empty hybrid one),
so the v2 tests point the manager at a temporary directory laid out like
/sys/fs/cgroup and check what it writes; the kernel's reactions (frozen
events, rmdir of a directory with interface files) are played by the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

import hostd.sandbox_cgroup
from hostd.cgroups import CPU_PERIOD_US, CgroupManager, detect_version
from hostd.sandbox_cgroup import CgroupError, V1Cgroup, V2Cgroup

v1_only = pytest.mark.skipif(detect_version() != 1, reason="this host runs cgroup v2")


def spawn_in(procs_files: tuple[Path, ...], *argv: str) -> subprocess.Popen[bytes]:
    def join() -> None:
        for p in procs_files:
            p.write_text(str(os.getpid()))

    return subprocess.Popen(argv, preexec_fn=join, stderr=subprocess.PIPE)


@pytest.fixture
def mgr() -> Iterator[CgroupManager]:
    m = CgroupManager(f"moru-ct{os.getpid()}", vmm_overhead_bytes=64 << 20)
    yield m
    for sid in m.list_ids():
        uvloop.run(m.open(sid).remove())
    m.remove_root()
    assert not (Path("/sys/fs/cgroup/memory") / m.root_name).exists()


@v1_only
def test_v1_limits_processes_and_removal(mgr: CgroupManager) -> None:
    cg = mgr.create("sbx_a", vcpus=2, memory_bytes=512 << 20, pids_max=64)
    assert isinstance(cg, V1Cgroup)
    assert cg.limits() == {
        "cfs_quota_us": 2 * CPU_PERIOD_US,
        "cfs_period_us": CPU_PERIOD_US,
        "memory_limit": (512 + 64) << 20,
        "pids_max": 64,
    }
    assert len(cg.procs_files) == 5  # cpu, cpuacct, memory, pids, freezer
    assert mgr.list_ids() == ["sbx_a"]
    with pytest.raises(CgroupError, match="already exists"):
        mgr.create("sbx_a", 1, 1 << 20)

    busy = spawn_in(cg.procs_files, sys.executable, "-c", "while True: pass")
    try:
        assert cg.pids() == {busy.pid}
        for p in cg.procs_files:
            assert str(busy.pid) in p.read_text().split()
        time.sleep(0.5)
        assert cg.cpu_usage_seconds() > 0.05
        assert cg.memory_usage_bytes() > 0
        assert cg.oom_kill_count() == 0

        uvloop.run(cg.freeze())
        c0 = cg.cpu_usage_seconds()
        time.sleep(0.5)
        assert cg.cpu_usage_seconds() - c0 < 0.01  # frozen: no CPU at all
        uvloop.run(cg.thaw())
        time.sleep(0.3)
        assert cg.cpu_usage_seconds() - c0 > 0.02

        # Found again by a new manager (hostd restart).
        again = CgroupManager(mgr.root_name).open("sbx_a")
        assert again.pids() == {busy.pid}

        # remove() kills what is left, even frozen, and removes every directory.
        uvloop.run(cg.freeze())
        uvloop.run(cg.remove())
        assert busy.wait(5) == -9
        assert not cg.exists()
        assert not any(p.parent.exists() for p in cg.procs_files)
        uvloop.run(cg.remove())  # idempotent
        with pytest.raises(CgroupError, match="no cgroup"):
            mgr.open("sbx_a")
        assert mgr.list_ids() == []
    finally:
        busy.kill()
        busy.wait()


@v1_only
def test_v1_cpu_quota_leaves_hostd_its_reserve() -> None:
    """A sandbox's quota is its vcpus, capped so that hostd keeps cpu_reserve CPUs;
    the root group holds all sandboxes together to the same."""
    m = CgroupManager(f"moru-cr{os.getpid()}", cpu_reserve=0.5, host_cpus=2)
    try:
        one = m.create("sbx_one", vcpus=1, memory_bytes=64 << 20)
        two = m.create("sbx_two", vcpus=2, memory_bytes=64 << 20)
        assert one.limits()["cfs_quota_us"] == CPU_PERIOD_US
        assert two.limits()["cfs_quota_us"] == int(1.5 * CPU_PERIOD_US)
        root = Path("/sys/fs/cgroup/cpu") / m.root_name
        assert int((root / "cpu.cfs_quota_us").read_text()) == int(1.5 * CPU_PERIOD_US)
        with pytest.raises(CgroupError, match="cpu_reserve"):
            CgroupManager("moru-never", cpu_reserve=2, host_cpus=2)
    finally:
        for sid in m.list_ids():
            uvloop.run(m.open(sid).remove())
        m.remove_root()
    assert not (Path("/sys/fs/cgroup/cpu") / m.root_name).exists()


@v1_only
def test_v1_pids_and_memory_limits_bite(mgr: CgroupManager) -> None:
    cg = mgr.create("sbx_b", vcpus=1, memory_bytes=16 << 20, pids_max=4)
    forker = spawn_in(
        cg.procs_files, "bash", "-c", "for i in 1 2 3 4 5 6 7 8; do sleep 30 & done; wait"
    )
    try:
        time.sleep(1.0)
        assert len(cg.pids()) <= 4
        uvloop.run(cg.remove())
        err = forker.stderr.read() if forker.stderr else b""
        assert b"Resource temporarily unavailable" in err
    finally:
        forker.kill()
        forker.wait()

    # 16 MiB guest + 64 MiB overhead: allocating 200 MiB is OOM-killed in the cgroup.
    cg = mgr.create("sbx_c", vcpus=1, memory_bytes=16 << 20)
    hog = spawn_in(cg.procs_files, sys.executable, "-c", "b = bytearray(200 << 20); b[::4096]")
    assert hog.wait(30) == -9
    assert cg.oom_kill_count() == 1
    uvloop.run(cg.remove())


@v1_only
def test_v1_cpu_weight_for_warm_pool_members(mgr: CgroupManager) -> None:
    cg = mgr.create("sbx_w", vcpus=1, memory_bytes=16 << 20)
    shares = Path("/sys/fs/cgroup/cpu") / mgr.root_name / "sbx_w" / "cpu.shares"
    assert shares.read_text().strip() == "1024"
    cg.set_cpu_weight(1)  # a member being prepared: 1% of a sandbox's share
    assert shares.read_text().strip() == "10"
    cg.set_cpu_weight(100)  # claimed: as any sandbox
    assert shares.read_text().strip() == "1024"
    uvloop.run(cg.remove())


def test_create_rejects_bad_ids(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    self_cg = tmp_path / "self"
    self_cg.write_text("0::/\n")
    m = CgroupManager("moru", fs_root=tmp_path, self_cgroup=self_cg)
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(CgroupError, match="invalid sandbox id"):
            m.create(bad, 1, 1 << 20)


@pytest.fixture
def v2_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A stand-in /sys/fs/cgroup (v2) with hostd in a systemd service's delegated subtree."""
    root = tmp_path / "cg"
    svc = root / "system.slice" / "moru-hostd.service"
    svc.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for d in (svc,):
        (d / "cgroup.controllers").write_text("cpu io memory pids\n")
        (d / "cgroup.subtree_control").write_text("")
        (d / "cgroup.procs").write_text("4242\n")
    self_cg = tmp_path / "self"
    self_cg.write_text("0::/system.slice/moru-hostd.service\n")

    real_mkdir = Path.mkdir

    def mkdir(self: Path, *a: object, **kw: object) -> None:
        # The kernel populates a new cgroup's interface files.
        existed = self.exists()
        real_mkdir(self, *a, **kw)  # type: ignore[arg-type]
        if not existed and str(self).startswith(str(root)):
            (self / "cgroup.controllers").write_text("cpu memory pids\n")
            (self / "cgroup.subtree_control").write_text("")
            (self / "cgroup.procs").write_text("")
            (self / "cgroup.events").write_text("populated 0\nfrozen 0\n")
            (self / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\n")
            (self / "memory.current").write_text("123456\n")
            (self / "memory.events").write_text("low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n")
            (self / "cgroup.kill").write_text("")

    monkeypatch.setattr(Path, "mkdir", mkdir)
    return root, self_cg


def test_v2_delegated_subtree(v2_tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    root, self_cg = v2_tree
    svc = root / "system.slice" / "moru-hostd.service"
    m = CgroupManager("moru", fs_root=root, self_cgroup=self_cg, vmm_overhead_bytes=1 << 20)
    assert m.version == 2
    assert m.base == svc
    # hostd moved itself into a leaf so controllers can be delegated below.
    assert (svc / "hostd" / "cgroup.procs").read_text() == "4242"

    cg = m.create("sbx_v2", vcpus=3, memory_bytes=256 << 20, pids_max=99)
    assert isinstance(cg, V2Cgroup)
    assert cg.path == svc / "moru" / "sbx_v2"
    assert (cg.path / "cpu.max").read_text() == f"{3 * CPU_PERIOD_US} {CPU_PERIOD_US}"
    assert (cg.path / "memory.max").read_text() == str((256 << 20) + (1 << 20))
    assert (cg.path / "pids.max").read_text() == "99"
    # Controllers enabled for the children (the real file accumulates the writes).
    assert (svc / "moru" / "cgroup.subtree_control").read_text().startswith("+")
    assert cg.procs_files == (cg.path / "cgroup.procs",)
    assert cg.cpu_usage_seconds() == 1.5
    assert cg.memory_usage_bytes() == 123456
    assert cg.oom_kill_count() == 1
    assert cg.limits()["cfs_quota_us"] == 3 * CPU_PERIOD_US
    assert m.list_ids() == ["sbx_v2"]
    assert m.open("sbx_v2").procs_files == cg.procs_files

    (cg.path / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    uvloop.run(cg.freeze(timeout=1))
    assert (cg.path / "cgroup.freeze").read_text() == "1"
    uvloop.run(cg.thaw())
    assert (cg.path / "cgroup.freeze").read_text() == "0"

    # rmdir of a cgroup with interface files works in cgroupfs only.
    monkeypatch.setattr(hostd.sandbox_cgroup, "_rmdir", shutil.rmtree)
    uvloop.run(cg.remove())
    assert not cg.path.exists()
    uvloop.run(cg.remove())
    assert m.list_ids() == []


def test_v2_missing_controllers_say_what_to_do(v2_tree: tuple[Path, Path]) -> None:
    root, self_cg = v2_tree
    svc = root / "system.slice" / "moru-hostd.service"
    (svc / "cgroup.controllers").write_text("io\n")
    m = CgroupManager("moru", fs_root=root, self_cgroup=self_cg)
    with pytest.raises(CgroupError, match="Delegate=yes"):
        m.create("sbx_x", 1, 1 << 20)


def test_v2_at_the_root_when_not_under_systemd(v2_tree: tuple[Path, Path]) -> None:
    root, self_cg = v2_tree
    self_cg.write_text("0::/\n")
    m = CgroupManager("moru", fs_root=root, self_cgroup=self_cg)
    assert m.base == root
    (root / "cgroup.subtree_control").write_text("")
    cg = m.create("sbx_r", 1, 1 << 20)
    assert cg.procs_files == (root / "moru" / "sbx_r" / "cgroup.procs",)

"""Staging a restore (the RAM image copied ahead, while hostd sets up the network and
QEMU starts): the copy lands in the VM's RAM file, filled in place so QEMU can map it
meanwhile, and a cancel or a failure leaves no RAM file and no copy running.

No VM runs here: a snapshot of the right form (state stream magic, metadata,
a RAM image of the guest's size) is enough for the copy.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostd.rundir import RunDir, snapshot_ram
from hostd.vmm.base import SnapshotCorrupt, SnapshotInfo, VmSpec
from hostd.vmm.qemu import PciQemuVmm
from hostd.vmm.snapfile import write_info

MEMORY_MB = 512


@pytest.fixture
def snapshot() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="moru-test-stage-"))
    snap = d / "mem.snap"
    snap.write_bytes(b"QEVM\x00\x00\x00\x03" + bytes(56))
    with snapshot_ram(snap).open("wb") as f:  # all data, no holes: the copy takes a while
        chunk = os.urandom(1 << 20)
        for _ in range(MEMORY_MB):
            f.write(chunk)
    write_info(SnapshotInfo(path=snap, size_bytes=0, memory_mb=MEMORY_MB, vcpus=1,
                            created_at=time.time(), unplug_seconds=0.0, save_seconds=0.0,
                            state_bytes=snap.stat().st_size))  # fmt: skip
    yield snap
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def spec_for(run_dir: Path) -> VmSpec:
    return VmSpec(sandbox_id="sbx_stage" + run_dir.name[-6:], kernel=Path("/k"),
                  initramfs=Path("/i"), rootfs=Path("/r"), run_dir=run_dir, vcpus=1,
                  memory_mb=MEMORY_MB, disk_mb=1024, kernel_cmdline="")  # fmt: skip


def test_staged_ram_is_the_snapshot_image_and_goes_with_the_run_dir(
    snapshot: Path, tmp_path: Path
) -> None:
    files = RunDir(tmp_path / "vm")
    asyncio.run(PciQemuVmm().stage_restore(spec_for(files.path), snapshot))
    try:
        assert files.ram.stat().st_size == MEMORY_MB << 20
        with files.ram.open("rb") as a, snapshot_ram(snapshot).open("rb") as b:
            assert a.read(1 << 20) == b.read(1 << 20)
    finally:
        files.remove()
    assert not files.ram.exists()


def test_a_cancelled_staging_leaves_no_ram_file(snapshot: Path, tmp_path: Path) -> None:
    files = RunDir(tmp_path / "vm")

    async def cancel_midway() -> None:
        task = asyncio.create_task(PciQemuVmm().stage_restore(spec_for(files.path), snapshot))
        while not files.ram.exists():  # noqa: ASYNC110  (the copy has begun)
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    assert not files.ram.exists()


def test_a_failed_staging_leaves_no_ram_file(snapshot: Path, tmp_path: Path) -> None:
    files = RunDir(tmp_path / "vm")
    snapshot_ram(snapshot).unlink()  # a damaged snapshot: no RAM image
    with pytest.raises(SnapshotCorrupt):
        asyncio.run(PciQemuVmm().stage_restore(spec_for(files.path), snapshot))
    assert not files.ram.exists()


def test_qemu_may_start_before_the_copy_ends_and_sees_the_image_in_place(
    snapshot: Path, tmp_path: Path
) -> None:
    """`started` comes while the RAM image is still copied, with the RAM file at its full
    size (QEMU refuses a shorter one); a mapping taken then (what QEMU does at start)
    sees the image once the copy is done: the file is filled in place, never truncated
    or replaced. Holes of the image stay holes."""
    files = RunDir(tmp_path / "vm")
    ram = snapshot_ram(snapshot)
    with ram.open("r+b") as f:  # sparse: data at the start and in the middle only
        f.truncate(0)
        f.truncate(MEMORY_MB << 20)
        f.seek(0)
        f.write(os.urandom(64 << 20))
        f.seek(256 << 20)
        f.write(os.urandom(1 << 20))

    async def stage() -> tuple[bool, mmap.mmap]:
        started = asyncio.Event()
        task = asyncio.create_task(
            PciQemuVmm().stage_restore(spec_for(files.path), snapshot, started))
        await started.wait()
        assert files.ram.stat().st_size == MEMORY_MB << 20
        with files.ram.open("r+b") as f:
            mapped = mmap.mmap(f.fileno(), MEMORY_MB << 20, mmap.MAP_SHARED)
        still_copying = not task.done()
        await task
        return still_copying, mapped

    try:
        still_copying, mapped = asyncio.run(stage())
        assert still_copying, "started was set only after the copy"
        with ram.open("rb") as src:
            assert mapped[: 64 << 20] == src.read(64 << 20)
            src.seek(256 << 20)
            assert mapped[256 << 20 : 257 << 20] == src.read(1 << 20)
        assert mapped[300 << 20 : 301 << 20] == bytes(1 << 20)
        mapped.close()
        assert files.ram.stat().st_blocks * 512 < 80 << 20, "holes were filled in"
    finally:
        files.remove()


def test_a_staging_cancelled_after_started_leaves_no_copy_running(
    snapshot: Path, tmp_path: Path
) -> None:
    files = RunDir(tmp_path / "vm")

    async def cancel_after_started() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(
            PciQemuVmm().stage_restore(spec_for(files.path), snapshot, started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_after_started())
    assert not files.ram.exists()
    left = subprocess.run(["pgrep", "-f", str(files.ram)], capture_output=True, text=True)
    assert not left.stdout.strip(), f"copy process left: {left.stdout}"

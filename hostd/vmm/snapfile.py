"""A snapshot on disk, for any driver: metadata, integrity checks, free space, durability.

`<snap>` holds the VMM's device state, `<snap>.json` (written last) the
`SnapshotInfo`, `<snap>.ram` the guest RAM image where the driver keeps RAM
out of the state stream (hostd.rundir names them).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from hostd.rundir import partial, snapshot_meta, snapshot_ram
from hostd.vmm.base import (
    NotEnoughDisk,
    SnapshotCorrupt,
    SnapshotInfo,
    SnapshotNotFound,
    VmSpec,
)

QEMU_MAGIC = b"QEVM"
# Disk beyond guest RAM that a snapshot may need (device state, headroom).
DISK_MARGIN = 64 << 20
FORMATS = (1, 2)


def fsync_path(path: Path) -> None:
    """fsync of a file or directory by path (a directory: its entries are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def has_magic(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == QEMU_MAGIC


def check_disk(spec: VmSpec, path: Path) -> None:
    """Raises NotEnoughDisk when path's disk cannot hold a snapshot of spec's guest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    need = (spec.memory_mb << 20) + DISK_MARGIN
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise NotEnoughDisk(
            f"not enough disk for a snapshot of {spec.sandbox_id}: {path.parent} has "
            f"{free >> 20} MiB free, a {spec.memory_mb} MiB guest needs up to {need >> 20} MiB"
        )


def write_info(info: SnapshotInfo) -> None:
    """The metadata, atomically: once it exists the snapshot is complete."""
    meta = snapshot_meta(info.path)
    tmp = partial(meta)
    tmp.write_text(info.to_json())
    os.replace(tmp, meta)


def read_info(path: Path) -> SnapshotInfo:
    """The snapshot's metadata after basic integrity checks (exists, size, magic)."""
    if not path.is_file():
        raise SnapshotNotFound(f"no snapshot at {path}")
    meta = snapshot_meta(path)
    try:
        d = json.loads(meta.read_text())
        if d.get("format") not in FORMATS:
            raise ValueError("unknown format")
        info = SnapshotInfo(**{**d, "path": Path(d["path"])})
    except FileNotFoundError:
        raise SnapshotCorrupt(f"snapshot {path} has no metadata ({meta.name})") from None
    except (ValueError, TypeError, KeyError) as e:
        raise SnapshotCorrupt(f"snapshot metadata {meta} is unreadable: {e}") from e
    size = path.stat().st_size
    want = info.size_bytes if info.format == 1 else info.state_bytes  # 1: RAM in the stream
    if size != want:
        raise SnapshotCorrupt(f"snapshot {path} is {size} bytes, {want} were written")
    if info.format >= 2:
        ram = snapshot_ram(path)
        try:
            ram_size = ram.stat().st_size
        except FileNotFoundError:
            raise SnapshotCorrupt(f"snapshot {path} has no RAM image ({ram.name})") from None
        if ram_size != info.memory_mb << 20:
            raise SnapshotCorrupt(
                f"snapshot RAM image {ram} is {ram_size} bytes, "
                f"the guest had {info.memory_mb} MiB"
            )
    if not has_magic(path):
        raise SnapshotCorrupt(f"snapshot {path} is not a QEMU state stream")
    return info


async def despite_cancel(coro: Coroutine[Any, Any, None]) -> None:
    """Runs coro to its end even if the caller is cancelled (then re-raises the cancel)."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and task.cancelled():
                raise
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError

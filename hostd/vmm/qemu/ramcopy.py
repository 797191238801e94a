"""Copies of guest RAM images: run as processes in the VM's cgroups, ended on cancel.

A restore fills the VM's RAM file from a snapshot's RAM image in place, so
QEMU can start meanwhile.

QEMU maps its RAM file (`memory-backend-file`) when it starts, and refuses a
file shorter than guest memory. `cp` truncates its destination before
writing, so a restore used to copy the image first and start QEMU after
(~90 ms one after the other). Here the file gets its full size first (all
holes), then a helper writes only the image's data extents into it without
ever truncating: QEMU can map it at any moment, and an `-incoming` QEMU
touches no guest RAM before the state is loaded (which waits for the fill).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

from hostd.vmm.base import SnapshotError
from hostd.vmm.qemu.process import join_cgroups

# Run as its own process inside the VM's cgroups, so the memory it fills is the
# sandbox's, not hostd's. Data extents only (SEEK_DATA/SEEK_HOLE): holes stay holes.
FILL = """
import os, sys
src, dst = os.open(sys.argv[1], os.O_RDONLY), os.open(sys.argv[2], os.O_WRONLY)
end, off = os.fstat(src).st_size, 0
while off < end:
    try:
        off = os.lseek(src, off, os.SEEK_DATA)
    except OSError:
        break
    hole = os.lseek(src, off, os.SEEK_HOLE)
    os.lseek(dst, off, os.SEEK_SET)
    while off < hole:
        n = os.sendfile(dst, src, off, hole - off)
        if n <= 0:
            sys.exit("short copy at %d" % off)
        off += n
"""


def sized(path: Path, size: int) -> None:
    """A new file at `path` of `size` bytes, all holes (no memory used yet)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


async def start_fill(
    src: Path, dst: Path, procs_files: tuple[Path, ...]
) -> asyncio.subprocess.Process:
    """The helper writing src's data into dst (made by `sized`), started in the cgroups."""
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", "-c", FILL, str(src), str(dst),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, preexec_fn=join_cgroups(procs_files),
        )  # fmt: skip
    except OSError as e:
        raise SnapshotError(f"cannot start the RAM copy ({sys.executable}): {e}") from e


async def finish(proc: asyncio.subprocess.Process, src: Path, dst: Path, sandbox_id: str) -> None:
    """Waits for a copy process; SnapshotError if it failed; killed if the wait is cancelled."""
    try:
        _, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise SnapshotError(
            f"VM {sandbox_id}: copying guest RAM {src} -> {dst} failed: "
            f"{err.decode(errors='replace').strip()}"
        )

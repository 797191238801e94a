"""Give back the all-zero pages of a restored guest's memory.

QEMU's incoming migration of a full RAM stream (a snapshot of format 1)
checks every guest page it is sent as zero by reading it
(ram_handle_compressed), and a read fault on shared memory allocates. So a
VM restored that way has all its RAM resident, though a fresh guest touched
a fraction of it. While the restored VM is still stopped (before `cont`, and
before the vhost-user vsock backend maps the memory again), the pages that
are all zero are punched out of the RAM file: a later guest access gets a
fresh zero page, the same content. The guest is not running, so no page can
change between the check and the punch. (Format 2 copies RAM as a sparse
file and never needs this.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

PAGE = 4096
CHUNK = 2 << 20  # read and judge 2 MiB at a time; zero pages inside mixed chunks too
_ZERO_CHUNK = bytes(CHUNK)
_ZERO_PAGE = bytes(PAGE)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)


def _punch(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


def release_zero_pages(fd: int) -> int:
    """Punches every all-zero 4 KiB page of the file `fd` out; returns the bytes released."""
    size = os.fstat(fd).st_size
    released = 0
    run_start = -1  # start of the current run of zero pages

    def end_run(at: int) -> None:
        nonlocal run_start, released
        if run_start >= 0:
            _punch(fd, run_start, at - run_start)
            released += at - run_start
            run_start = -1

    offset = 0
    while offset < size:
        data = os.pread(fd, CHUNK, offset)
        if not data:
            break
        if data == _ZERO_CHUNK:
            if run_start < 0:
                run_start = offset
        else:
            for p in range(0, len(data), PAGE):
                if data[p:p + PAGE] == _ZERO_PAGE:  # a 4 KiB copy + memcmp: faster than a view
                    if run_start < 0:
                        run_start = offset + p
                else:
                    end_run(offset + p)
        offset += len(data)
    end_run(offset)
    return released

"""hostd.vmm.zeropages on a real memfd (what QEMU's guest RAM is): zero pages are
released, every other byte stays."""

from __future__ import annotations

import mmap
import os

from hostd.vmm.zeropages import CHUNK, PAGE, release_zero_pages

SIZE = 16 * CHUNK


def _shmem_kb() -> int:
    for ln in open("/proc/self/status").read().splitlines():
        if ln.startswith("RssShmem:"):
            return int(ln.split()[1])
    raise AssertionError("no RssShmem")


def test_zero_pages_are_released_and_data_kept() -> None:
    fd = os.memfd_create("zeropages-test")
    try:
        os.ftruncate(fd, SIZE)
        m = mmap.mmap(fd, SIZE)
        for off in range(0, SIZE, PAGE):  # a read fault on shmem allocates: all resident
            m[off]
        marks = {PAGE * 3: 1, CHUNK + PAGE - 1: 2, 5 * CHUNK: 3, SIZE - 1: 4}  # page edges too
        for off, v in marks.items():
            m[off] = v
        before = _shmem_kb()
        released = release_zero_pages(fd)
        assert released == SIZE - len(marks) * PAGE
        assert before - _shmem_kb() >= (released >> 10) * 0.9
        for off, v in marks.items():
            assert m[off] == v
        assert m[PAGE * 3 + 1] == 0 and m[PAGE * 2] == 0  # released pages read as zero
        m[PAGE * 2] = 9  # and are writable again
        assert m[PAGE * 2] == 9
        m.close()
    finally:
        os.close(fd)


def test_nothing_to_release_in_a_full_file() -> None:
    fd = os.memfd_create("zeropages-test")
    try:
        os.write(fd, b"\x01" * (CHUNK + PAGE))
        assert release_zero_pages(fd) == 0
        assert os.pread(fd, 8, CHUNK) == b"\x01" * 8
    finally:
        os.close(fd)

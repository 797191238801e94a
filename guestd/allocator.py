"""Keep glibc from handing bulk-transfer buffers back to the kernel after each use.

Moving data, guestd allocates and frees one 256 KiB-1 MiB bytes object per
pipe read, upload message or file chunk. With glibc's defaults each such
buffer is a fresh mmap (or heap top that is trimmed on free), so every byte
moved also costs a page fault and a page zeroing: measured here, 15-40% of
the stdout and upload throughput. Raising the mmap and trim thresholds lets
freed buffers be reused from the heap, keeping at most TRIM_KEEP bytes of
free heap. Done on the first bulk transfer rather than at start, so a guest
boot never pays for importing ctypes; the settings apply only to guestd
itself (no MALLOC_* variable leaks into the processes it starts).
"""

from __future__ import annotations

import logging

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_FROM = 2 * 1024 * 1024  # buffers below this come from the heap
TRIM_KEEP = 8 * 1024 * 1024  # free heap kept for the next buffers

_done = False


def keep_bulk_buffers() -> None:
    """Idempotent and cheap after the first call."""
    global _done
    if _done:
        return
    _done = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_FROM) and libc.mallopt(M_TRIM_THRESHOLD,
                                                                        TRIM_KEEP)
    except (ImportError, OSError, AttributeError):  # no ctypes, or not glibc (musl: no mallopt)
        ok = False
    if not ok:
        logging.getLogger("guestd").debug("mallopt unavailable: bulk buffers not kept")

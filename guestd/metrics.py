"""Guest resource use from /proc/stat, /proc/meminfo and statvfs("/").

CPU use is a rate, so it needs two samples: each call reports the share of
all CPUs busy since the previous call (the first call: since boot). Calls
closer together than MIN_WINDOW wait out the rest of it, so a burst of
callers never reports 0/0 noise.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

MIN_WINDOW = 0.1


@dataclass(frozen=True)
class Sample:
    cpu_count: int
    cpu_used_pct: float
    mem_total: int
    mem_used: int
    disk_total: int
    disk_used: int


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields[:8])  # guest and guest_nice are already counted in user/nice
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return total - idle, total


def _meminfo() -> tuple[int, int]:
    vals: dict[str, int] = {}
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            key, _, rest = line.partition(b":")
            vals[key.decode()] = int(rest.split()[0]) * 1024
    total = vals["MemTotal"]
    avail = vals.get("MemAvailable", vals.get("MemFree", 0))
    return total, total - avail


class Metrics:
    def __init__(self) -> None:
        self._prev = (0, 0)
        self._prev_at = 0.0
        self._lock = asyncio.Lock()

    async def sample(self) -> Sample:
        async with self._lock:
            wait = self._prev_at + MIN_WINDOW - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            busy, total = _cpu_times()
            dbusy, dtotal = busy - self._prev[0], total - self._prev[1]
            self._prev, self._prev_at = (busy, total), time.monotonic()
        pct = max(0.0, min(100.0, 100.0 * dbusy / dtotal)) if dtotal > 0 else 0.0
        mem_total, mem_used = _meminfo()
        vfs = os.statvfs("/")
        disk_total = vfs.f_blocks * vfs.f_frsize
        disk_used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
        return Sample(os.cpu_count() or 1, pct, mem_total, mem_used, disk_total, disk_used)

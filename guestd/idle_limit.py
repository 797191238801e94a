"""An idle limit for a blocking transfer socket, kept by the kernel.

Python's socket timeout makes the socket non-blocking and polls before every
send and recv: a vsock sender is then woken, and returns to Python, on each
credit update the host sends (every few KiB), where a blocking send waits in
the kernel until its whole buffer is queued. In a TCG guest that cost ~40% of
the raw guest->host throughput (QEMU's CPU per 64 MiB: ~1.5 s blocking,
~2.1 s with a timeout, same sender otherwise). SO_SNDTIMEO/SO_RCVTIMEO bound
each blocking call instead: a call that moves no byte for that long fails with
EAGAIN (an OSError), as a Python timeout would (TimeoutError, also an OSError).
Set through libc because Python's setsockopt takes only integers on AF_VSOCK.
"""

from __future__ import annotations

import ctypes
import socket


class _Timeval(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


_libc = ctypes.CDLL(None, use_errno=True)


def block_with_idle_limit(conn: socket.socket, seconds: float) -> None:
    """`conn` blocking, each send/recv failing after `seconds` without progress.
    Falls back to Python's timeout (same limit, polled) where the kernel
    refuses the options."""
    tv = _Timeval(int(seconds), int(seconds % 1 * 1e6))
    conn.setblocking(True)
    for opt in (socket.SO_SNDTIMEO, socket.SO_RCVTIMEO):
        if _libc.setsockopt(conn.fileno(), socket.SOL_SOCKET, opt, ctypes.byref(tv),
                            ctypes.sizeof(tv)) != 0:
            conn.settimeout(seconds)
            return

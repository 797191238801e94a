"""systemd readiness notification (Type=notify) with a plain datagram socket."""

from __future__ import annotations

import os
import socket


def notify(state: str = "READY=1") -> bool:
    """Sends `state` to $NOTIFY_SOCKET; False when not run under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall(state.encode())
    return True

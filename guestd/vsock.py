"""vsock listening for a gRPC server that cannot: a byte relay to a unix socket.

The grpcio wheels are built without vsock support ("VSOCK is not supported"
from add_insecure_port), so guestd's gRPC server listens on a private unix
socket and this module accepts AF_VSOCK connections and copies bytes both
ways. In the guest the vsock transport (~tens of MB/s under TCG) is far
slower than this copy, so the relay costs little. The relay itself is
family-agnostic and is tested on the host with an AF_UNIX listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

log = logging.getLogger("guestd.vsock")
BUF = 256 * 1024


def vsock_listener(port: int, cid: int = socket.VMADDR_CID_ANY) -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.bind((cid, port))
    sock.listen(128)
    return sock


async def _pump(src: socket.socket, dst: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    buf = bytearray(BUF)
    view = memoryview(buf)
    while True:
        n = await loop.sock_recv_into(src, buf)
        if n == 0:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            return
        await loop.sock_sendall(dst, view[:n])


async def _relay(conn: socket.socket, target: str) -> None:
    loop = asyncio.get_running_loop()
    up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    up.setblocking(False)
    conn.setblocking(False)
    try:
        await loop.sock_connect(up, target)
        await asyncio.gather(_pump(conn, up), _pump(up, conn))
    except OSError as exc:
        log.debug("relay connection ended: %s", exc)
    finally:
        conn.close()
        up.close()


async def serve_relay(listener: socket.socket, target: str) -> None:
    """Accepts on `listener` and relays each connection to unix socket `target`
    until cancelled; cancellation closes every relayed connection."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    conns: set[asyncio.Task[None]] = set()
    try:
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = asyncio.create_task(_relay(conn, target))
            conns.add(task)
            task.add_done_callback(conns.discard)
    finally:
        for task in list(conns):
            task.cancel()
        await asyncio.gather(*conns, return_exceptions=True)
        listener.close()

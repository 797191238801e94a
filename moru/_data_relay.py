"""Connections to hostd's data relay: a unix socket beside hostd's where a
one-use ticket opens a byte stream to guestd's data listener (large files,
a command's output channel).

An address of scheme `unix-fd:` asks for a hand-over: once the ticket is
sent the relay passes the guest connection itself back (SCM_RIGHTS) and
steps out, so hostd copies none of the bytes, whose CPU the guest's vCPU
threads need on a small host.
"""

from __future__ import annotations

import asyncio
import socket

HANDOVER = "unix-fd"


class HandOverRefused(ConnectionError):
    """The relay closed without passing a connection (unknown or expired ticket)."""


async def connect(address: str, ticket: bytes) -> socket.socket:
    """A non-blocking socket that has sent `ticket`: the relay's, or after a
    hand-over the guest connection itself. OSError when it cannot be made."""
    scheme, _, path = address.partition(":")
    if scheme not in ("unix", HANDOVER):
        raise ConnectionError(f"data relay at {address!r}: only unix sockets are dialled")
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, path)
        await loop.sock_sendall(s, ticket)
        if scheme == HANDOVER:
            s = await _take_over(loop, s)
    except BaseException:
        s.close()
        raise
    return s


async def _take_over(loop: asyncio.AbstractEventLoop, relay: socket.socket) -> socket.socket:
    """The guest connection the relay passes back for our ticket. Closes `relay`."""
    try:
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(relay, 1, 1)
                break
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_reader(relay.fileno(), _set_done, ready)
                try:
                    await ready
                finally:
                    loop.remove_reader(relay.fileno())
    finally:
        relay.close()
    if not fds:
        raise HandOverRefused("the data relay closed without passing the guest connection")
    guest = socket.socket(fileno=fds[0])
    guest.setblocking(False)  # the flag came with the fd from hostd's event loop
    return guest


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)

"""Relays guestd's data listener (bulk file transfers) to hostd's clients.

guestd answers Filesystem.OpenRead/OpenWrite with a one-use ticket for its
data listener, which is a vsock port inside the guest. hostd forwards those
calls (hostd.passthrough), keeps the guest's ticket and hands the client a
ticket of its own plus the address of this relay, a unix socket next to
hostd's gRPC socket. A client connects there and sends hostd's ticket; the
relay dials the guest's port, sends the guest's ticket and then copies bytes
both ways until either side closes, so the byte protocol is guestd's own
(docs/guestd.md). Tickets are one-use and expire with guestd's (30 s).

A ticket issued with `hand_over` (a command's output channel, whose reader
is a local SDK) is answered differently: once the guest's ticket is sent,
the relay passes the guest connection itself to the client (SCM_RIGHTS) and
steps out, so hostd copies none of the output; its address says so
(`unix-fd:`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hostd.errors import Unavailable
from hostd.vsock import dial_socket
from moru_proto.guest.v1 import filesystem_pb2

log = logging.getLogger(__name__)

TICKET_BYTES = 32
TICKET_SECONDS = 30.0
TICKET_WAIT = 10.0  # a client that sends no ticket this long is closed
DIAL_SECONDS = 10.0
BUFFER = 1024 * 1024
MAX_TICKETS = 4096
HANDOVER = "unix-fd"  # address scheme of a hand_over ticket

# sandbox id -> the hybrid-vsock socket of its VM; raises hostd errors.
VsockOf = Callable[[str], Path]


@dataclass(frozen=True)
class _Ticket:
    sandbox_id: str
    guest_ticket: bytes
    port: int
    expires: float
    hand_over: bool = False


def guest_port(address: str) -> int:
    scheme, _, port = address.partition(":")
    if scheme != "vsock" or not port.isdigit():
        raise Unavailable(f"guest data listener at {address!r} is not a vsock port")
    return int(port)


class DataRelay:
    def __init__(self, path: Path, vsock_of: VsockOf) -> None:
        self.path = path
        self._vsock_of = vsock_of
        self._tickets: dict[bytes, _Ticket] = {}
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Future[None] | None = None
        self._conns: set[asyncio.Future[None]] = set()

    @property
    def address(self) -> str:
        return f"unix:{self.path}"

    def issue(self, sandbox_id: str, transfer: bytes, hand_over: bool = False) -> bytes:
        """guestd's serialized Transfer -> the one a client gets (our ticket and address)."""
        t = filesystem_pb2.Transfer.FromString(transfer)
        port = guest_port(t.address)
        now = time.monotonic()
        if len(self._tickets) >= MAX_TICKETS:
            self._tickets = {k: v for k, v in self._tickets.items() if v.expires > now}
        ticket = secrets.token_bytes(TICKET_BYTES)
        self._tickets[ticket] = _Ticket(sandbox_id, t.ticket, port, now + TICKET_SECONDS,
                                        hand_over)
        t.ticket = ticket
        t.address = f"{HANDOVER}:{self.path}" if hand_over else self.address
        return t.SerializeToString()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.ensure_future(self._accept_loop(listener))

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            client, _ = await loop.sock_accept(listener)
            client.setblocking(False)
            task = asyncio.ensure_future(self._connection(client))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _connection(self, client: socket.socket) -> None:
        try:
            await self._serve(client)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            log.info("data relay: connection ended: %s", e)
        except Exception:  # a bad ticket's sandbox is gone, etc.: never the accept loop
            log.exception("data relay: connection failed")
        finally:
            client.close()

    async def _serve(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(TICKET_WAIT):
            ticket = await _recv_exactly(loop, client, TICKET_BYTES)
        entry = self._tickets.pop(ticket, None)
        if entry is None or entry.expires < time.monotonic():
            log.info("data relay: unknown or expired ticket")
            return
        guest = await dial_socket(self._vsock_of(entry.sandbox_id), entry.port, DIAL_SECONDS)
        try:
            await loop.sock_sendall(guest, entry.guest_ticket)
            if entry.hand_over:
                socket.send_fds(client, [b"\0"], [guest.fileno()])
                return
            up = asyncio.ensure_future(_copy(loop, client, guest))
            down = asyncio.ensure_future(_copy(loop, guest, client))
            try:
                # Either side closing ends the transfer (hybrid vsock has no half-close).
                await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
                if down.done() and not up.done():
                    up.cancel()
                elif up.done() and not down.done():
                    down.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
            finally:
                up.cancel()
                down.cancel()
        finally:
            guest.close()


async def _recv_exactly(loop: asyncio.AbstractEventLoop, s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        more = await loop.sock_recv(s, n - len(out))
        if not more:
            raise asyncio.IncompleteReadError(bytes(out), n)
        out += more
    return bytes(out)


async def _copy(loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket) -> None:
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    while True:
        n = await loop.sock_recv_into(src, buf)
        if n == 0:
            return
        await loop.sock_sendall(dst, view[:n])

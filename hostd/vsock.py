"""Hybrid vsock: reaching a port inside a guest through the vsock device's unix socket.

vhost-device-vsock (and Firecracker) expose the guest's vsock as one unix
socket on the host: connect, send `CONNECT <port>\\n`, read one line
`OK <n>\\n`, and from then on the stream is the guest connection. `<n>` is
device-specific (a host-side port for Firecracker), so it is parsed, not
compared.

grpc Python cannot dial such a socket itself (it cannot run the handshake),
so `VsockRelay` listens on a plain unix socket that grpc can dial and pumps
bytes to and from a hybrid-vsock connection per accepted connection. The
pump is a pair of asyncio protocols writing straight into each other's
transports: no task hop per chunk, flow control via pause/resume_reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from pathlib import Path
from typing import cast

_MAX_LINE = 128
# Per-direction bytes buffered before the reading side is paused.
_HIGH_WATER = 4 << 20
_SOCK_BUF = 4 << 20


class VsockError(ConnectionError):
    """The device refused or closed the connection (guest port not listening yet, VM gone)."""


async def _handshake(sock: socket.socket, port: int) -> None:
    """Sends CONNECT and consumes exactly the `OK ...` line (leaving guest bytes unread)."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, f"CONNECT {port}\n".encode())
    line = b""
    while True:
        # Peek, then take only up to the newline: the guest may already have
        # sent its first bytes, which belong to the caller.
        data = await _recv_peek(loop, sock)
        if not data:
            raise VsockError(f"vsock port {port}: connection closed during handshake")
        nl = data.find(b"\n")
        take = len(data) if nl < 0 else nl + 1
        line += await loop.sock_recv(sock, take)
        if nl >= 0:
            break
        if len(line) > _MAX_LINE:
            raise VsockError(f"vsock port {port}: handshake line too long: {line[:64]!r}")
    text = line.decode("ascii", "replace").strip()
    if not text.startswith("OK"):
        raise VsockError(f"vsock port {port}: handshake refused: {text!r}")


async def _recv_peek(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    fd = sock.fileno()
    while True:
        try:
            return sock.recv(_MAX_LINE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            pass
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, fut.set_result, None)
        try:
            await fut
        finally:
            loop.remove_reader(fd)


async def dial_socket(uds: Path, port: int, timeout: float) -> socket.socket:  # noqa: ASYNC109
    """A connected, non-blocking socket to guest port `port` (handshake done)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            try:
                await loop.sock_connect(sock, str(uds))
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise VsockError(f"vsock socket {uds}: {e.strerror}") from e
            await _handshake(sock, port)
    except TimeoutError:
        sock.close()
        raise TimeoutError(f"vsock port {port} via {uds}: no answer in {timeout:.1f}s") from None
    except BaseException:
        sock.close()
        raise
    return sock


async def dial(
    uds: Path,
    port: int,
    timeout: float,  # noqa: ASYNC109
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams to guest port `port` through the hybrid-vsock socket `uds`.

    Raises VsockError when nothing listens on the port (yet), TimeoutError
    when the handshake takes longer than `timeout`.
    """
    sock = await dial_socket(uds, port, timeout)
    return await asyncio.open_unix_connection(sock=sock, limit=1 << 20)


async def wait_ready(
    uds: Path,
    port: int,
    deadline: float,
    *,
    interval: float = 0.02,
    alive: object | None = None,
) -> None:
    """Polls until a guest listens on `port`.

    `deadline` is a `time.monotonic()` value. `alive`, when given, is a
    zero-argument callable: once it returns false (the VMM died) waiting
    stops early. Raises TimeoutError (with the last error) past the deadline.
    """
    last: BaseException | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"guest vsock port {port} not ready: {last}")
        if callable(alive) and not alive():
            raise VsockError(f"guest vsock port {port}: the VM is gone ({last})")
        try:
            sock = await dial_socket(uds, port, min(remaining, 2.0))
        except (OSError, TimeoutError) as e:
            last = e
        else:
            sock.close()
            return
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))


class _Pump(asyncio.Protocol):
    """One side of a relayed connection; writes what it reads into its peer."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.peer: _Pump | None = None
        self.eof = False
        self.pending: list[bytes] = []  # read before the peer was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUF)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUF)
        if self.peer is not None and self.peer.transport is None:
            # The other side is not connected yet: hold our bytes in the kernel.
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None or peer.eof:
            self.conn.close()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        return True  # keep the other direction open (half close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.close(abort=exc is not None)

    # Our transport's write buffer is full: stop reading from the peer.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Conn:
    """A relayed pair: the grpc client side and the guest side."""

    def __init__(self, relay: VsockRelay) -> None:
        self.relay = relay
        self.client = _Pump(self)
        self.guest = _Pump(self)
        self.client.peer = self.guest
        self.guest.peer = self.client
        self.closed = False
        relay._conns.add(self)

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.relay._conns.discard(self)
        for side in (self.client, self.guest):
            if side.transport is not None:
                if abort:
                    side.transport.abort()
                else:
                    side.transport.close()  # flushes what is buffered first


class VsockRelay:
    """A unix socket at `path` whose connections are relayed to guest port `port`.

    `target` is what `grpc.aio.insecure_channel` takes. A connection whose
    guest side cannot be dialed is closed at once (grpc then retries).
    """

    def __init__(self, path: Path, uds: Path, port: int, dial_timeout: float = 5.0) -> None:
        self.path = path
        self.uds = uds
        self.port = port
        self.dial_timeout = dial_timeout
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Conn] = set()
        self._dials: set[asyncio.Task[None]] = set()

    @property
    def target(self) -> str:
        return f"unix:{self.path}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await loop.create_unix_server(self._accept, str(self.path))

    def _accept(self) -> _Pump:
        conn = _Conn(self)
        task = asyncio.get_running_loop().create_task(self._connect_guest(conn))
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)
        return conn.client

    async def _connect_guest(self, conn: _Conn) -> None:
        client = conn.client
        loop = asyncio.get_running_loop()
        try:
            sock = await dial_socket(self.uds, self.port, self.dial_timeout)
            await loop.connect_accepted_socket(lambda: conn.guest, sock)
        except (OSError, TimeoutError):
            conn.close(abort=True)
            return
        except asyncio.CancelledError:
            conn.close(abort=True)
            raise
        if conn.closed:
            if conn.guest.transport is not None:
                conn.guest.transport.abort()
            return
        guest = conn.guest.transport
        if guest is not None and client.pending:
            guest.writelines(client.pending)
            client.pending.clear()
        if client.transport is not None and not client.eof:
            client.transport.resume_reading()

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def close(self) -> None:
        """Stops listening, drops every relayed connection and removes the socket."""
        if self._server is not None:
            self._server.close()
        for task in list(self._dials):
            task.cancel()
        if self._dials:
            await asyncio.gather(*self._dials, return_exceptions=True)
        for conn in list(self._conns):
            conn.close(abort=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def __aenter__(self) -> VsockRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

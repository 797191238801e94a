"""A command's output over the data listener: length-prefixed frames, not gRPC events.

Each output event through gRPC costs guestd a message's worth of Python and
HTTP/2 work, and hostd the same again; in a TCG guest that, not vsock, bounds
output streaming. With StartRequest.output_channel the start event carries a
one-use ticket for the data listener (guestd.transfers). Output goes as data
events until the client connects (`connected`); the stream then stops
following, sends ToChannel and lets this sender write the rest as frames
(format in process.proto, OutputChannel) straight from the process's
`OutputLog`: no copy, one send per chunk. The stream stays open for the end
event, which it sends only after the channel has sent everything (so a
client that reads the channel to its close and then the stream keeps order).

Sends block in a worker thread (the GIL is released while the kernel copies):
vsock reports a socket writable whenever the host returns any credit, so a
non-blocking send from the event loop woke guestd for every few KiB and cost
it more CPU in a TCG guest than the copy itself.

The sender uses the stream's own cursor, so backpressure and replay work as
for data events. If the channel breaks, or its ticket is never used, the
sender gives up and the stream sends the rest as data events from where the
cursor stands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from guestd.process.events import Data, Dropped, End
from guestd.process.manager import ManagedProcess

if TYPE_CHECKING:
    from guestd.process.output import Cursor

log = logging.getLogger("guestd.process.channel")

HEADER = struct.Struct(">BI")  # kind, length
KINDS = {"stdout": 1, "stderr": 2, "pty": 3}
DROPPED = 4
END = 5
DROPPED_BODY = struct.Struct(">QQQ")  # stdout, stderr, pty bytes
JOIN_BELOW = 64 * 1024  # smaller data goes out with its header in one send
SENDERS = 64  # channels sending at once; a client that stops reading holds one
_pool: ThreadPoolExecutor | None = None


def _senders() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(SENDERS, thread_name_prefix="output")
    return _pool


def _send_all(conn: socket.socket, bufs: list[bytes | memoryview]) -> None:
    for buf in bufs:
        conn.sendall(buf)


def frame_parts(ev: Data | Dropped | End) -> list[bytes | memoryview]:
    """The frame for one event as the buffers to send (data is not copied when large)."""
    if isinstance(ev, Data):
        n = sum(len(p) for p in ev.parts)
        head = HEADER.pack(KINDS[ev.kind], n)
        if n < JOIN_BELOW:
            return [b"".join((head, *ev.parts))]
        return [head, *ev.parts]
    if isinstance(ev, Dropped):
        b = ev.bytes_by_kind
        body = DROPPED_BODY.pack(b.get("stdout", 0), b.get("stderr", 0), b.get("pty", 0))
        return [HEADER.pack(DROPPED, len(body)) + body]
    return [HEADER.pack(END, 0)]


class OutputSender:
    """Sends one reader's output over a data-listener connection."""

    def __init__(self, proc: ManagedProcess, cursor: Cursor, keepalive: float) -> None:
        self._proc = proc
        self._cursor = cursor
        self._keepalive = keepalive
        loop = asyncio.get_running_loop()
        self.connected: asyncio.Future[None] = loop.create_future()
        self._go: asyncio.Future[None] = loop.create_future()
        self._done: asyncio.Future[bool] = loop.create_future()
        self._task: asyncio.Task[object] | None = None
        self._conn: socket.socket | None = None
        self._closed = False

    async def run(self, conn: socket.socket) -> None:
        """Serves the connection until the end frame is sent, the peer goes or close()."""
        if self._closed or self._done.done():
            return
        self._task = asyncio.current_task()
        self._conn = conn
        loop = asyncio.get_running_loop()
        sent_end = False
        self.connected.set_result(None)
        self._proc.wake()  # the stream stops following and hands the cursor over
        try:
            await self._go  # the stream has stopped following this cursor
            conn.setblocking(True)
            async for ev in self._proc.follow(self._cursor, self._keepalive):
                if isinstance(ev, Data | Dropped | End):
                    await loop.run_in_executor(_senders(), _send_all, conn, frame_parts(ev))
                    sent_end = isinstance(ev, End)
        except OSError as exc:  # the client or hostd's relay went away
            log.info("output channel of pid %d ended early: %r", self._proc.pid, exc)
        finally:
            self._task = None
            self._conn = None
            self._finish(sent_end)

    def start_sending(self) -> None:
        """Called by the stream once it no longer follows the cursor."""
        if not self._go.done():
            self._go.set_result(None)

    def _finish(self, sent_end: bool) -> None:
        if not self._done.done():
            self._done.set_result(sent_end)

    def discard(self) -> None:
        """The ticket expired unused (or guestd stops): the stream carries the output."""
        self._finish(False)

    def close(self) -> None:
        """The stream ended (client gone, guestd stopping): stop sending."""
        self._closed = True
        if self._conn is not None:  # wakes a send blocked in its thread
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)
        if self._task is not None:
            self._task.cancel()
        self._finish(False)

    async def wait(self, patience: float) -> bool | None:
        """True: everything through the end was sent; False: the rest goes as
        data events; None: still sending after `patience` seconds."""
        done, _ = await asyncio.wait({self._done}, timeout=patience)
        return self._done.result() if done else None

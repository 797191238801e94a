"""The data listener: file reads and writes as plain bytes on a socket of their own.

gRPC in Python copies every byte several times (into a message, into HTTP/2
frames, out again) and runs it all on one event loop. For bulk data a client
that can reach guestd directly asks with Filesystem.OpenRead or OpenWrite,
which check the request exactly as Read and Write do, under the same access
token, and return a one-use ticket. The client connects to the data
listener and sends the ticket; then a read is the file's bytes, read with
O_DIRECT by a second thread into aligned buffers and sent from them, and a
write is the bytes received into aligned buffers that a second thread writes
with O_DIRECT, followed by a TransferResult frame: either way the guest CPU
copies each byte once, as the raw vsock floor does (under TCG every guest
copy is emulated and was the bottleneck). Small reads, and files where
O_DIRECT is refused, are sent from a mapping of the page cache. Each
transfer runs in a worker thread with blocking syscalls, off the event loop,
so a big transfer never delays a command's events.

The ticket (32 random bytes) is the only credential on this socket: it was
issued over an authenticated call, is single-use and expires after
TICKET_TTL seconds. A connection that does not send a valid ticket within
TICKET_WAIT seconds is closed without a byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import queue
import socket
import stat
import struct
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc

from guestd.allocator import keep_bulk_buffers
from guestd.errors import FailedPrecondition, status_of
from guestd.fileio import DIRECT_ALIGN, ReadSource, Upload
from guestd.idle_limit import block_with_idle_limit
from moru_proto.guest.v1 import filesystem_pb2 as pb

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("guestd.transfers")
TICKET_BYTES = 32
TICKET_TTL = 30.0  # an issued ticket not used by then is dropped
TICKET_WAIT = 10.0  # a connection has this long to send its ticket
IDLE_TIMEOUT = 60.0  # a transfer whose peer moves no byte for this long fails
WORKERS = 8  # transfers running at once; more wait their turn
RECV_BUFFER = 1024 * 1024
AF_VSOCK = getattr(socket, "AF_VSOCK", -1)
DIRECT_MIN = 4 * RECV_BUFFER  # uploads from this size are written with O_DIRECT
DIRECT_BUFFERS = 3  # per upload: one being received, up to two being written
MAP_WINDOW = 8 * 1024 * 1024  # a read maps this much of the file at a time
VSOCK_BUFFER = 4 * 1024 * 1024  # per-connection vsock buffer: fewer credit stalls


def result_frame(result: pb.TransferResult) -> bytes:
    body = result.SerializeToString()
    return struct.pack(">I", len(body)) + body


def _send_file(conn: socket.socket, src: ReadSource, offset: int, length: int) -> None:
    """Stops early if the file shrank since OpenRead: the client sees a short read."""
    if not length:
        return
    if stat.S_ISREG(os.fstat(src.fd).st_mode):
        if length >= DIRECT_MIN and _set_direct(src.fd, True):
            _send_direct(conn, src.fd, offset, length)
            return
        try:
            _send_mapped(conn, src.fd, offset, length)
            return
        except _NotMappable:
            pass
    _send_copied(conn, src.fd, offset, length)


def _set_direct(fd: int, on: bool) -> bool:
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        return False  # a file system without O_DIRECT (tmpfs on older kernels)
    return True


def _send_direct(conn: socket.socket, fd: int, offset: int, length: int) -> None:
    """A second thread reads the file with O_DIRECT into page-aligned buffers
    while this one sends them: the disk device fills the buffers, so the guest
    CPU copies each byte once (into the socket) and no page is added to the
    page cache. A file just uploaded through here is not cached, and filling
    the cache page by page cost more under TCG than the copy it saves: QEMU's
    CPU per 64 MiB read was ~2.6 s from a mapping of an uncached file, ~1.7 s
    this way (~1.7 s from a mapping of a cached one; raw vsock source ~1.4 s).
    The kernel writes dirty cached pages back before it reads around them."""
    end = offset + length
    pos = offset - offset % DIRECT_ALIGN

    def read(buf: mmap.mmap) -> tuple[int, int, bool] | None:
        nonlocal pos
        if pos >= end:
            return None
        try:
            n = os.preadv(fd, [buf], pos)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not _set_direct(fd, False):
                raise
            n = os.preadv(fd, [buf], pos)  # an alignment this device will not take
        piece = (max(0, offset - pos), min(n, end - pos), n < len(buf))  # short: the file's end
        pos += n
        return piece

    _through_buffers(read, conn.sendall, fill_aside=True)


def _through_buffers(fill: Callable[[mmap.mmap], tuple[int, int, bool] | None],
                     drain: Callable[[memoryview], object], *, fill_aside: bool) -> None:
    """Moves data through DIRECT_BUFFERS page-aligned buffers between two threads,
    so neither side waits for the other's syscalls (disk against socket).

    `fill` puts the next piece into a buffer and returns (start, stop, last) of
    the bytes to pass on, or None when there is nothing more; `drain` takes
    each piece. One of them runs in a second thread (the filling one with
    `fill_aside`). An error on either side stops both and is raised here."""
    buffers = [mmap.mmap(-1, RECV_BUFFER) for _ in range(DIRECT_BUFFERS)]
    free: queue.SimpleQueue[mmap.mmap | None] = queue.SimpleQueue()
    full: queue.SimpleQueue[tuple[mmap.mmap, int, int] | None] = queue.SimpleQueue()
    failed: list[BaseException] = []
    for b in buffers:
        free.put(b)

    def filling() -> None:
        try:
            while (buf := free.get()) is not None and (piece := fill(buf)) is not None:
                start, stop, last = piece
                full.put((buf, start, stop))
                if last:
                    break
        finally:
            full.put(None)

    def draining() -> None:
        try:
            while (item := full.get()) is not None:
                buf, start, stop = item
                if stop > start:
                    with memoryview(buf) as whole, whole[start:stop] as part:
                        drain(part)
                free.put(buf)
        finally:
            free.put(None)

    def aside() -> None:
        try:
            (filling if fill_aside else draining)()
        except BaseException as exc:  # handed to the calling thread
            failed.append(exc)

    helper = threading.Thread(target=aside, name="transfer-" + ("read" if fill_aside else "write"),
                              daemon=True)  # fmt: skip
    helper.start()
    try:
        (draining if fill_aside else filling)()
    finally:
        # Whichever way this side ended, the helper's next wait returns None.
        free.put(None)
        full.put(None)
        helper.join()
        for b in buffers:
            b.close()
    if failed:
        raise failed[0]


class _NotMappable(Exception):
    pass


def _send_mapped(conn: socket.socket, fd: int, offset: int, length: int) -> None:
    """send(2) straight from the page cache through MAP_WINDOW-sized mappings:
    the guest CPU copies each byte once (into the socket), where pread + send
    copied it twice. Under TCG every guest copy is emulated: QEMU's CPU per
    64 MiB read went from ~2.4 s to ~1.7 s (the raw vsock source: ~1.4 s).
    A file truncated meanwhile makes send fail with EFAULT (a kernel copy,
    not a SIGBUS in guestd): the transfer ends short, as with pread."""
    end = offset + length
    pos = offset - offset % mmap.ALLOCATIONGRANULARITY
    skip = offset - pos
    while pos + skip < end:
        stop = min(end, pos + MAP_WINDOW, os.fstat(fd).st_size)
        if stop <= pos + skip:
            return  # the file shrank
        try:
            m = mmap.mmap(fd, stop - pos, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                          mmap.PROT_READ, offset=pos)
        except OSError:
            if pos + skip == offset:
                raise _NotMappable from None  # a file system without mmap: copy instead
            raise
        try:
            if stop < end:  # the disk reads the next window while this one is sent
                os.posix_fadvise(fd, stop, MAP_WINDOW, os.POSIX_FADV_WILLNEED)
            with memoryview(m) as whole, whole[skip:] as part:
                conn.sendall(part)
        finally:
            m.close()
        pos, skip = stop, 0


def _send_copied(conn: socket.socket, fd: int, offset: int, length: int) -> None:
    """pread + send in RECV_BUFFER pieces (what cannot be mapped: /proc files,
    character devices). Not sendfile(2): vsock has no sendpage, so sendfile
    there sends page by page (0.21-0.28 of the raw vsock floor)."""
    buf = bytearray(RECV_BUFFER)
    view = memoryview(buf)
    end = offset + length
    while offset < end:
        n = os.preadv(fd, [view[:min(len(buf), end - offset)]], offset)
        if n == 0:
            return  # the file shrank
        conn.sendall(view[:n])
        offset += n


def _waiting(conn: socket.socket, discard: bool) -> bool:
    """Whether bytes are already waiting, without waiting for any (with
    `discard`, reads them away). Non-blocking mode for the probe: with a
    timeout set, Python waits for data even when asked not to."""
    timeout = conn.gettimeout()
    conn.setblocking(False)
    try:
        if not discard:
            return bool(conn.recv(1, socket.MSG_PEEK))
        while conn.recv(RECV_BUFFER):
            pass
        return False
    except OSError:  # BlockingIOError: nothing waiting; others: the peer is gone
        return False
    finally:
        conn.settimeout(timeout)


def _more_waiting(conn: socket.socket) -> bool:
    """Bytes beyond the announced size already here? (The client does not
    half-close: over hybrid vsock a shutdown(SHUT_WR) ends both directions.)"""
    return _waiting(conn, discard=False)


def _discard_waiting(conn: socket.socket) -> None:
    """Unread bytes would turn our close into a reset that loses the result."""
    _waiting(conn, discard=True)


def _receive_file(conn: socket.socket, upload: Upload) -> pb.TransferResult:
    size = upload.header.size
    try:
        if size >= DIRECT_MIN and upload.direct_io():
            _receive_direct(conn, upload, size)
        else:
            _receive_buffered(conn, upload, size)
        if upload.written == size and _more_waiting(conn):
            raise FailedPrecondition(f"size: header said {size} bytes, stream carried more;"
                                     f" {upload.path} unchanged")
        return pb.TransferResult(response=upload.finish())
    except Exception as exc:  # guestd errors name the field or path; see errors.py
        code, msg = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:  # unexpected: keep the traceback
            log.exception("write transfer failed", exc_info=exc)
        return pb.TransferResult(code=code.value[0], message=msg)
    finally:
        upload.abort()


def _receive_buffered(conn: socket.socket, upload: Upload, size: int) -> None:
    keep_bulk_buffers()
    buf = bytearray(min(RECV_BUFFER, max(size, 1)))
    view = memoryview(buf)
    while upload.written < size:
        n = conn.recv_into(view[: min(len(buf), size - upload.written)])
        if n == 0:
            return
        upload.write(view[:n])


def _recv_full(conn: socket.socket, view: memoryview) -> int:
    """Fills `view` unless the peer closes first; the byte count."""
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            break
        got += n
    return got


def _receive_direct(conn: socket.socket, upload: Upload, size: int) -> None:
    """Receives into page-aligned buffers that a second thread writes with
    O_DIRECT (Upload.direct_io), so receiving never waits for the disk. In a
    TCG guest QEMU's CPU per 64 MiB upload went from ~3.6 s (recv + buffered
    write) to ~1.7 s; the raw vsock sink costs ~1.6 s."""
    received = 0

    def receive(buf: mmap.mmap) -> tuple[int, int, bool] | None:
        nonlocal received
        if received >= size:
            return None
        want = min(len(buf), size - received)
        with memoryview(buf) as whole, whole[:want] as part:
            n = _recv_full(conn, part)
        received += n
        return 0, n, n < want  # short: the peer closed

    _through_buffers(receive, upload.write, fill_aside=False)


def _widen_vsock_buffer(conn: socket.socket) -> None:
    """A 4 MiB receive window instead of 256 KiB: the host side sends on
    without waiting for a credit update after every quarter MiB (QEMU's CPU
    per 64 MiB upload: ~2.4 s -> ~1.7 s with O_DIRECT writes)."""
    with contextlib.suppress(OSError, AttributeError):
        conn.setsockopt(AF_VSOCK, socket.SO_VM_SOCKETS_BUFFER_MAX_SIZE, VSOCK_BUFFER)
        conn.setsockopt(AF_VSOCK, socket.SO_VM_SOCKETS_BUFFER_SIZE, VSOCK_BUFFER)


class _Job:
    """What a ticket stands for, run once on a worker thread (or, with
    `run_async`, on the event loop: a command's output channel)."""

    def __init__(self, run: Callable[[socket.socket], None], discard: Callable[[], None],
                 run_async: Callable[[socket.socket], Awaitable[None]] | None = None) -> None:
        self.run = run
        self.discard = discard
        self.run_async = run_async


class Transfers:
    """Issued tickets and the data listener (one per guestd)."""

    def __init__(self, address: str = "") -> None:
        self.address = address  # "" when guestd has no data listener
        self._pending: dict[bytes, tuple[_Job, asyncio.TimerHandle]] = {}
        self._conns: set[socket.socket] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pool: ThreadPoolExecutor | None = None

    def require_listener(self) -> None:
        if not self.address:
            raise FailedPrecondition("address: this guestd has no data listener"
                                     " (start it with --data-listen); use Read or Write")

    def _issue(self, job: _Job) -> bytes:
        ticket = os.urandom(TICKET_BYTES)  # what secrets.token_bytes does, minus an import
        timer = asyncio.get_running_loop().call_later(TICKET_TTL, self._expire, ticket)
        self._pending[ticket] = (job, timer)
        return ticket

    def _expire(self, ticket: bytes) -> None:
        hit = self._pending.pop(ticket, None)
        if hit is not None:
            hit[0].discard()

    def issue_stream(self, run: Callable[[socket.socket], Awaitable[None]],
                     discard: Callable[[], None]) -> bytes:
        """A ticket whose connection `run` serves on the event loop, with no idle
        limit, for as long as it takes (guestd.process.channel)."""
        return self._issue(_Job(lambda _: None, discard, run))

    def revoke(self, ticket: bytes) -> None:
        """Drops an unused ticket now (its stream ended), as if it expired."""
        hit = self._pending.pop(ticket, None)
        if hit is not None:
            hit[1].cancel()
            hit[0].discard()

    def open_read(self, src: ReadSource, request: pb.ReadRequest) -> pb.Transfer:
        """Takes ownership of `src.fd` (see require_listener)."""
        length = src.available if not request.length else min(request.length, src.available)

        def run(conn: socket.socket) -> None:
            try:
                _send_file(conn, src, request.offset, length)
            finally:
                os.close(src.fd)

        ticket = self._issue(_Job(run, lambda: os.close(src.fd)))
        return pb.Transfer(ticket=ticket, address=self.address, length=length, info=src.info)

    def open_write(self, header: pb.WriteHeader) -> pb.Transfer:
        if not header.HasField("size"):
            raise FailedPrecondition("size: required for a write through the data listener")
        if header.append:
            raise FailedPrecondition("append: not supported through the data listener; use Write")
        self.require_listener()
        upload = Upload(header)

        def run(conn: socket.socket) -> None:
            conn.sendall(result_frame(_receive_file(conn, upload)))
            _discard_waiting(conn)

        ticket = self._issue(_Job(run, upload.abort))
        return pb.Transfer(ticket=ticket, address=self.address, length=header.size)

    async def serve(self, listener: socket.socket) -> None:
        """Accepts until cancelled; cancellation ends every transfer."""
        from concurrent.futures import ThreadPoolExecutor  # only with a listener: boot time

        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="transfer")
        try:
            while True:
                conn, _ = await loop.sock_accept(listener)
                log.debug("data listener: connection")
                task = asyncio.create_task(self._handle(conn))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            listener.close()
            for conn in list(self._conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for job, timer in self._pending.values():
                timer.cancel()
                job.discard()
            self._pending.clear()
            self._pool.shutdown(wait=False)

    async def _handle(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._conns.add(conn)
        try:
            conn.setblocking(False)
            ticket = b""
            async with asyncio.timeout(TICKET_WAIT):
                while len(ticket) < TICKET_BYTES:
                    more = await loop.sock_recv(conn, TICKET_BYTES - len(ticket))
                    if not more:
                        return
                    ticket += more
            hit = self._pending.pop(ticket, None)
            if hit is None:
                log.warning("data listener: unknown or expired ticket")
                return
            job, timer = hit
            timer.cancel()
            log.debug("data listener: transfer starts")
            if job.run_async is not None:
                await job.run_async(conn)
                return
            # Blocking calls on the worker, each waiting at most IDLE_TIMEOUT.
            block_with_idle_limit(conn, IDLE_TIMEOUT)
            if conn.family == AF_VSOCK:
                _widen_vsock_buffer(conn)
            await loop.run_in_executor(self._pool, job.run, conn)
        except (OSError, TimeoutError) as exc:
            log.info("data transfer ended early: %r", exc)
        finally:
            self._conns.discard(conn)
            conn.close()

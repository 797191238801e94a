"""Large files over hostd's data relay instead of gRPC messages.

gRPC in Python costs several copies and a message per MiB; hostd relays
guestd's data listener (Filesystem.OpenRead/OpenWrite hand out a one-use
ticket and a unix socket next to hostd's), where a file is one byte stream.
Used only for hostd on a unix socket (the relay is on the same machine) and
for files of at least DATA_MIN bytes; anything else, or a hostd without the
relay (UNIMPLEMENTED) or a guestd without a data listener (an older image),
takes Filesystem.Read/Write as before. The SDK asks hostd to hand over the
guest connection itself (HANDOVER_HEADER): hostd then copies none of the
bytes, whose CPU the guest's vCPU threads need on a small host.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from moru import _data_relay as data_relay
from moru._errors import from_status
from moru._guest import GuestTarget
from moru_proto.guest.v1 import filesystem_pb2 as pb

DATA_MIN = 4 * 1024 * 1024
T = TypeVar("T")
# Asked for with this (hostd.passthrough), hostd's relay hands over the guest
# connection itself (moru._data_relay).
HANDOVER_HEADER = ("moru-data-handover", "1")
_unavailable: set[str] = set()  # hostd addresses that answered UNIMPLEMENTED


def reachable(target: GuestTarget) -> bool:
    """hostd on a unix socket (its relay is on this machine), not known to lack one."""
    address = target.config.address
    return address.startswith("unix:") and address not in _unavailable


def usable(target: GuestTarget, size: int) -> bool:
    return size >= DATA_MIN and reachable(target)


async def _open(target: GuestTarget, method: str, request: Any, what: str) -> pb.Transfer | None:
    """The Transfer for `request`, or None when this hostd has no data relay."""
    try:
        call = getattr(target.filesystem(), method)
        t: pb.Transfer = await call(request, metadata=(*target.metadata, HANDOVER_HEADER),
                                    timeout=target.timeout)
        return t
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNIMPLEMENTED:
            _unavailable.add(target.config.address)
            return None
        if (e.code() == grpc.StatusCode.FAILED_PRECONDITION
                and "no data listener" in (e.details() or "")):
            return None  # an image whose guestd runs without one
        with target.errors(what):
            raise


async def _connect(t: pb.Transfer, what: str) -> socket.socket:
    """A blocking connection for t's bytes: the guest connection itself when
    the relay hands it over (`unix-fd:`), else the relay's."""
    try:
        s = await data_relay.connect(t.address, t.ticket)
    except data_relay.HandOverRefused as e:
        raise from_status(grpc.StatusCode.UNAVAILABLE, str(e), what=what) from None
    s.setblocking(True)
    return s


async def write(target: GuestTarget, header: pb.WriteHeader,
                data: memoryview) -> pb.WriteResponse | None:
    """Uploads `data` (header.size bytes); None when the relay is not there."""
    what = f"writing {header.path}"
    t = await _open(target, "OpenWrite", header, what)
    if t is None:
        return None
    loop = asyncio.get_running_loop()
    s = await _connect(t, what)
    try:
        try:
            await _blocking(s, lambda: _send_all(s, data))
        except (BrokenPipeError, ConnectionResetError):
            pass  # guestd stopped reading (an error): its result frame says why
        s.setblocking(False)
        frame = await _recv_exactly(loop, s, 4, what)
        result = pb.TransferResult.FromString(
            await _recv_exactly(loop, s, struct.unpack(">I", frame)[0], what))
    finally:
        s.close()
    if result.code:
        raise from_status(_code(result.code), result.message, what=what,
                          address=target.config.address, guest=True)
    return result.response


async def read(target: GuestTarget, request: pb.ReadRequest) -> bytes | None:
    """The file from request.offset on, all of it through the relay; None when
    the relay is not there. Received straight into the bytes object returned
    (no buffer to zero first, no copy at the end: ~100 ms of host CPU per
    64 MiB that the guest's vCPUs need on a small host)."""
    what = f"reading {request.path}"
    t = await _open(target, "OpenRead", request, what)
    if t is None:
        return None
    s = await _connect(t, what)
    try:
        out = await _blocking(s, lambda: _recv_bytes(s, t.length))
    finally:
        s.close()
    _check_whole(target, request.path, len(out), t.length, what)
    return out


async def read_after(target: GuestTarget, request: pb.ReadRequest, head: bytes | bytearray,
                     first: pb.EntryInfo) -> bytearray | None:
    """`head` followed by the file from request.offset on, in one buffer; None
    when the relay is not there or the file is no longer the one `first`
    describes (replaced or changed since the head was read: read it whole)."""
    what = f"reading {request.path}"
    t = await _open(target, "OpenRead", request, what)
    if t is None:
        return None
    if t.info.size != first.size or t.info.modified_time != first.modified_time:
        return None  # the unused ticket expires in guestd
    out = bytearray(len(head) + t.length)  # zero pages from the kernel: no copy of them
    out[: len(head)] = head
    s = await _connect(t, what)
    try:
        with memoryview(out) as whole, whole[len(head):] as rest:
            got = await _blocking(s, lambda: _recv_all(s, rest))
    finally:
        s.close()
    _check_whole(target, request.path, got, t.length, what)
    return out


def _check_whole(target: GuestTarget, path: str, got: int, length: int, what: str) -> None:
    """ABORTED when fewer bytes came than the ticket promised (the file shrank meanwhile)."""
    if got < length:
        raise from_status(grpc.StatusCode.ABORTED,
                          f"path: {path} changed during the read: {got} of {length} bytes arrived",
                          what=what, address=target.config.address, guest=True)


async def _blocking(s: socket.socket, move: Callable[[], T]) -> T:
    """`move` in a worker thread on the blocking socket `s`: one C loop of
    large syscalls instead of an event-loop wakeup per socket buffer (the SDK
    spent ~250 ms of CPU per 64 MiB read, on a host whose cores the guest's
    vCPUs need). Cancelling shuts the socket down, which ends `move`."""
    job = asyncio.ensure_future(asyncio.to_thread(move))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        await asyncio.gather(job, return_exceptions=True)
        raise


def _send_all(s: socket.socket, view: memoryview) -> int:
    s.sendall(view)
    return len(view)


def _recv_bytes(s: socket.socket, n: int) -> bytes:
    """`n` bytes, fewer if the peer closes first: recv fills the bytes object
    it returns, so one MSG_WAITALL call is the whole read."""
    data = s.recv(n, socket.MSG_WAITALL)
    if len(data) == n or not data:
        return data
    more = bytearray(data)  # a signal cut the call short, or the peer closed
    while len(more) < n and (piece := s.recv(n - len(more), socket.MSG_WAITALL)):
        more += piece
    return bytes(more)


def _recv_all(s: socket.socket, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = s.recv_into(view[got:], 0, socket.MSG_WAITALL)
        if n == 0:
            break
        got += n
    return got


async def _recv_exactly(loop: asyncio.AbstractEventLoop, s: socket.socket, n: int,
                        what: str) -> bytes:
    out = bytearray()
    while len(out) < n:
        more = await loop.sock_recv(s, n - len(out))
        if not more:
            raise from_status(grpc.StatusCode.UNAVAILABLE,
                              "data relay closed the connection without a result", what=what)
        out += more
    return bytes(out)


def _code(n: int) -> grpc.StatusCode:
    for c in grpc.StatusCode:
        if c.value[0] == n:
            return c
    return grpc.StatusCode.UNKNOWN

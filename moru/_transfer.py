"""Large files over hostd's data relay instead of gRPC messages.

gRPC in Python costs several copies and a message per MiB; hostd relays
guestd's data listener (Filesystem.OpenRead/OpenWrite hand out a one-use
ticket and a unix socket next to hostd's), where a file is one byte stream.
Used only for hostd on a unix socket (the relay is on the same machine) and
for files of at least DATA_MIN bytes; anything else, or a hostd without the
relay (UNIMPLEMENTED) or a guestd without a data listener (an older image),
takes Filesystem.Read/Write as before.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import grpc

from moru._errors import from_status
from moru._guest import GuestTarget
from moru_proto.guest.v1 import filesystem_pb2 as pb

DATA_MIN = 4 * 1024 * 1024
_unavailable: set[str] = set()  # hostd addresses that answered UNIMPLEMENTED


def usable(target: GuestTarget, size: int) -> bool:
    address = target.config.address
    return size >= DATA_MIN and address.startswith("unix:") and address not in _unavailable


async def _open(target: GuestTarget, method: str, request: Any, what: str) -> pb.Transfer | None:
    """The Transfer for `request`, or None when this hostd has no data relay."""
    try:
        call = getattr(target.filesystem(), method)
        t: pb.Transfer = await call(request, metadata=target.metadata, timeout=target.timeout)
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


async def _dial(address: str) -> socket.socket:
    scheme, _, path = address.partition(":")
    if scheme != "unix":
        raise ConnectionError(f"data relay at {address!r}: only unix sockets are dialled")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(s, path)
    except BaseException:
        s.close()
        raise
    return s


async def write(target: GuestTarget, header: pb.WriteHeader,
                data: memoryview) -> pb.WriteResponse | None:
    """Uploads `data` (header.size bytes); None when the relay is not there."""
    what = f"writing {header.path}"
    t = await _open(target, "OpenWrite", header, what)
    if t is None:
        return None
    loop = asyncio.get_running_loop()
    s = await _dial(t.address)
    try:
        await loop.sock_sendall(s, t.ticket)
        try:
            await loop.sock_sendall(s, data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # guestd stopped reading (an error): its result frame says why
        frame = await _recv_exactly(loop, s, 4, what)
        result = pb.TransferResult.FromString(
            await _recv_exactly(loop, s, struct.unpack(">I", frame)[0], what))
    finally:
        s.close()
    if result.code:
        raise from_status(_code(result.code), result.message, what=what,
                          address=target.config.address, guest=True)
    return result.response


async def read_into(target: GuestTarget, request: pb.ReadRequest, buf: bytearray) -> bool:
    """Appends the requested range to `buf`; False when the relay is not there."""
    what = f"reading {request.path}"
    t = await _open(target, "OpenRead", request, what)
    if t is None:
        return False
    loop = asyncio.get_running_loop()
    start = len(buf)
    buf.extend(bytes(t.length))  # one allocation; received straight into it
    view = memoryview(buf)[start:]
    got = 0
    s = await _dial(t.address)
    try:
        await loop.sock_sendall(s, t.ticket)
        while got < t.length:
            n = await loop.sock_recv_into(s, view[got:])
            if n == 0:
                break
            got += n
    finally:
        view.release()
        s.close()
    if got < t.length:
        del buf[start + got:]
        raise from_status(grpc.StatusCode.ABORTED,
                          f"path: {request.path} changed during the read:"
                          f" {got} of {t.length} bytes arrived",
                          what=what, address=target.config.address, guest=True)
    return True


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

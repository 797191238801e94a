"""A client of guestd's data listener (guestd.transfers): the reference for the
byte protocol, used by the tests and benchmarks on the host.

    info, n = read_file(fs_stub, pb.ReadRequest(path="/big"), sink.write)
    resp = write_file(fs_stub, pb.WriteHeader(path="/big", size=n), chunks)

`fs_stub` is a sync Filesystem stub on guestd; `metadata` carries the access
token when Init set one. Errors from the OpenRead/OpenWrite call are the
stub's grpc.RpcError; errors reported on the data socket are TransferError.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterable

import grpc

from moru_proto.guest.v1 import filesystem_pb2 as pb
from moru_proto.guest.v1 import filesystem_pb2_grpc

BUFFER = 1024 * 1024
Metadata = tuple[tuple[str, str | bytes], ...]


class TransferError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def connect(address: str, timeout: float = 60.0) -> socket.socket:
    """A socket to `unix:/PATH` or `tcp:HOST:PORT` (vsock is reached through hostd)."""
    scheme, _, rest = address.partition(":")
    if scheme == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(rest)
        return s
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    raise ValueError(f"address: cannot dial {address!r} from here")


def read_file(fs: filesystem_pb2_grpc.FilesystemStub, request: pb.ReadRequest,
              sink: Callable[[memoryview], object], *, metadata: Metadata = (),
              dial: Callable[[str], socket.socket] = connect) -> tuple[pb.EntryInfo, int]:
    """Streams the requested range into `sink` (views of one reused buffer)."""
    t: pb.Transfer = fs.OpenRead(request, metadata=metadata)
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    got = 0
    with dial(t.address) as s:
        s.sendall(t.ticket)
        while got < t.length:
            n = s.recv_into(buf, min(BUFFER, t.length - got))
            if n == 0:
                raise TransferError(grpc.StatusCode.ABORTED,
                                    f"path: {request.path} changed during the read:"
                                    f" {got} of {t.length} bytes arrived")
            sink(view[:n])
            got += n
    return t.info, got


def write_file(fs: filesystem_pb2_grpc.FilesystemStub, header: pb.WriteHeader,
               chunks: Iterable[bytes | memoryview], *, metadata: Metadata = (),
               dial: Callable[[str], socket.socket] = connect) -> pb.WriteResponse:
    """Uploads `chunks` (header.size bytes in all) and returns Write's response."""
    t: pb.Transfer = fs.OpenWrite(header, metadata=metadata)
    sent = 0
    with dial(t.address) as s:
        s.sendall(t.ticket)
        try:
            for chunk in chunks:
                sent += len(chunk)
                if sent > t.length:
                    break  # closing early: guestd discards the upload
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # guestd stopped reading (an error): its frame says why
        if sent != t.length:
            raise TransferError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"size: header said {t.length} bytes, chunks carried"
                                f" {'more' if sent > t.length else sent};"
                                f" {header.path} unchanged")
        frame = _recv_exactly(s, 4)
        result = pb.TransferResult.FromString(_recv_exactly(s, struct.unpack(">I", frame)[0]))
    if result.code:
        raise TransferError(grpc.StatusCode(_code(result.code)), result.message)
    return result.response


def _code(n: int) -> tuple[int, str]:
    for c in grpc.StatusCode:
        if c.value[0] == n:
            return c.value  # type: ignore[no-any-return]
    return grpc.StatusCode.UNKNOWN.value  # type: ignore[no-any-return]


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        more = s.recv(n - len(out))
        if not more:
            raise TransferError(grpc.StatusCode.UNAVAILABLE,
                                "data listener closed the connection without a result")
        out += more
    return bytes(out)

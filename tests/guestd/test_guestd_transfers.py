"""The data listener (guestd.transfers) against a real guestd: OpenRead/OpenWrite
tickets, bytes on a unix socket, the same checks and errors as Read/Write."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from guestd_harness import Guestd

from guestd.transfer_client import TransferError, connect, read_file, write_file
from moru_proto.guest.v1 import filesystem_pb2 as pb
from moru_proto.guest.v1 import guest_pb2

MB = 1024 * 1024


@pytest.fixture(scope="module")
def data_guestd() -> Iterator[Guestd]:
    g = Guestd(data_listener=True)
    yield g
    g.close()


def test_100mb_round_trip_same_sha256_bounded_rss(data_guestd: Guestd,
                                                  tmpdir_short: str) -> None:
    g = data_guestd
    path = f"{tmpdir_short}/deep/big.bin"
    block = os.urandom(MB)
    want = hashlib.sha256()
    chunks = [block[i:] + block[:i] for i in range(100)]
    for c in chunks:
        want.update(c)
    hwm0 = g.vm_hwm_kib()
    resp = write_file(g.fs, pb.WriteHeader(path=path, size=100 * MB, mode=0o600), chunks)
    assert resp.bytes_written == 100 * MB and resp.entry.size == 100 * MB
    assert resp.entry.mode == 0o600
    with open(path, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == want.hexdigest()
    got = hashlib.sha256()
    info, n = read_file(g.fs, pb.ReadRequest(path=path), got.update)
    assert n == 100 * MB and info.size == 100 * MB and got.hexdigest() == want.hexdigest()
    part = bytearray()
    _, n = read_file(g.fs, pb.ReadRequest(path=path, offset=MB + 5, length=1000), part.extend)
    assert n == 1000 and bytes(part) == (chunks[1][5:] + chunks[2])[:1000]
    # Neither direction buffers the file in guestd.
    assert g.vm_hwm_kib() - hwm0 < 40 * 1024
    assert [x for x in os.listdir(f"{tmpdir_short}/deep")] == ["big.bin"]


def test_open_checks_like_read_and_write(data_guestd: Guestd, tmpdir_short: str) -> None:
    fs = data_guestd.fs
    cases: list[tuple[Any, Any, grpc.StatusCode, str]] = [
        (fs.OpenRead, pb.ReadRequest(path="rel"), grpc.StatusCode.INVALID_ARGUMENT, "path"),
        (fs.OpenRead, pb.ReadRequest(path=f"{tmpdir_short}/x", offset=-1),
         grpc.StatusCode.INVALID_ARGUMENT, "offset"),
        (fs.OpenRead, pb.ReadRequest(path=f"{tmpdir_short}/nope"), grpc.StatusCode.NOT_FOUND,
         "nope"),
        (fs.OpenRead, pb.ReadRequest(path=tmpdir_short), grpc.StatusCode.FAILED_PRECONDITION,
         "directory"),
        (fs.OpenWrite, pb.WriteHeader(path=f"{tmpdir_short}/a"),
         grpc.StatusCode.FAILED_PRECONDITION, "size"),
        (fs.OpenWrite, pb.WriteHeader(path=f"{tmpdir_short}/a", size=1, append=True),
         grpc.StatusCode.FAILED_PRECONDITION, "append"),
        (fs.OpenWrite, pb.WriteHeader(path=tmpdir_short, size=1),
         grpc.StatusCode.FAILED_PRECONDITION, "directory"),
    ]
    for call, req, code, word in cases:
        with pytest.raises(grpc.RpcError) as e:
            call(req)
        assert e.value.code() == code, (req, e.value.details())
        assert word in (e.value.details() or "")
    assert os.listdir(tmpdir_short) == []


def test_wrong_size_leaves_target_untouched(data_guestd: Guestd, tmpdir_short: str) -> None:
    g = data_guestd
    path = f"{tmpdir_short}/keep.txt"
    write_file(g.fs, pb.WriteHeader(path=path, size=8), [b"original"])
    # The client library refuses to send a different size (and closes early)...
    for sent in ([b"short"], [b"far too many bytes"]):
        with pytest.raises(TransferError) as e:
            write_file(g.fs, pb.WriteHeader(path=path, size=8), sent)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "size" in e.value.message
    # ...and guestd refuses bytes beyond the size from a client that sends them anyway.
    t = g.fs.OpenWrite(pb.WriteHeader(path=path, size=8))
    with connect(t.address) as s:
        s.sendall(t.ticket + b"replaced" + b"and more")
        frame = b""
        while more := s.recv(4096):
            frame += more
    result = pb.TransferResult.FromString(frame[4:])
    assert result.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "size" in result.message and path in result.message
    for _ in range(100):
        if os.listdir(tmpdir_short) == ["keep.txt"]:
            break
        time.sleep(0.05)
    assert open(path, "rb").read() == b"original"
    assert os.listdir(tmpdir_short) == ["keep.txt"]


def test_client_dying_mid_upload_leaves_nothing(data_guestd: Guestd, tmpdir_short: str) -> None:
    g = data_guestd
    t = g.fs.OpenWrite(pb.WriteHeader(path=f"{tmpdir_short}/new.bin", size=10 * MB))
    with connect(t.address) as s:
        s.sendall(t.ticket + b"x" * MB)
    for _ in range(100):
        if not os.listdir(tmpdir_short):
            break
        time.sleep(0.05)
    assert os.listdir(tmpdir_short) == []


def test_tickets_are_one_use_and_bad_ones_get_nothing(data_guestd: Guestd,
                                                      tmpdir_short: str) -> None:
    g = data_guestd
    path = f"{tmpdir_short}/f"
    with open(path, "wb") as f:
        f.write(b"secret")
    t = g.fs.OpenRead(pb.ReadRequest(path=path))
    assert t.length == 6 and t.address == g.data_target and len(t.ticket) == 32

    def fetch(ticket: bytes) -> bytes:
        with connect(t.address) as s:
            s.sendall(ticket)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while more := s.recv(100):
                got += more
            return got

    assert fetch(os.urandom(32)) == b""  # a stranger gets nothing, and the ticket survives
    assert fetch(t.ticket) == b"secret"
    assert fetch(t.ticket) == b""  # used once: gone
    assert fetch(b"short") == b""


def test_token_guards_open(tmpdir_short: str) -> None:
    g = Guestd(data_listener=True)
    try:
        g.guest.Init(guest_pb2.InitRequest(access_token="tok"))
        with pytest.raises(grpc.RpcError) as e:
            g.fs.OpenRead(pb.ReadRequest(path="/etc/hostname"))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        resp = write_file(g.fs, pb.WriteHeader(path=f"{tmpdir_short}/t", size=2), [b"ok"],
                          metadata=(("x-moru-access-token", "tok"),))
        assert resp.bytes_written == 2
    finally:
        g.close()


def test_read_answers_info_only_for_big_files_with_a_listener(data_guestd: Guestd,
                                                              guestd: Guestd,
                                                              tmpdir_short: str) -> None:
    """info_only_from: at least that many bytes from offset -> the info alone
    (the client takes OpenRead); fewer, or no data listener -> the data."""
    path = f"{tmpdir_short}/big.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(4 * MB))

    def read(g: Guestd, **kw: Any) -> list[pb.ReadResponse]:
        return list(g.fs.Read(pb.ReadRequest(path=path, length=MB, **kw)))

    only = read(data_guestd, info_only_from=4 * MB)
    assert len(only) == 1 and only[0].info.size == 4 * MB and only[0].data == b""
    for g, kw in ((data_guestd, {"info_only_from": 4 * MB, "offset": 1}),
                  (data_guestd, {}), (guestd, {"info_only_from": 1})):
        got = read(g, **kw)
        assert got[0].info.size == 4 * MB and sum(len(m.data) for m in got) == MB, kw


def test_without_a_data_listener_open_says_so(guestd: Guestd, tmpdir_short: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        guestd.fs.OpenWrite(pb.WriteHeader(path=f"{tmpdir_short}/a", size=1))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--data-listen" in (e.value.details() or "")
    assert os.listdir(tmpdir_short) == []


def test_unaligned_sizes_and_offsets_through_the_direct_paths(data_guestd: Guestd,
                                                              tmpdir_short: str) -> None:
    """Uploads of DIRECT_MIN or more go through O_DIRECT with a buffered tail;
    reads of DIRECT_MIN or more with O_DIRECT, smaller ones from page-cache
    mappings: sizes and offsets off every alignment, reads crossing buffers and
    mapping windows, a file in /dev/shm (tmpfs) as well."""
    from guestd.transfers import DIRECT_MIN, MAP_WINDOW

    g = data_guestd
    shm = tempfile.mkdtemp(dir="/dev/shm", prefix="moru-t")
    try:
        for d, size in ((tmpdir_short, DIRECT_MIN + 4097), (tmpdir_short, 2 * MAP_WINDOW + 1),
                        (shm, DIRECT_MIN + 1)):
            data = os.urandom(size)
            path = f"{d}/odd.bin"
            resp = write_file(g.fs, pb.WriteHeader(path=path, size=size),
                              [data[i:i + 3 * MB + 7] for i in range(0, size, 3 * MB + 7)])
            assert resp.bytes_written == size
            with open(path, "rb") as f:
                assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
            for offset, length in ((0, 0), (4095, 0), (MAP_WINDOW - 3, MAP_WINDOW + 10),
                                   (4097, 3 * MB)):  # under DIRECT_MIN: mapped
                got = bytearray()
                _, n = read_file(g.fs, pb.ReadRequest(path=path, offset=offset, length=length),
                                 got.extend)
                want = data[offset:offset + length] if length else data[offset:]
                assert n == len(want) and bytes(got) == want, (path, offset, length)
            assert os.listdir(d) == ["odd.bin"]
            os.unlink(path)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_a_file_truncated_during_a_read_ends_short(data_guestd: Guestd,
                                                   tmpdir_short: str) -> None:
    g = data_guestd
    path = f"{tmpdir_short}/shrinks.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(64 * MB))
    t = g.fs.OpenRead(pb.ReadRequest(path=path))
    got = 0
    with connect(t.address) as s:
        s.sendall(t.ticket)
        got += len(s.recv(MB))
        os.truncate(path, 2 * MB)
        while more := s.recv(MB):
            got += len(more)
    assert MB <= got < 64 * MB
    assert g.fs.Stat(pb.StatRequest(path=path)).entry.size == 2 * MB  # guestd still answers


def test_transfer_sockets_block_with_a_kernel_idle_limit() -> None:
    """A Python timeout polls before every send (a vsock sender then wakes on
    each credit update); the idle limit is the kernel's, on a blocking socket."""
    from guestd.idle_limit import block_with_idle_limit

    a, b = socket.socketpair()
    with a, b:
        a.settimeout(60)
        block_with_idle_limit(a, 0.3)
        assert a.gettimeout() is None  # blocking: no poll(2) before each call
        t = time.monotonic()
        with pytest.raises(OSError):
            a.recv(1)  # nothing comes: fails after the limit, does not hang
        assert 0.2 < time.monotonic() - t < 30
        b.sendall(b"x")
        assert a.recv(1) == b"x"

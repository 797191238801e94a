"""Filesystem service against a real guestd: big streamed files, atomic writes, errors, watch."""

from __future__ import annotations

import hashlib
import os
import queue
import subprocess
import tempfile
import threading
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.message import DecodeError
from guestd_harness import Guestd

from moru_proto.guest.v1 import filesystem_pb2 as pb

MB = 1024 * 1024


def write_req(path: str, chunks: Iterator[bytes] | list[bytes], **header: object
              ) -> Iterator[pb.WriteRequest]:
    yield pb.WriteRequest(header=pb.WriteHeader(path=path, **header))  # type: ignore[arg-type]
    for c in chunks:
        yield pb.WriteRequest(data=c)


def read_all(g: Guestd, path: str, **kw: int) -> tuple[pb.EntryInfo, bytes]:
    info = None
    out = bytearray()
    for i, msg in enumerate(g.fs.Read(pb.ReadRequest(path=path, **kw))):
        if i == 0:
            info = msg.info
        out += msg.data
    assert info is not None
    return info, bytes(out)


def test_100mb_write_and_read_back_same_sha256(guestd: Guestd, tmpdir_short: str) -> None:
    path = f"{tmpdir_short}/deep/er/big.bin"
    block = os.urandom(MB)
    want = hashlib.sha256()
    chunks = []
    for i in range(100):
        c = block[i:] + block[:i]
        want.update(c)
        chunks.append(c)
    resp = guestd.fs.Write(write_req(path, iter(chunks)))
    assert resp.bytes_written == 100 * MB and resp.entry.size == 100 * MB
    got = hashlib.sha256()
    n = 0
    hwm_before = guestd.vm_hwm_kib()
    for msg in guestd.fs.Read(pb.ReadRequest(path=path)):
        got.update(msg.data)
        n += len(msg.data)
    assert n == 100 * MB and got.hexdigest() == want.hexdigest()
    with open(path, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == want.hexdigest()
    # Streaming, not buffering: 100 MB through guestd moves its peak RSS far less than that.
    assert guestd.vm_hwm_kib() - hwm_before < 60 * 1024


def test_read_offset_length_and_info(guestd: Guestd, tmpdir_short: str) -> None:
    path = f"{tmpdir_short}/f.txt"
    guestd.fs.Write(write_req(path, [b"0123456789"], mode=0o600))
    info, data = read_all(guestd, path, offset=3, length=4)
    assert data == b"3456"
    assert info.type == pb.FILE_TYPE_FILE and info.size == 10 and info.mode == 0o600
    assert info.name == "f.txt" and info.path == path and info.owner == "root"
    assert read_all(guestd, path, offset=8)[1] == b"89"
    assert read_all(guestd, path, offset=50)[1] == b""
    _, empty = read_all(guestd, path, offset=0, length=0)
    assert empty == b"0123456789"


def test_write_replaces_atomically_keeps_mode_and_sets_owner(guestd: Guestd,
                                                             tmpdir_short: str) -> None:
    path = f"{tmpdir_short}/a.txt"
    guestd.fs.Write(write_req(path, [b"old"], mode=0o640))
    ino_before = os.stat(path).st_ino
    guestd.fs.Write(write_req(path, [b"new ", b"content"]))
    st = os.stat(path)
    assert open(path, "rb").read() == b"new content"
    assert st.st_ino != ino_before and (st.st_mode & 0o777) == 0o640  # renamed over, mode kept
    os.chmod(tmpdir_short, 0o777)  # a write with `user` is made with that user's rights
    guestd.fs.Write(write_req(f"{tmpdir_short}/sub/n.txt", [b"x"], user="nobody"))
    assert os.stat(f"{tmpdir_short}/sub/n.txt").st_uid == 65534
    assert os.stat(f"{tmpdir_short}/sub").st_uid == 65534
    os.chmod(tmpdir_short, 0o755)
    with pytest.raises(grpc.RpcError) as denied:
        guestd.fs.Write(write_req(f"{tmpdir_short}/n.txt", [b"x"], user="nobody"))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    guestd.fs.Write(write_req(path, [b"+more"], append=True))
    assert open(path, "rb").read() == b"new content+more"
    assert sorted(os.listdir(tmpdir_short)) == ["a.txt", "sub"]


def test_aborted_upload_leaves_target_untouched_and_no_temp(guestd: Guestd,
                                                            tmpdir_short: str) -> None:
    path = f"{tmpdir_short}/keep.txt"
    guestd.fs.Write(write_req(path, [b"original"]))
    gate: queue.Queue[None] = queue.Queue()

    def reqs() -> Iterator[pb.WriteRequest]:
        yield pb.WriteRequest(header=pb.WriteHeader(path=path, size=1_000_000))
        yield pb.WriteRequest(data=b"partial" * 1000)
        gate.get()  # hold the stream open until the client cancels it
        raise RuntimeError("the client died mid-upload")

    fut = guestd.fs.Write.future(reqs())
    deadline = 50
    while deadline and not [n for n in os.listdir(tmpdir_short) if "moru-tmp" in n]:
        threading.Event().wait(0.05)
        deadline -= 1
    assert deadline, "guestd never created its temp file"
    fut.cancel()  # type: ignore[no-untyped-call]
    gate.put(None)
    for _ in range(100):
        if os.listdir(tmpdir_short) == ["keep.txt"]:
            break
        threading.Event().wait(0.05)
    assert os.listdir(tmpdir_short) == ["keep.txt"]
    assert open(path, "rb").read() == b"original"


def test_stat_listdir_mkdir_move_remove(guestd: Guestd, tmpdir_short: str) -> None:
    d = tmpdir_short
    r = guestd.fs.MakeDir(pb.MakeDirRequest(path=f"{d}/x/y"))
    assert r.created and r.entry.type == pb.FILE_TYPE_DIRECTORY and r.entry.mode == 0o755
    assert not guestd.fs.MakeDir(pb.MakeDirRequest(path=f"{d}/x/y")).created
    guestd.fs.Write(write_req(f"{d}/x/y/z.txt", [b"z"]))
    guestd.fs.Write(write_req(f"{d}/x/top.txt", [b"t"]))
    os.symlink("top.txt", f"{d}/x/link")
    names1 = [e.path for e in guestd.fs.ListDir(pb.ListDirRequest(path=f"{d}/x")).entries]
    assert names1 == [f"{d}/x/link", f"{d}/x/top.txt", f"{d}/x/y"]
    deep = {e.path: e for e in guestd.fs.ListDir(pb.ListDirRequest(path=f"{d}/x", depth=2)).entries}
    assert f"{d}/x/y/z.txt" in deep and len(deep) == 4
    assert deep[f"{d}/x/link"].type == pb.FILE_TYPE_SYMLINK
    assert deep[f"{d}/x/link"].symlink_target == "top.txt"
    st = guestd.fs.Stat(pb.StatRequest(path=f"{d}/x/top.txt")).entry
    assert st.size == 1 and st.modified_time.seconds > 0
    mv = guestd.fs.Move(pb.MoveRequest(source=f"{d}/x/top.txt", destination=f"{d}/new/t.txt"))
    assert mv.entry.path == f"{d}/new/t.txt" and not os.path.exists(f"{d}/x/top.txt")
    guestd.fs.Remove(pb.RemoveRequest(path=f"{d}/new/t.txt"))
    assert not os.path.exists(f"{d}/new/t.txt")
    guestd.fs.Remove(pb.RemoveRequest(path=f"{d}/x", recursive=True))
    assert not os.path.exists(f"{d}/x")


def _err(fn, req) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        res = fn(req)
        if hasattr(res, "__iter__"):
            list(res)
    return e.value.code(), e.value.details() or ""


def test_errors_name_the_path(guestd: Guestd, tmpdir_short: str) -> None:
    d = tmpdir_short
    os.mkdir(f"{d}/dir")
    os.mkdir(f"{d}/full")
    open(f"{d}/dir/f", "w").close()
    fs = guestd.fs
    cases = [
        (fs.Read, pb.ReadRequest(path="relative.txt"), grpc.StatusCode.INVALID_ARGUMENT, "path"),
        (fs.Read, pb.ReadRequest(path=f"{d}/dir/f", offset=-1), grpc.StatusCode.INVALID_ARGUMENT,
         "offset"),
        (fs.Read, pb.ReadRequest(path=f"{d}/nope"), grpc.StatusCode.NOT_FOUND, f"{d}/nope"),
        (fs.Read, pb.ReadRequest(path=f"{d}/dir"), grpc.StatusCode.FAILED_PRECONDITION, f"{d}/dir"),
        (fs.Stat, pb.StatRequest(path=f"{d}/nope"), grpc.StatusCode.NOT_FOUND, f"{d}/nope"),
        (fs.Stat, pb.StatRequest(path=""), grpc.StatusCode.INVALID_ARGUMENT, "path"),
        (fs.ListDir, pb.ListDirRequest(path=f"{d}/nope"), grpc.StatusCode.NOT_FOUND, f"{d}/nope"),
        (fs.ListDir, pb.ListDirRequest(path=f"{d}/dir/f"), grpc.StatusCode.FAILED_PRECONDITION,
         f"{d}/dir/f"),
        (fs.Remove, pb.RemoveRequest(path=f"{d}/nope"), grpc.StatusCode.NOT_FOUND, f"{d}/nope"),
        (fs.Remove, pb.RemoveRequest(path=f"{d}/dir"), grpc.StatusCode.FAILED_PRECONDITION,
         f"{d}/dir"),
        (fs.Move, pb.MoveRequest(source=f"{d}/nope", destination=f"{d}/x"),
         grpc.StatusCode.NOT_FOUND, "source"),
        (fs.Move, pb.MoveRequest(source=f"{d}/dir", destination="rel"),
         grpc.StatusCode.INVALID_ARGUMENT, "destination"),
        (fs.MakeDir, pb.MakeDirRequest(path=f"{d}/dir/f"), grpc.StatusCode.ALREADY_EXISTS,
         f"{d}/dir/f"),
        (fs.Watch, pb.WatchRequest(path=f"{d}/nope"), grpc.StatusCode.NOT_FOUND, f"{d}/nope"),
    ]
    for fn, req, code, word in cases:
        got, msg = _err(fn, req)
        assert (got, word in msg) == (code, True), (req, got, msg)
    got, msg = _err(fs.Write, write_req(f"{d}/dir", [b"x"]))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and f"{d}/dir" in msg
    got, msg = _err(fs.Write, write_req(f"{d}/dir/f", [b"abc"], size=4))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "size" in msg
    assert open(f"{d}/dir/f", "rb").read() == b""
    got, msg = _err(fs.Write, write_req("rel/x", [b"x"]))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "path" in msg
    got, msg = _err(fs.Write, iter([pb.WriteRequest(data=b"x")]))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "header" in msg


def test_full_disk_is_resource_exhausted(guestd: Guestd, tmpdir_short: str) -> None:
    mnt = f"{tmpdir_short}/small"
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], check=True)
    try:
        got, msg = _err(guestd.fs.Write, write_req(f"{mnt}/big", [b"x" * MB] * 3))
        assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and f"{mnt}/big" in msg, msg
        assert os.listdir(mnt) == []  # the temp file is gone too
    finally:
        subprocess.run(["umount", mnt], check=True)


def test_watch_sees_create_write_rename_remove(guestd: Guestd, tmpdir_short: str) -> None:
    d = tmpdir_short
    os.mkdir(f"{d}/sub")
    stream = guestd.fs.Watch(pb.WatchRequest(path=d, recursive=True))
    events: queue.Queue[pb.WatchEvent] = queue.Queue()

    def pump() -> None:
        try:
            for ev in stream:
                events.put(ev)
        except grpc.RpcError:
            pass

    t = threading.Thread(target=pump)
    t.start()
    try:
        assert events.get(timeout=10).HasField("started")
        with open(f"{d}/a.txt", "w") as f:
            f.write("hi")
        os.rename(f"{d}/a.txt", f"{d}/sub/b.txt")
        with open(f"{d}/sub/b.txt", "a") as f:
            f.write("more")
        os.unlink(f"{d}/sub/b.txt")
        guestd.fs.Write(write_req(f"{d}/via-guestd.txt", [b"x"]))
        want = [
            (pb.EVENT_TYPE_CREATE, f"{d}/a.txt"),
            (pb.EVENT_TYPE_WRITE, f"{d}/a.txt"),
            (pb.EVENT_TYPE_RENAME, f"{d}/a.txt"),
            (pb.EVENT_TYPE_CREATE, f"{d}/sub/b.txt"),
            (pb.EVENT_TYPE_WRITE, f"{d}/sub/b.txt"),
            (pb.EVENT_TYPE_REMOVE, f"{d}/sub/b.txt"),
            (pb.EVENT_TYPE_CREATE, f"{d}/via-guestd.txt"),
        ]
        got: list[tuple[int, str]] = []
        while len(got) < len(want):
            ev = events.get(timeout=10)
            if ev.HasField("filesystem"):
                got.append((ev.filesystem.type, ev.filesystem.path))
        assert got == want
        assert "moru-tmp" not in str(got)
    finally:
        stream.cancel()  # type: ignore[no-untyped-call]
        t.join(10)


def test_temp_dir_is_short() -> None:
    assert len(tempfile.gettempdir()) < 40


def test_read_response_bytes_is_the_protobuf_encoding() -> None:
    from guestd.fileio import read_response_bytes

    for n in (1, 127, 128, 16383, 16384, MB, MB + 7):
        data = bytes(range(256)) * (n // 256) + b"x" * (n % 256)
        assert read_response_bytes(data) == pb.ReadResponse(data=data).SerializeToString()


def test_write_request_of_views_data_and_leaves_the_rest_to_protobuf() -> None:
    from guestd.fileio import write_request_of

    for n in (0, 1, 127, 128, 16383, 16384, MB, MB + 7):
        data = bytes(range(256)) * (n // 256) + b"x" * (n % 256)
        got = write_request_of(pb.WriteRequest(data=data).SerializeToString())
        assert isinstance(got, memoryview) and got == data
    header = pb.WriteRequest(header=pb.WriteHeader(path="/a", size=3))
    assert write_request_of(header.SerializeToString()) == header
    # Anything but one whole data field goes to protobuf: a data field followed
    # by a header (oneof: the last one wins), and a length running past the end.
    both = pb.WriteRequest(data=b"abc").SerializeToString() + header.SerializeToString()
    parsed = write_request_of(both)
    assert isinstance(parsed, pb.WriteRequest) and parsed.WhichOneof("message") == "header"
    with pytest.raises(DecodeError):
        write_request_of(b"\x12\x05ab")

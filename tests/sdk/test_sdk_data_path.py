"""Through a real hostd and microVM: large files over hostd's data relay, and
shell commands in the kept login environment of the guest image."""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any

import grpc
import pytest
from hostd_framework import Hostd

from guestd.transfer_client import TransferError, read_file, write_file
from moru import Sandbox
from moru._transfer import DATA_MIN
from moru.exceptions import NotFoundException, PermissionDeniedException
from moru_proto.guest.v1 import filesystem_pb2 as fpb
from moru_proto.guest.v1 import filesystem_pb2_grpc

pytestmark = pytest.mark.vm


def _stub_and_md(h: Hostd, sbx: Sandbox) -> tuple[Any, tuple[tuple[str, str], ...]]:
    target = sbx._core._target  # the SDK's own metadata: sandbox id, API key, token
    channel = grpc.insecure_channel(f"unix:{h.sock}")
    return filesystem_pb2_grpc.FilesystemStub(channel), target.metadata


def test_open_read_and_write_go_through_the_relay(hostd: Hostd,
                                                   shared_sandbox: Sandbox) -> None:
    fs, md = _stub_and_md(hostd, shared_sandbox)
    data = os.urandom(3 << 20)
    resp = write_file(fs, fpb.WriteHeader(path="/tmp/relay.bin", size=len(data)),
                      [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)],
                      metadata=md)
    assert resp.bytes_written == len(data)
    t = fs.OpenRead(fpb.ReadRequest(path="/tmp/relay.bin"), metadata=md)
    assert t.address == f"unix:{hostd.sock}.data" and len(t.ticket) == 32
    got = bytearray()
    # That ticket is not used: it expires; a second one reads the file.
    info, n = read_file(fs, fpb.ReadRequest(path="/tmp/relay.bin", offset=1),
                        got.extend, metadata=md)
    assert n == len(data) - 1 and bytes(got) == data[1:] and info.size == len(data)
    # guestd's checks at open time come back through hostd unchanged.
    with pytest.raises(grpc.RpcError) as e:
        write_file(fs, fpb.WriteHeader(path="/proc/nope/x", size=1), [b"x"], metadata=md)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # A short upload: the target is left untouched.
    with pytest.raises(TransferError):
        write_file(fs, fpb.WriteHeader(path="/tmp/relay.bin", size=10), [b"short"], metadata=md)
    read_file(fs, fpb.ReadRequest(path="/tmp/relay.bin"), lambda v: None, metadata=md)
    assert fs.Stat(fpb.StatRequest(path="/tmp/relay.bin"), metadata=md).entry.size == len(data)


def test_open_asking_for_hand_over_gets_the_guest_connection(hostd: Hostd,
                                                             shared_sandbox: Sandbox) -> None:
    """With the hand-over header the relay passes the guest connection itself
    (SCM_RIGHTS) instead of copying it: hostd moves none of the bytes."""
    fs, md = _stub_and_md(hostd, shared_sandbox)
    data = os.urandom(3 << 20)
    shared_sandbox.files.write("/tmp/handover.bin", data)
    t = fs.OpenRead(fpb.ReadRequest(path="/tmp/handover.bin", offset=5),
                    metadata=(*md, ("moru-data-handover", "1")))
    assert t.address == f"unix-fd:{hostd.sock}.data" and t.length == len(data) - 5
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(f"{hostd.sock}.data")
        s.sendall(t.ticket)
        _, fds, _, _ = socket.recv_fds(s, 1, 1)
    assert len(fds) == 1
    with socket.socket(fileno=fds[0]) as guest:
        guest.setblocking(True)  # the flag came with the fd from hostd's event loop
        got = bytearray()
        while more := guest.recv(1 << 20):
            got += more
    assert got == data[5:]
    shared_sandbox.commands.run("rm -f /tmp/handover.bin")


def test_hand_over_refused_is_a_connection_error(hostd: Hostd) -> None:
    """An unknown ticket on a hand-over address: the relay closes without
    passing a connection, which the SDK reports as its own error."""
    from moru import _loop, _transfer
    from moru.exceptions import ConnectionException

    t = fpb.Transfer(ticket=os.urandom(32), address=f"unix-fd:{hostd.sock}.data")
    with pytest.raises(ConnectionException, match="without passing"):
        _loop.run(_transfer._connect(t, "reading /x"))


def test_unknown_ticket_is_closed_without_a_byte(hostd: Hostd) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(f"{hostd.sock}.data")
        s.sendall(os.urandom(32))
        assert s.recv(1) == b""


def test_sdk_large_files_round_trip(shared_sandbox: Sandbox) -> None:
    data = os.urandom(DATA_MIN + 12345)
    info = shared_sandbox.files.write("/tmp/big.bin", data)
    assert info.size == len(data)
    back = shared_sandbox.files.read("/tmp/big.bin", format="bytes")
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    inside = shared_sandbox.commands.run("sha256sum /tmp/big.bin").stdout.split()[0]
    assert inside == hashlib.sha256(data).hexdigest()
    text = "é" * (DATA_MIN // 2 + 1)
    shared_sandbox.files.write("/tmp/big.txt", text)
    assert shared_sandbox.files.read("/tmp/big.txt") == text
    with pytest.raises(NotFoundException):
        shared_sandbox.files.read("/tmp/no/such/file", format="bytes")
    shared_sandbox.commands.run("rm -f /tmp/big.bin /tmp/big.txt /tmp/relay.bin")


def test_sdk_reads_in_parts_and_as_a_user(shared_sandbox: Sandbox) -> None:
    """A file just over the first Read's CHUNK (the rest by a second Read), one
    over DATA_MIN (the rest over the relay) written and read as `user`, and a
    file replaced between the parts (read whole again)."""
    from moru._files import CHUNK

    sbx = shared_sandbox
    for size, user in ((CHUNK + 3, None), (DATA_MIN + 4097, "user")):
        data = os.urandom(size)
        info = sbx.files.write("/home/user/parts.bin", data, user=user)
        assert info.owner == (user or "root")
        back = sbx.files.read("/home/user/parts.bin", format="bytes", user=user)
        assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    sbx.commands.run("rm -f /home/user/parts.bin")


def test_sdk_large_read_comes_whole_over_the_relay(shared_sandbox: Sandbox,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """guestd answers the first Read with the info alone (info_only_from): no
    head through gRPC, the whole file from one OpenRead, which also makes a
    file replaced after that first Read come back whole and new."""
    from moru import _transfer

    sbx = shared_sandbox
    old, new = os.urandom(DATA_MIN + 1), os.urandom(DATA_MIN + 4099)
    sbx.files.write("/home/user/whole.bin", old, user="user")
    real, calls = _transfer.read, []

    async def replace_first(target: Any, request: Any) -> Any:
        calls.append(request.offset)
        await sbx._core.files.write("/home/user/whole.bin", new, user="user")
        return await real(target, request)

    monkeypatch.setattr(_transfer, "read", replace_first)
    monkeypatch.setattr(_transfer, "read_after", None)  # the head path is not taken
    assert sbx.files.read("/home/user/whole.bin", format="bytes", user="user") == new
    assert calls == [0]
    sbx.files.write("/root/whole.bin", old, mode=0o600)
    with pytest.raises(PermissionDeniedException):  # checked as Read checks it
        sbx.files.read("/root/whole.bin", format="bytes", user="user")
    sbx.commands.run("rm -f /home/user/whole.bin /root/whole.bin")


def test_sdk_read_of_a_file_replaced_between_the_parts(shared_sandbox: Sandbox,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The head-then-rest path an older guestd (no info_only_from) takes."""
    from moru import _files, _transfer

    monkeypatch.setattr(_files, "INFO_ONLY_FROM", 0)
    sbx = shared_sandbox
    old, new = os.urandom(DATA_MIN + 1), os.urandom(DATA_MIN + 2)
    sbx.files.write("/tmp/replaced.bin", old)
    real = _transfer.read_after

    async def replace_first(*args: Any) -> Any:
        await sbx._core.files.write("/tmp/replaced.bin", new)
        return await real(*args)

    monkeypatch.setattr(_transfer, "read_after", replace_first)
    assert sbx.files.read("/tmp/replaced.bin", format="bytes") == new
    sbx.commands.run("rm -f /tmp/replaced.bin")


def test_login_environment_of_the_image_is_kept_and_refreshed(shared_sandbox: Sandbox) -> None:
    sbx = shared_sandbox
    had_profile = sbx.files.exists("/root/.profile")
    profile = sbx.files.read("/root/.profile") if had_profile else ""
    try:
        sbx.files.write("/etc/profile.d/moru-test.sh", "export MORU_LOGIN_TEST=one\n")
        sbx.files.write("/root/.profile", "export MORU_HOME_TEST=a\n")
        assert sbx.commands.run('echo "$MORU_LOGIN_TEST|$MORU_HOME_TEST"').stdout == "one|a\n"
        sbx.files.write("/etc/profile.d/moru-test.sh", "export MORU_LOGIN_TEST=second\n")
        sbx.files.write("/root/.profile", "export MORU_HOME_TEST=bb\n")
        assert sbx.commands.run('echo "$MORU_LOGIN_TEST|$MORU_HOME_TEST"').stdout == (
            "second|bb\n")
        # The same environment as a login shell's.
        ours = sbx.commands.run("env | grep -v -e ^_= -e ^SHLVL= | sort").stdout
        login = sbx.commands.run(
            "bash -l -c 'env | grep -v -e ^_= -e ^SHLVL= | sort'").stdout
        assert ours == login
    finally:
        sbx.commands.run("rm -f /etc/profile.d/moru-test.sh /root/.profile")
        if had_profile:
            sbx.files.write("/root/.profile", profile)

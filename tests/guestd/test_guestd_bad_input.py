"""Bad input to a real guestd process (unix socket, no VM): each case is the
right status naming the field or path, short, and guestd keeps serving.

Writes to devices and /proc are tested in a VM only (tests/sdk): here guestd
runs on the host as root.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import grpc
import pytest
from guestd_harness import Guestd, argv, collect, shell

from moru_proto.guest.v1 import filesystem_pb2 as fpb
from moru_proto.guest.v1 import process_pb2 as ppb

MB = 1 << 20
BIG = "y" * MB


def _start_error(g: Guestd, req: ppb.StartRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        list(g.process.Start(req, timeout=30))
    return e.value


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (shell("echo a\0b"), "config.shell"),
        (argv("echo", "a\0b"), "config.argv[1]"),
        (shell("true", env={"A": "x\0y"}), "config.env['A']"),
        (shell("true", env={"A=B": "x"}), "config.env['A=B']"),
        (shell(BIG), "config.shell"),
        (argv("echo", BIG), "config.argv[1]"),
        (shell("true", env={f"V{i}": "z" * 100_000 for i in range(12)}), "config"),
    ],
    ids=["nul-shell", "nul-argv", "nul-env", "eq-env-name", "1mb-shell", "1mb-argv", "env-total"],
)
def test_start_refuses_what_execve_cannot_take(
    guestd: Guestd, req: ppb.StartRequest, field: str
) -> None:
    err: object = _start_error(guestd, req)
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    details = err.details() or ""
    assert details.startswith(field) and len(details) < 500, details[:600]
    assert collect(guestd.process.Start(shell("echo ok"), timeout=30)).stdout == b"ok\n"


def test_corrupt_request_is_invalid_argument(guestd: Guestd) -> None:
    for method, body in [
        ("/moru.guest.v1.Process/List", b"\xff\xff\xff\xff"),
        ("/moru.guest.v1.Filesystem/Stat", b"\x0a\xff"),
    ]:
        call = guestd.channel.unary_unary(
            method, request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as e:
            call(body, timeout=30)
        err: object = e.value
        assert isinstance(err, grpc.Call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err)
        assert (err.details() or "").startswith("request:"), err.details()


def test_read_of_devices_and_fifos(fresh_guestd: Guestd) -> None:
    """A FIFO (would block guestd's open) and an endless device are refused; a
    character device is read with a length. fresh_guestd: a regression blocks it."""
    g = fresh_guestd
    d = tempfile.mkdtemp(dir="/tmp", prefix="mgf")
    fifo = os.path.join(d, "p")
    os.mkfifo(fifo)
    try:
        for path in (fifo, "/dev/zero"):
            call: Any = g.fs.Read(fpb.ReadRequest(path=path), timeout=20)
            try:
                first = next(call, None)
                pytest.fail(f"Read({path}) gave {len(first.data) if first else 0} bytes")
            except grpc.RpcError as e:
                err: object = e
                assert isinstance(err, grpc.Call)
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, (path, err)
                assert path in (err.details() or ""), err.details()
            finally:
                call.cancel()
        msgs = list(g.fs.Read(fpb.ReadRequest(path="/dev/urandom", length=16), timeout=20))
        assert sum(len(m.data) for m in msgs) == 16
    finally:
        os.unlink(fifo)
        os.rmdir(d)

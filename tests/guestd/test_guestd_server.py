"""Listen addresses and the vsock relay (exercised with an AF_UNIX listener: the
host has no vsock loopback; the AF_VSOCK socket itself is tested in a VM)."""

from __future__ import annotations

import asyncio
import os
import socket

import grpc
import pytest
from guestd_harness import Guestd

from guestd.server import parse_listen
from guestd.vsock import serve_relay
from moru_proto.guest.v1 import process_pb2 as pb
from moru_proto.guest.v1 import process_pb2_grpc


def test_parse_listen() -> None:
    assert parse_listen("unix:/run/g.sock").grpc_target == "unix:/run/g.sock"
    assert parse_listen("tcp:127.0.0.1:5000").grpc_target == "127.0.0.1:5000"
    assert parse_listen("tcp:[::1]:5000").grpc_target == "[::1]:5000"
    v = parse_listen("vsock:50051")
    assert (v.kind, v.port, v.cid) == ("vsock", 50051, socket.VMADDR_CID_ANY)
    assert parse_listen("vsock:3:1024").cid == 3
    for bad in ["vsock:x", "unix:relative", "tcp:5000", "http://x", ""]:
        with pytest.raises(ValueError, match="--listen"):
            parse_listen(bad)


def test_relay_carries_grpc_streams(guestd: Guestd) -> None:
    outer = f"{guestd.dir}/outer.sock"

    async def main() -> bytes:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(outer)
        listener.listen()
        relay = asyncio.create_task(serve_relay(listener, guestd.sock))
        try:
            async with grpc.aio.insecure_channel(f"unix:{outer}") as ch:
                stub = process_pb2_grpc.ProcessStub(ch)
                out = b""
                req = pb.StartRequest(config=pb.ProcessConfig(
                    argv=["head", "-c", "3000000", "/dev/urandom"]))
                async for ev in stub.Start(req):
                    out += ev.data.stdout
                return out
        finally:
            relay.cancel()
            await asyncio.gather(relay, return_exceptions=True)

    assert len(asyncio.run(main())) == 3_000_000
    os.unlink(outer)


def test_bad_listen_address_fails_fast() -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "guestd", "--listen", "bogus"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--listen" in r.stderr

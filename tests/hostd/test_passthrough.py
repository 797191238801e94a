"""hostd's guest passthrough without a data relay refuses the data-listener methods with a clear
status instead of handing out tickets its clients cannot use (real grpc.aio
server, no guest needed: the refusal happens before any upstream call)."""

from __future__ import annotations

import asyncio
import tempfile
from typing import Any

import grpc
import pytest

from hostd.passthrough import DATA_METHODS, GuestPassthrough
from moru_proto.guest.v1 import filesystem_pb2 as fpb
from moru_proto.guest.v1 import filesystem_pb2_grpc


def test_open_read_and_write_are_refused_without_a_data_relay() -> None:
    resolved: list[str] = []

    def resolve(sandbox_id: str, token: str) -> tuple[grpc.aio.Channel, str]:
        resolved.append(sandbox_id)
        raise AssertionError("no upstream call expected")

    async def main() -> None:
        with tempfile.TemporaryDirectory(dir="/tmp") as d:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers([GuestPassthrough(resolve)])
            server.add_insecure_port(f"unix:{d}/h.sock")
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"unix:{d}/h.sock") as ch:
                    fs = filesystem_pb2_grpc.FilesystemStub(ch)
                    md = (("sandbox-id", "sbx_1"),)
                    calls: list[Any] = [
                        fs.OpenRead(fpb.ReadRequest(path="/etc/hostname"), metadata=md),
                        fs.OpenWrite(fpb.WriteHeader(path="/tmp/a", size=1), metadata=md),
                    ]
                    for call in calls:
                        with pytest.raises(grpc.aio.AioRpcError) as e:
                            await call
                        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
                        assert "Filesystem.Read" in (e.value.details() or "")
            finally:
                await server.stop(None)

    asyncio.run(main())
    assert resolved == []
    names = {m.name for m in fpb.DESCRIPTOR.services_by_name["Filesystem"].methods}
    assert {m.rsplit("/", 1)[1] for m in DATA_METHODS} <= names

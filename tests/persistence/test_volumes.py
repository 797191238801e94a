"""VolumeManager and VolumeService on real SQLite, real mkfs.ext4 and a real gRPC server."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hostd.errors import FailedPrecondition, InvalidArgument, NotFound
from hostd.interceptors import EdgeInterceptor
from hostd.volumes import VolumeManager, add_to_server, check_mount_path
from moru_proto.host.v1 import volume_pb2, volume_pb2_grpc


@pytest.fixture
def state_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="mvol"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_create_makes_a_sparse_ext4_disk_and_a_row(state_dir: Path) -> None:
    mgr = VolumeManager(state_dir)
    rec = asyncio.run(mgr.create("data", 64))
    path = mgr.path(rec.volume_id)
    assert path.stat().st_size == 64 << 20
    assert path.stat().st_blocks * 512 < 16 << 20  # sparse
    out = subprocess.run(["dumpe2fs", "-h", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "extent" in out.stdout and f"volume name:   {rec.volume_id[-16:]}" in out.stdout
    assert [r.volume_id for r in mgr.list_volumes()] == [rec.volume_id]
    mgr.close()
    # A new manager (hostd restart) sees the same volume.
    again = VolumeManager(state_dir)
    assert again.get(rec.volume_id).name == "data"
    again.close()


def test_one_sandbox_at_a_time_and_delete_refused_while_attached(state_dir: Path) -> None:
    mgr = VolumeManager(state_dir)
    vid = asyncio.run(mgr.create("v", 32)).volume_id
    assert mgr.attach(vid, "sbx_a", "/workspace") == mgr.path(vid)
    with pytest.raises(FailedPrecondition, match="sbx_a"):
        mgr.attach(vid, "sbx_b", "/workspace")
    with pytest.raises(FailedPrecondition, match="attached"):
        asyncio.run(mgr.delete(vid))
    assert mgr.release("sbx_a") == [vid]
    mgr.attach(vid, "sbx_b", "/data")
    assert mgr.reconcile({"sbx_other"}) == [vid]  # sbx_b vanished during a restart
    asyncio.run(mgr.delete(vid))
    assert not mgr.path(vid).exists()
    with pytest.raises(NotFound):
        mgr.get(vid)
    mgr.close()


@pytest.mark.parametrize(
    "path",
    ["", "workspace", "./x", "/a/../b", "/a/", "//a", "/a//b", "/", "/proc", "/dev/x", "/a b"],
)
def test_bad_mount_paths_name_the_field(path: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        check_mount_path(path)
    assert e.value.field == "volume_mount_path"


def test_good_mount_paths() -> None:
    for p in ("/workspace", "/home/user/data", "/mnt/v-1"):
        assert check_mount_path(p) == p


def test_bad_inputs(state_dir: Path) -> None:
    mgr = VolumeManager(state_dir, max_size_mb=1024)
    for name, size, field in [
        ("", 32, "name"),
        ("a/b", 32, "name"),
        ("x" * 65, 32, "name"),
        ("ok", 0, "size_mb"),
        ("ok", 8, "size_mb"),
        ("ok", 2048, "size_mb"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            asyncio.run(mgr.create(name, size))
        assert e.value.field == field, (name, size)
    asyncio.run(mgr.create("dup", 32))
    with pytest.raises(FailedPrecondition, match="dup"):
        asyncio.run(mgr.create("dup", 32))
    with pytest.raises(NotFound):
        mgr.get("vol_000000000000")
    with pytest.raises(InvalidArgument):
        mgr.get("not-a-volume")
    with pytest.raises(NotFound):
        mgr.attach("vol_000000000000", "sbx_a", "/w")
    with pytest.raises(InvalidArgument, match="volume_mount_path"):
        mgr.attach(mgr.list_volumes()[0].volume_id, "sbx_a", "relative")
    # Nothing half-made is left: only the one volume's disk and the database.
    assert sorted(p.suffix for p in mgr.dir.glob("vol_*")) == [".ext4"]
    mgr.close()


def test_crash_leftovers_are_removed_at_start(state_dir: Path) -> None:
    (state_dir / "volumes").mkdir()
    (state_dir / "volumes" / "vol_aaaaaaaaaaaa.ext4.tmp").write_bytes(b"x")
    (state_dir / "volumes" / "vol_bbbbbbbbbbbb.ext4").write_bytes(b"x")
    mgr = VolumeManager(state_dir)
    assert list(mgr.dir.glob("vol_*")) == []
    mgr.close()


def test_service_statuses_over_grpc(state_dir: Path) -> None:
    async def main() -> None:
        mgr = VolumeManager(state_dir, max_size_mb=512)
        server = grpc.aio.server(interceptors=[EdgeInterceptor()])
        add_to_server(server, mgr)
        sock = f"unix:{state_dir}/h.sock"
        server.add_insecure_port(sock)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(sock) as ch:
                stub = volume_pb2_grpc.VolumeServiceStub(ch)
                info = await stub.Create(volume_pb2.CreateVolumeRequest(name="w", size_mb=32))
                assert info.volume_id.startswith("vol_") and info.size_mb == 32
                got = await stub.Get(volume_pb2.GetVolumeRequest(volume_id=info.volume_id))
                assert got.name == "w" and got.attached_to == ""
                lst = await stub.List(volume_pb2.ListVolumesRequest())
                assert [v.volume_id for v in lst.volumes] == [info.volume_id]
                cases = [
                    (stub.Get, volume_pb2.GetVolumeRequest(volume_id="vol_zzzzzzzzzzzz"),
                     grpc.StatusCode.NOT_FOUND),
                    (stub.Get, volume_pb2.GetVolumeRequest(volume_id="x"),
                     grpc.StatusCode.INVALID_ARGUMENT),
                    (stub.Create, volume_pb2.CreateVolumeRequest(name="w", size_mb=32),
                     grpc.StatusCode.FAILED_PRECONDITION),
                    (stub.Create, volume_pb2.CreateVolumeRequest(name="big", size_mb=4096),
                     grpc.StatusCode.INVALID_ARGUMENT),
                ]  # fmt: skip
                for call, req, code in cases:
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await call(req)  # type: ignore[operator]
                    assert e.value.code() == code, (req, e.value.details())
                mgr.attach(info.volume_id, "sbx_x", "/w")
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Delete(volume_pb2.DeleteVolumeRequest(volume_id=info.volume_id))
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                mgr.release("sbx_x")
                await stub.Delete(volume_pb2.DeleteVolumeRequest(volume_id=info.volume_id))
                assert (await stub.List(volume_pb2.ListVolumesRequest())).volumes == []
        finally:
            await server.stop(None)
            mgr.close()

    asyncio.run(main())
    assert not os.path.exists(state_dir / "h.sock")

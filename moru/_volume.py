"""Volumes: persistent disks that outlive sandboxes (`Volume`, `AsyncVolume`).

A volume is mounted by one sandbox at a time: `Sandbox.create(volume_id=...,
volume_mount_path="/workspace")`; what it wrote is there for the next
sandbox that mounts it. hostd refuses (FailedPreconditionException) a second
mount or a delete while a sandbox has it.
"""

from __future__ import annotations

from typing import Any

from moru import _loop
from moru._connection import ConnectionConfig, channel
from moru._errors import InvalidArgumentException, NotFoundException, translate
from moru._models import VolumeInfo
from moru_proto.host.v1 import volume_pb2 as pb
from moru_proto.host.v1 import volume_pb2_grpc


def _call(api_key: str | None, hostd: str | None) -> tuple[Any, ConnectionConfig]:
    config = ConnectionConfig.resolve(hostd=hostd, api_key=api_key)
    return volume_pb2_grpc.VolumeServiceStub(channel(config)), config


class AsyncVolume:
    """Volumes on the node, asyncio API (`await AsyncVolume.create("data", 1024)`)."""

    @staticmethod
    async def create(
        name: str, size_mb: int = 1024, *, api_key: str | None = None, hostd: str | None = None
    ) -> VolumeInfo:
        """A new empty ext4 volume; `name` is unique on the node."""
        if isinstance(size_mb, bool) or not isinstance(size_mb, int) or size_mb <= 0:
            raise InvalidArgumentException(f"size_mb: expected a whole number > 0, got {size_mb!r}")
        stub, config = _call(api_key, hostd)
        with translate(f"creating volume {name!r}", address=config.address):
            info = await stub.Create(
                pb.CreateVolumeRequest(name=name, size_mb=size_mb),
                metadata=config.metadata(),
                timeout=config.request_timeout,
            )
        return VolumeInfo.from_proto(info)

    @staticmethod
    async def get(
        volume_id: str, *, api_key: str | None = None, hostd: str | None = None
    ) -> VolumeInfo:
        """One volume; NotFoundException if there is none with that id."""
        stub, config = _call(api_key, hostd)
        with translate(f"getting volume {volume_id}", address=config.address):
            info = await stub.Get(
                pb.GetVolumeRequest(volume_id=volume_id),
                metadata=config.metadata(),
                timeout=config.request_timeout,
            )
        return VolumeInfo.from_proto(info)

    @staticmethod
    async def list(*, api_key: str | None = None, hostd: str | None = None) -> list[VolumeInfo]:
        stub, config = _call(api_key, hostd)
        with translate("listing volumes", address=config.address):
            resp = await stub.List(
                pb.ListVolumesRequest(), metadata=config.metadata(), timeout=config.request_timeout
            )
        return [VolumeInfo.from_proto(v) for v in resp.volumes]

    @staticmethod
    async def delete(
        volume_id: str, *, api_key: str | None = None, hostd: str | None = None
    ) -> bool:
        """Deletes the volume and its data; False if it did not exist."""
        stub, config = _call(api_key, hostd)
        try:
            with translate(f"deleting volume {volume_id}", address=config.address):
                await stub.Delete(
                    pb.DeleteVolumeRequest(volume_id=volume_id),
                    metadata=config.metadata(),
                    timeout=config.request_timeout,
                )
        except NotFoundException:
            return False
        return True


class Volume:
    """Volumes on the node: `Volume.create(name, size_mb)`, `Volume.list()`,
    `Volume.get(volume_id)`, `Volume.delete(volume_id)`."""

    @staticmethod
    def create(
        name: str, size_mb: int = 1024, *, api_key: str | None = None, hostd: str | None = None
    ) -> VolumeInfo:
        return _loop.run(AsyncVolume.create(name, size_mb, api_key=api_key, hostd=hostd))

    @staticmethod
    def get(volume_id: str, *, api_key: str | None = None, hostd: str | None = None) -> VolumeInfo:
        return _loop.run(AsyncVolume.get(volume_id, api_key=api_key, hostd=hostd))

    @staticmethod
    def list(*, api_key: str | None = None, hostd: str | None = None) -> list[VolumeInfo]:
        return _loop.run(AsyncVolume.list(api_key=api_key, hostd=hostd))

    @staticmethod
    def delete(volume_id: str, *, api_key: str | None = None, hostd: str | None = None) -> bool:
        return _loop.run(AsyncVolume.delete(volume_id, api_key=api_key, hostd=hostd))

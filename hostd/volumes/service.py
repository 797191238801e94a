"""VolumeService servicer: converts messages and calls VolumeManager, nothing else.

Errors are hostd.errors exceptions, mapped to statuses by hostd's
ErrorInterceptor.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from hostd.volumes.manager import VolumeManager
from hostd.volumes.store import VolumeRecord
from moru_proto.host.v1 import volume_pb2, volume_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]


def to_info(mgr: VolumeManager, rec: VolumeRecord) -> volume_pb2.VolumeInfo:
    ts = Timestamp()
    ts.FromNanoseconds(int(rec.created_at * 1e9))
    return volume_pb2.VolumeInfo(
        volume_id=rec.volume_id,
        name=rec.name,
        size_mb=rec.size_mb,
        created_at=ts,
        attached_to=rec.attached_to,
        used_bytes=mgr.used_bytes(rec.volume_id),
    )


class VolumeServicer(volume_pb2_grpc.VolumeServiceServicer):
    def __init__(self, manager: VolumeManager) -> None:
        self.mgr = manager

    async def Create(
        self, request: volume_pb2.CreateVolumeRequest, context: Ctx
    ) -> volume_pb2.VolumeInfo:
        return to_info(self.mgr, await self.mgr.create(request.name, request.size_mb))

    async def List(
        self, request: volume_pb2.ListVolumesRequest, context: Ctx
    ) -> volume_pb2.ListVolumesResponse:
        return volume_pb2.ListVolumesResponse(
            volumes=[to_info(self.mgr, r) for r in self.mgr.list_volumes()]
        )

    async def Get(
        self, request: volume_pb2.GetVolumeRequest, context: Ctx
    ) -> volume_pb2.VolumeInfo:
        return to_info(self.mgr, self.mgr.get(request.volume_id))

    async def Delete(
        self, request: volume_pb2.DeleteVolumeRequest, context: Ctx
    ) -> volume_pb2.DeleteVolumeResponse:
        await self.mgr.delete(request.volume_id)
        return volume_pb2.DeleteVolumeResponse()


def add_to_server(server: grpc.aio.Server, manager: VolumeManager) -> None:
    volume_pb2_grpc.add_VolumeServiceServicer_to_server(VolumeServicer(manager), server)

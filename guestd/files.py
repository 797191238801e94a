"""The Filesystem servicer: streamed reads and atomic streamed writes of any size.

Memory stays bounded on both paths: Read sends CHUNK-sized messages as gRPC
flow control lets it; Write writes each received message to a temporary
sibling (`.<name>.moru-tmp-<random>`) and renames it over the target when the
stream ends, so readers never see a half-written file and a dropped upload
leaves nothing behind. No fsync: atomic for readers, not crash-durable.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from guestd.allocator import keep_bulk_buffers
from guestd.as_user import acting_as, run_as
from guestd.errors import InvalidArgument, ResourceExhausted, path_error
from guestd.fileio import (
    BULK_MESSAGE,
    CHUNK,
    MAX_LIST,
    Upload,
    abs_path,
    entry_of,
    make_dirs,
    move,
    open_for_read,
    read_response_bytes,
    remove,
    require_dir,
)
from guestd.process.spawn import resolve_user
from guestd.rpc_types import Ctx
from moru_proto.guest.v1 import filesystem_pb2 as pb
from moru_proto.guest.v1 import filesystem_pb2_grpc

if TYPE_CHECKING:
    from guestd.transfers import Transfers


class FilesystemService(filesystem_pb2_grpc.FilesystemServicer):
    def __init__(self, keepalive: float, transfers: Transfers) -> None:
        self.keepalive = keepalive
        self.transfers = transfers

    async def OpenRead(self, request: pb.ReadRequest, context: Ctx) -> pb.Transfer:
        self.transfers.require_listener()
        src = open_for_read(request)
        try:
            return self.transfers.open_read(src, request)
        except BaseException:
            os.close(src.fd)
            raise

    async def OpenWrite(self, request: pb.WriteHeader, context: Ctx) -> pb.Transfer:
        return self.transfers.open_write(request)

    async def Read(  # type: ignore[override]  # bytes: pre-serialized responses
        self,
        request: pb.ReadRequest,
        context: Ctx,
    ) -> AsyncIterator[pb.ReadResponse | bytes]:
        src = open_for_read(request)
        try:
            if self.transfers.address and 0 < request.info_only_from <= src.available:
                yield pb.ReadResponse(info=src.info)  # the client takes OpenRead
                return
            pos = request.offset
            left = request.length if request.length else -1
            first = True
            while True:
                want = CHUNK if left < 0 else min(CHUNK, left)
                data = os.pread(src.fd, want, pos) if want else b""
                if first:
                    yield pb.ReadResponse(info=src.info, data=data)
                    first = False
                elif data:
                    yield read_response_bytes(data)
                if len(data) < want or not data:
                    return
                pos += len(data)
                if left > 0:
                    left -= len(data)
        finally:
            os.close(src.fd)

    async def Write(  # data messages are views: see write_request_of
        self,
        request_iterator: AsyncIterator[pb.WriteRequest | memoryview],
        context: Ctx,
    ) -> pb.WriteResponse:
        it = aiter(request_iterator)
        try:
            first = await anext(it)
        except StopAsyncIteration:
            raise InvalidArgument("header: the stream is empty") from None
        if isinstance(first, memoryview) or first.WhichOneof("message") != "header":
            raise InvalidArgument("header: the first message must be a header")
        upload = Upload(first.header)
        try:
            async for req in it:
                if isinstance(req, memoryview):
                    view = req
                    if len(view) >= BULK_MESSAGE:
                        keep_bulk_buffers()
                elif req.WhichOneof("message") == "header":
                    raise InvalidArgument("header: only the first message may be a header")
                else:  # data, encoded in a way write_request_of leaves to protobuf
                    view = memoryview(req.data)
                upload.write(view)
            if context.cancelled():
                raise asyncio.CancelledError
            return upload.finish()
        finally:
            upload.abort()

    async def Stat(
        self,
        request: pb.StatRequest,
        context: Ctx,
    ) -> pb.StatResponse:
        path = abs_path(request.path)
        with acting_as(request.user):
            return pb.StatResponse(entry=entry_of(path))

    async def ListDir(
        self,
        request: pb.ListDirRequest,
        context: Ctx,
    ) -> pb.ListDirResponse:
        root = abs_path(request.path)
        with acting_as(request.user):
            require_dir(root)
        depth = max(1, request.depth)
        out: list[pb.EntryInfo] = []

        def walk(d: str, level: int) -> None:
            try:
                with os.scandir(d) as it:
                    items = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                if d == root:
                    raise path_error(exc, d) from None
                return
            for e in items:
                if len(out) >= MAX_LIST:
                    raise ResourceExhausted(
                        f"path: more than {MAX_LIST} entries under {root}; use a smaller depth"
                    )
                out.append(entry_of(e.path, e.stat(follow_symlinks=False)))
                if level < depth and e.is_dir(follow_symlinks=False):
                    walk(e.path, level + 1)

        await run_as(request.user, walk, root, 1)
        return pb.ListDirResponse(entries=out)

    async def MakeDir(
        self,
        request: pb.MakeDirRequest,
        context: Ctx,
    ) -> pb.MakeDirResponse:
        path = abs_path(request.path)
        user = resolve_user(request.user)
        with acting_as(request.user):
            created = make_dirs(path, user.uid, user.gid, request.mode or 0o755)
        return pb.MakeDirResponse(entry=entry_of(path), created=created)

    async def Move(
        self,
        request: pb.MoveRequest,
        context: Ctx,
    ) -> pb.MoveResponse:
        src = abs_path(request.source, "source")
        dst = abs_path(request.destination, "destination")
        await run_as(request.user, move, src, dst, request.user)
        return pb.MoveResponse(entry=entry_of(dst))

    async def Remove(
        self,
        request: pb.RemoveRequest,
        context: Ctx,
    ) -> pb.RemoveResponse:
        path = abs_path(request.path)
        if path == "/":
            raise InvalidArgument("path: refusing to remove /")
        await run_as(request.user, remove, path, request.recursive)
        return pb.RemoveResponse()

    async def Watch(
        self,
        request: pb.WatchRequest,
        context: Ctx,
    ) -> AsyncIterator[pb.WatchEvent]:
        from guestd.watch import watch

        path = abs_path(request.path)
        async for ev in watch(path, request.recursive, self.keepalive, request.user):
            yield ev

"""`sandbox.files` for AsyncSandbox: streamed read/write, listing, watching.

Reads and writes stream in CHUNK-sized messages, so a file of any size passes
with bounded memory; large files held in memory go over hostd's data relay
instead when it has one (moru._transfer). Streams carry no gRPC deadline (a large upload must not
be cut off by the client); unary calls use the connection's request_timeout.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
)
from typing import IO, Any, Literal

from moru import _transfer
from moru._connection import EOF
from moru._errors import NotFoundException, SandboxException
from moru._guest import GuestTarget
from moru._models import EntryInfo, FilesystemEvent
from moru_proto.guest.v1 import filesystem_pb2 as pb

CHUNK = 1024 * 1024
INFO_ONLY_FROM = _transfer.DATA_MIN  # files this big come whole over the relay
ReadFormat = Literal["text", "bytes", "stream"]
WriteData = str | bytes | bytearray | memoryview | IO[Any] | Iterable[Any] | AsyncIterable[Any]
EventCallback = Callable[[FilesystemEvent], Any] | Callable[[FilesystemEvent], Awaitable[Any]]


def _as_bytes(piece: Any) -> bytes:
    if isinstance(piece, str):
        return piece.encode()
    if isinstance(piece, bytes | bytearray | memoryview):
        return bytes(piece)
    raise TypeError(f"files.write: chunks must be str or bytes, got {type(piece).__name__}")


async def chunks_of(data: WriteData) -> AsyncIterator[bytes]:
    """Any accepted `data` as bytes chunks of at most CHUNK, read lazily.

    Blocking sources (file objects, plain iterators) are read in a worker
    thread so the event loop never waits on them.
    """
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for i in range(0, len(view), CHUNK):
            yield bytes(view[i : i + CHUNK])
        return
    if isinstance(data, AsyncIterable):
        async for piece in data:
            b = _as_bytes(piece)
            for i in range(0, len(b), CHUNK):
                yield b[i : i + CHUNK]
        return
    read = getattr(data, "read", None)
    if callable(read):
        while True:
            piece = await asyncio.to_thread(read, CHUNK)
            if not piece:
                return
            yield _as_bytes(piece)
    if isinstance(data, Iterable):
        it = iter(data)
        sentinel = object()
        while True:
            piece = await asyncio.to_thread(next, it, sentinel)
            if piece is sentinel:
                return
            b = _as_bytes(piece)
            for i in range(0, len(b), CHUNK):
                yield b[i : i + CHUNK]
    raise TypeError(f"files.write: cannot write {type(data).__name__}")


class AsyncWatchHandle:
    """A directory watch: iterate events (`async for`), or get them by callback.

    `stop()` ends the watch; iteration then finishes.
    """

    def __init__(self, target: GuestTarget, call: Any, on_event: EventCallback | None) -> None:
        self._target = target
        self._call = call
        self._on_event = on_event
        self._queue: asyncio.Queue[FilesystemEvent | None] = asyncio.Queue()
        self._error: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        try:
            with self._target.errors("watching directory"):
                while True:
                    ev = await self._call.read()
                    if ev is EOF:
                        return
                    if ev.WhichOneof("event") != "filesystem":
                        continue
                    fe = FilesystemEvent.from_proto(ev.filesystem)
                    if self._on_event is not None:
                        r = self._on_event(fe)
                        if inspect.isawaitable(r):
                            await r
                    self._queue.put_nowait(fe)
        except asyncio.CancelledError:
            raise
        except SandboxException as e:
            if e.code != "CANCELLED":
                self._error = e
        finally:
            self._queue.put_nowait(None)

    def get_new_events(self) -> list[FilesystemEvent]:
        """The events received since the last call (without waiting)."""
        out: list[FilesystemEvent] = []
        while not self._queue.empty():
            ev = self._queue.get_nowait()
            if ev is None:
                self._queue.put_nowait(None)
                break
            out.append(ev)
        if self._error is not None and not out:
            raise self._error
        return out

    async def __aiter__(self) -> AsyncIterator[FilesystemEvent]:
        while True:
            ev = await self._queue.get()
            if ev is None:
                self._queue.put_nowait(None)
                if self._error is not None:
                    raise self._error
                return
            yield ev

    async def stop(self) -> None:
        """Ends the watch."""
        self._call.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


class AsyncFiles:
    """Files in one sandbox (`sandbox.files`). Paths are absolute. Every call
    takes `user` (name or uid): guestd then acts with that user's rights, so
    what they may not do fails with PermissionDeniedException. Default: root."""

    def __init__(self, target: GuestTarget) -> None:
        self._target = target

    def _md(self) -> tuple[tuple[str, str], ...]:
        return self._target.metadata

    async def read_stream(self, path: str, user: str | None = None) -> AsyncGenerator[bytes, None]:
        """The file's content in chunks, as they arrive."""
        gen = self._read_stream(path, user)
        try:
            async for piece in gen:
                yield piece
        finally:
            await gen.aclose()

    async def _read_stream(
        self, path: str, user: str | None, sized: bool = False, offset: int = 0,
        length: int = 0, info_only_from: int = 0,
    ) -> AsyncGenerator[Any, None]:
        """read_stream; with `sized`, first the file's EntryInfo."""
        call = self._target.filesystem().Read(
            pb.ReadRequest(path=path, user=user or "", offset=offset, length=length,
                           info_only_from=info_only_from),
            metadata=self._md(),
        )
        try:
            with self._target.errors(f"reading {path}"):
                while True:
                    msg = await call.read()
                    if msg is EOF:
                        return
                    if sized and msg.HasField("info"):
                        sized = False
                        yield msg.info
                    if msg.data:
                        yield msg.data
        finally:
            call.cancel()

    async def _read_in_parts(self, path: str, user: str | None) -> bytes | bytearray | None:
        """The file from one Read call of at most CHUNK (the whole of a small
        file: one message, one call), which for a file of DATA_MIN or more
        answers only its info (info_only_from): that file then comes whole
        over the data relay, with no 1 MiB head through gRPC to wait for and
        join (~150 ms of a 64 MiB read). A guestd without info_only_from sends
        the head: the rest comes after it, over the relay or a second Read.
        None: the file changed between the parts (the caller reads it whole
        in one stream)."""
        first: pb.EntryInfo | None = None
        head = bytearray()
        async for piece in self._read_stream(path, user, sized=True, length=CHUNK,
                                             info_only_from=INFO_ONLY_FROM):
            if isinstance(piece, pb.EntryInfo):
                first = piece
            else:
                head += piece
        if first is not None and not head and first.size >= INFO_ONLY_FROM > 0:
            whole = await _transfer.read(self._target, pb.ReadRequest(path=path, user=user or ""))
            return whole  # None: this hostd has no relay after all (the caller uses Read)
        if len(head) < CHUNK or first is None:
            return head  # it ended before the CHUNK asked for: the whole file
        if _transfer.usable(self._target, first.size):
            req = pb.ReadRequest(path=path, user=user or "", offset=len(head))
            out = await _transfer.read_after(self._target, req, head, first)
            if out is not None or _transfer.usable(self._target, first.size):
                return out  # else: this hostd has no relay, fall through to Read
        rest = self._read_stream(path, user, sized=True, offset=len(head))
        try:
            async for piece in rest:
                if isinstance(piece, pb.EntryInfo):
                    if piece.size != first.size or piece.modified_time != first.modified_time:
                        return None
                else:
                    head += piece
        finally:
            await rest.aclose()
        return head

    async def _open_stream(self, path: str, user: str | None = None) -> AsyncIterator[bytes]:
        """read_stream, but fails now (not at first iteration) for a missing file."""
        gen = self.read_stream(path, user)
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = b""

        async def rest() -> AsyncIterator[bytes]:
            try:
                if first:
                    yield first
                async for piece in gen:
                    yield piece
            finally:
                await gen.aclose()

        return rest()

    async def read(self, path: str, format: ReadFormat = "text", user: str | None = None) -> Any:
        """The file's content: str ("text"), bytes ("bytes") or an async
        iterator of bytes chunks ("stream", for files too large for memory).
        With `user`, the file is read with that user's rights."""
        if format == "stream":
            return await self._open_stream(path, user)
        if format not in ("text", "bytes"):
            raise ValueError(
                f'files.read: format must be "text", "bytes" or "stream", not {format!r}'
            )
        if _transfer.reachable(self._target):
            parts = await self._read_in_parts(path, user)
            if parts is not None:
                return parts.decode() if format == "text" else bytes(parts)
        buf = bytearray()
        gen = self._read_stream(path, user)
        try:
            async for piece in gen:
                buf += piece
        finally:
            await gen.aclose()
        return buf.decode() if format == "text" else bytes(buf)

    async def write(
        self, path: str, data: WriteData, user: str | None = None, mode: int | None = None
    ) -> EntryInfo:
        """Writes `data` (str, bytes, a file object, or an (async) iterator of
        chunks) to `path`, streamed; parents are created; atomic replace.
        With `user`, written with that user's rights and owned by them."""

        if isinstance(data, str):
            data = data.encode()
        if isinstance(data, bytes | bytearray | memoryview):
            view = memoryview(data).cast("B")
            if _transfer.usable(self._target, view.nbytes):
                header = pb.WriteHeader(path=path, user=user or "", mode=mode or 0,
                                        size=view.nbytes)
                done = await _transfer.write(self._target, header, view)
                if done is not None:
                    return EntryInfo.from_proto(done.entry)

        async def requests() -> AsyncIterator[pb.WriteRequest]:
            yield pb.WriteRequest(header=pb.WriteHeader(path=path, user=user or "", mode=mode or 0))
            async for piece in chunks_of(data):
                yield pb.WriteRequest(data=piece)

        with self._target.errors(f"writing {path}"):
            resp = await self._target.filesystem().Write(requests(), metadata=self._md())
        return EntryInfo.from_proto(resp.entry)

    async def list(self, path: str, depth: int = 1, user: str | None = None) -> list[EntryInfo]:
        """Entries under a directory, `depth` levels deep."""
        with self._target.errors(f"listing {path}"):
            resp = await self._target.filesystem().ListDir(
                pb.ListDirRequest(path=path, depth=depth, user=user or ""),
                metadata=self._md(),
                timeout=self._target.timeout,
            )
        return [EntryInfo.from_proto(e) for e in resp.entries]

    async def get_info(self, path: str, user: str | None = None) -> EntryInfo:
        """Type, size, mode, owner and mtime of a path."""
        with self._target.errors(f"stat {path}"):
            resp = await self._target.filesystem().Stat(
                pb.StatRequest(path=path, user=user or ""),
                metadata=self._md(),
                timeout=self._target.timeout,
            )
        return EntryInfo.from_proto(resp.entry)

    async def exists(self, path: str, user: str | None = None) -> bool:
        """False when `path` does not exist (PermissionDeniedException when
        `user` may not look)."""
        try:
            await self.get_info(path, user)
        except NotFoundException:
            return False
        return True

    async def remove(self, path: str, user: str | None = None) -> None:
        """Removes a file, or a directory with its contents."""
        with self._target.errors(f"removing {path}"):
            await self._target.filesystem().Remove(
                pb.RemoveRequest(path=path, recursive=True, user=user or ""),
                metadata=self._md(),
                timeout=self._target.timeout,
            )

    async def rename(self, old_path: str, new_path: str, user: str | None = None) -> EntryInfo:
        with self._target.errors(f"renaming {old_path} to {new_path}"):
            resp = await self._target.filesystem().Move(
                pb.MoveRequest(source=old_path, destination=new_path, user=user or ""),
                metadata=self._md(),
                timeout=self._target.timeout,
            )
        return EntryInfo.from_proto(resp.entry)

    async def make_dir(self, path: str, user: str | None = None) -> bool:
        """Creates a directory and its parents; False if it existed already."""
        with self._target.errors(f"making directory {path}"):
            resp = await self._target.filesystem().MakeDir(
                pb.MakeDirRequest(path=path, user=user or ""),
                metadata=self._md(),
                timeout=self._target.timeout,
            )
        return bool(resp.created)

    async def watch_dir(
        self,
        path: str,
        on_event: EventCallback | None = None,
        recursive: bool = False,
        user: str | None = None,
    ) -> AsyncWatchHandle:
        """Watches a directory; returns once the watch is in place, so every
        change made after this call is reported."""
        call = self._target.filesystem().Watch(
            pb.WatchRequest(path=path, recursive=recursive, user=user or ""), metadata=self._md()
        )
        with self._target.errors(f"watching {path}"):
            while True:
                ev = await call.read()
                if ev is EOF:
                    raise SandboxException(f"watch of {path} ended before it started")
                if ev.WhichOneof("event") == "started":
                    break
        return AsyncWatchHandle(self._target, call, on_event)

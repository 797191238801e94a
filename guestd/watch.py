"""Filesystem watches through inotify (via ctypes: no third-party dependency).

The kernel queues events (bounded by fs.inotify.max_queued_events), and this
generator reads them only as fast as the client takes them, so a slow watcher
never grows guestd's memory. guestd's own temporary upload files are hidden:
a Write shows up as a create (or write) of the target, not of its temp file.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
from collections.abc import AsyncIterator

from guestd.as_user import acting_as
from guestd.errors import NotFound, path_error
from guestd.fileio import require_dir
from moru_proto.guest.v1 import filesystem_pb2 as pb

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
IN_Q_OVERFLOW = 0x4000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
MASK = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
HEADER = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


def _check(rc: int, what: str) -> int:
    if rc < 0:
        e = ctypes.get_errno()
        raise path_error(OSError(e, os.strerror(e)), what)
    return rc


def _kind(mask: int) -> pb.EventType.ValueType:
    if mask & (IN_CREATE | IN_MOVED_TO):
        return pb.EVENT_TYPE_CREATE
    if mask & IN_MODIFY:
        return pb.EVENT_TYPE_WRITE
    if mask & IN_DELETE:
        return pb.EVENT_TYPE_REMOVE
    if mask & IN_MOVED_FROM:
        return pb.EVENT_TYPE_RENAME
    if mask & IN_ATTRIB:
        return pb.EVENT_TYPE_CHMOD
    return pb.EVENT_TYPE_UNSPECIFIED


class _Inotify:
    def __init__(self, root: str, recursive: bool, user: str = "") -> None:
        self.user = user  # directories are watched with this user's rights
        with acting_as(user):
            require_dir(root)
        self.fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify")
        self.root = root
        self.recursive = recursive
        self.dirs: dict[int, str] = {}
        self.add(root)
        if recursive:
            for d, subdirs, _ in os.walk(root):
                for s in subdirs:
                    self.add(os.path.join(d, s))

    def add(self, path: str) -> None:
        try:
            with acting_as(self.user):
                wd = _check(_libc.inotify_add_watch(self.fd, os.fsencode(path), MASK), path)
        except NotFound:
            if path == self.root:
                raise
            return  # a subdirectory vanished before we got to it
        self.dirs[wd] = path

    def read(self) -> list[pb.FilesystemEvent]:
        out: list[pb.FilesystemEvent] = []
        try:
            buf = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return out
        pos = 0
        while pos < len(buf):
            wd, mask, _cookie, size = HEADER.unpack_from(buf, pos)
            name = (
                buf[pos + HEADER.size : pos + HEADER.size + size]
                .rstrip(b"\0")
                .decode(errors="surrogateescape")
            )
            pos += HEADER.size + size
            if mask & IN_IGNORED:
                self.dirs.pop(wd, None)
                continue
            base = self.dirs.get(wd)
            if base is None or not name or ".moru-tmp-" in name:
                continue
            full = os.path.join(base, name)
            if self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                self.add(full)
            kind = _kind(mask)
            if kind != pb.EVENT_TYPE_UNSPECIFIED:
                out.append(
                    pb.FilesystemEvent(type=kind, path=full, name=os.path.relpath(full, self.root))
                )
        return out

    def close(self) -> None:
        os.close(self.fd)


async def watch(
    path: str, recursive: bool, keepalive: float, user: str = ""
) -> AsyncIterator[pb.WatchEvent]:
    """Started, then filesystem events (and keepalives) until the client goes away."""
    ino = _Inotify(path, recursive, user)
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(ino.fd, ready.set)
    try:
        yield pb.WatchEvent(started=pb.WatchStarted())
        while True:
            ready.clear()
            events = ino.read()
            for ev in events:
                yield pb.WatchEvent(filesystem=ev)
            if events:
                continue
            if not ino.dirs:
                return  # the watched directory itself is gone
            try:
                await asyncio.wait_for(ready.wait(), keepalive)
            except TimeoutError:
                yield pb.WatchEvent(keepalive=pb.KeepAliveEvent())
    finally:
        loop.remove_reader(ino.fd)
        ino.close()

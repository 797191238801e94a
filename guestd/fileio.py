"""File operations as a guest user, shared by the Filesystem servicer and the
data listener: paths and entries, opening for read, and uploads written to a
temporary sibling that is renamed over the target when complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from dataclasses import dataclass

from guestd.allocator import keep_bulk_buffers
from guestd.as_user import acting_as
from guestd.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    path_error,
)
from guestd.process.spawn import group_name, resolve_user
from guestd.wire import len_key, only_field, varint
from moru_proto.guest.v1 import filesystem_pb2 as pb

CHUNK = 1024 * 1024
BULK_MESSAGE = 128 * 1024  # an upload in messages this big is a bulk transfer
_DATA_KEY = len_key(pb.ReadResponse, "data")
_WRITE_DATA_KEY = len_key(pb.WriteRequest, "data")


def write_request_of(raw: bytes) -> pb.WriteRequest | memoryview:
    """Write's request deserializer: a data message becomes a view of its
    payload inside the received bytes. protobuf would copy the payload into
    the message and once more on every read of `data`; with 1 MiB messages
    those two copies were half of guestd's cost per uploaded byte."""
    view = only_field(raw, _WRITE_DATA_KEY)
    return view if view is not None else pb.WriteRequest.FromString(raw)


def read_response_bytes(data: bytes) -> bytes:
    """A serialized ReadResponse{data}, built with one copy of `data` (protobuf
    makes two); the edge interceptor sends bytes as they are."""
    return b"".join((_DATA_KEY, varint(len(data)), data))


TMP_MARK = ".moru-tmp-"
MAX_LIST = 200_000


def abs_path(path: str, field: str = "path") -> str:
    """A normalized absolute path, or INVALID_ARGUMENT naming `field`."""
    if not path:
        raise InvalidArgument(f"{field}: required")
    if not path.startswith("/"):
        raise InvalidArgument(f"{field}: must be an absolute path, got {path!r}")
    if "\0" in path:
        raise InvalidArgument(f"{field}: contains a NUL byte")
    return os.path.normpath(path).replace("//", "/")


def _owner(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def entry_of(path: str, st: os.stat_result | None = None) -> pb.EntryInfo:
    try:
        st = st or os.lstat(path)
    except OSError as exc:
        raise path_error(exc, path) from None
    if stat.S_ISLNK(st.st_mode):
        kind, target = pb.FILE_TYPE_SYMLINK, os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        kind, target = pb.FILE_TYPE_DIRECTORY, ""
    elif stat.S_ISREG(st.st_mode):
        kind, target = pb.FILE_TYPE_FILE, ""
    else:
        kind, target = pb.FILE_TYPE_OTHER, ""
    info = pb.EntryInfo(
        name=os.path.basename(path) or "/",
        path=path,
        type=kind,
        size=st.st_size,
        mode=stat.S_IMODE(st.st_mode),
        owner=_owner(st.st_uid),
        group=group_name(st.st_gid),
        symlink_target=target,
    )
    info.modified_time.FromNanoseconds(st.st_mtime_ns)
    return info


def require_dir(path: str) -> None:
    """NOT_FOUND or FAILED_PRECONDITION unless `path` is a directory."""
    if not os.path.isdir(path):
        if os.path.lexists(path):
            raise FailedPrecondition(f"path: {path} is not a directory")
        raise NotFound(f"path: no such directory {path}")


def make_dirs(path: str, uid: int, gid: int, mode: int = 0o755) -> bool:
    """mkdir -p, chowning what it creates; False when `path` was a directory already."""
    if os.path.isdir(path):
        return False
    if os.path.lexists(path):
        raise AlreadyExists(f"path: {path} exists and is not a directory")
    parent = os.path.dirname(path)
    if parent != path:
        make_dirs(parent, uid, gid, mode)
    try:
        os.mkdir(path, mode)
        os.chown(path, uid, gid)
    except FileExistsError:
        return False
    except OSError as exc:
        raise path_error(exc, path) from None
    return True


PSEUDO_FS = ("/proc/", "/sys/")


def _in_place(path: str, st: os.stat_result) -> bool:
    """Devices, FIFOs and /proc or /sys files are written as they are: no temporary
    sibling can be created (or renamed) there, and they have no content to keep."""
    return not stat.S_ISREG(st.st_mode) or path.startswith(PSEUDO_FS)


def _prepare_write(h: pb.WriteHeader, path: str) -> tuple[str, int, int, int, int, bool]:
    """(file to open, open flags, mode, uid, gid, target existed) for a Write;
    creates missing parents owned by the writer."""
    if os.path.isdir(path):
        raise FailedPrecondition(f"path: {path} is a directory")
    user = resolve_user(h.user) if h.user else None
    old = None
    try:
        old = os.stat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise path_error(exc, path) from None
    uid = user.uid if user else (old.st_uid if old else 0)
    gid = user.gid if user else (old.st_gid if old else 0)
    mode = h.mode or (stat.S_IMODE(old.st_mode) if old else 0o644)
    parent = os.path.dirname(path)
    make_dirs(parent, uid, gid)
    if old is not None and _in_place(path, old):
        return path, os.O_WRONLY | os.O_CLOEXEC, mode, uid, gid, True
    if h.append:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        return path, flags, mode, uid, gid, bool(old)
    tmp = os.path.join(parent, f".{os.path.basename(path)}{TMP_MARK}{os.urandom(4).hex()}")
    return tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode, uid, gid, bool(old)


def move(src: str, dst: str, user: str) -> None:
    try:
        os.lstat(src)
    except FileNotFoundError:
        raise NotFound(f"source: no such file or directory {src}") from None
    except OSError as exc:
        raise path_error(exc, src) from None
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        owner = resolve_user(user)
        make_dirs(parent, owner.uid, owner.gid)
    try:
        import shutil  # here: shutil loads zlib, bz2 and lzma, a cost at every guest boot

        shutil.move(src, dst)
    except OSError as exc:
        raise path_error(exc, dst) from None


def remove(path: str, recursive: bool) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            if recursive:
                import shutil

                shutil.rmtree(path)
                return
            try:
                os.rmdir(path)
            except OSError as exc:
                if exc.errno == errno.ENOTEMPTY:
                    raise FailedPrecondition(
                        f"path: directory {path} is not empty (set recursive)"
                    ) from None
                raise
        else:
            os.unlink(path)
    except OSError as exc:
        raise path_error(exc, path) from None


MAX_DEVICE_READ = 64 << 20
DIRECT_ALIGN = 4096  # O_DIRECT offsets and lengths: a page covers every block size here


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


@dataclass
class ReadSource:
    fd: int
    info: pb.EntryInfo
    available: int  # bytes from the offset to the end of the file when opened


def open_for_read(request: pb.ReadRequest) -> ReadSource:
    """Checks a read as Read does and opens the file; the caller closes `fd`."""
    path = abs_path(request.path)
    if request.offset < 0:
        raise InvalidArgument(f"offset: must be >= 0, got {request.offset}")
    if request.length < 0:
        raise InvalidArgument(f"length: must be >= 0, got {request.length}")
    try:
        with acting_as(request.user):
            st = os.stat(path)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) and not (
                stat.S_ISCHR(st.st_mode) and 0 < request.length <= MAX_DEVICE_READ
            ):
                # a device or FIFO has no end (/dev/zero) or blocks (a FIFO with no writer)
                raise FailedPrecondition(
                    f"path: {path} is not a regular file ({_kind(st.st_mode)}); only regular "
                    f"files are read whole; a character device needs length (1..{MAX_DEVICE_READ})"
                )
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise path_error(exc, path) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise FailedPrecondition(f"path: {path} is a directory")
        if st.st_size - request.offset > CHUNK:
            keep_bulk_buffers()
        return ReadSource(fd, entry_of(path), max(0, st.st_size - request.offset))
    except BaseException:
        os.close(fd)
        raise


class Upload:
    """One atomic write in progress: a temporary sibling renamed over the
    target by `finish`, or removed by `abort` (a no-op after finish). Used by
    Write and by the data listener (guestd.transfers)."""

    def __init__(self, header: pb.WriteHeader) -> None:
        self.header = header
        self.path = abs_path(header.path)
        with acting_as(header.user):  # created and renamed with the writer's rights
            (self._target, flags, self._mode, self._uid, self._gid, self._replaces) = (
                _prepare_write(header, self.path)
            )
            self._in_place = not (flags & os.O_CREAT)
            try:
                self._fd = os.open(self._target, flags, self._mode)
            except OSError as exc:
                raise path_error(exc, self.path) from None
        self.written = 0
        self._done = False
        self._direct = False

    def direct_io(self) -> bool:
        """Switches to O_DIRECT (the data listener's large uploads): the disk
        then reads the bytes straight from guestd's buffer, so the guest CPU
        never copies them into the page cache, which under TCG was as costly
        as the vsock receive itself. False where the file system or target
        refuses it (tmpfs, a device): writes stay buffered."""
        if self._in_place or self.header.append:
            return False
        try:
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError:
            return False
        self._direct = True
        return True

    def _buffered(self) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        self._direct = False

    def _error(self, exc: OSError) -> Exception:
        err = path_error(exc, self.path)
        if isinstance(err, ResourceExhausted):
            return ResourceExhausted(f"path: {self.path}: no space left on the device")
        return err

    def write(self, view: memoryview) -> None:
        """With direct_io, `view` must start page-aligned; a length that is not
        a multiple of DIRECT_ALIGN (the last piece) is written buffered."""
        try:
            if self._direct and (len(view) % DIRECT_ALIGN or self.written % DIRECT_ALIGN):
                self._buffered()
            while view:
                try:
                    n = os.write(self._fd, view)
                except OSError as exc:
                    if exc.errno != errno.EINVAL or not self._direct:
                        raise
                    self._buffered()  # an alignment this device will not take
                    continue
                self.written += n
                view = view[n:]
        except OSError as exc:
            raise self._error(exc) from None

    def finish(self) -> pb.WriteResponse:
        h = self.header
        if h.HasField("size") and self.written != h.size:
            raise FailedPrecondition(
                f"size: header said {h.size} bytes, stream carried"
                f" {self.written}; {self.path} unchanged"
            )
        try:
            with acting_as(h.user):
                if not self._in_place and (not h.append or not self._replaces):
                    os.fchmod(self._fd, self._mode)
                    os.fchown(self._fd, self._uid, self._gid)
                fd, self._fd = self._fd, -1
                os.close(fd)
                if not h.append and not self._in_place:
                    os.rename(self._target, self.path)
        except OSError as exc:
            raise self._error(exc) from None
        self._done = True
        return pb.WriteResponse(entry=entry_of(self.path), bytes_written=self.written)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self._done and not self.header.append and not self._in_place:
            with contextlib.suppress(OSError), acting_as(self.header.user):
                os.unlink(self._target)
            self._done = True

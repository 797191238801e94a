"""guestd's one error vocabulary; `status_of` maps it (and OSError) to gRPC codes.

Handlers raise these (or let an OSError escape with `path_error`); the edge
interceptor in `guestd.server` is the only place that turns them into a gRPC
status, so clients never see a traceback and every message names the field or
path at fault.

    GuestdError
    +-- InvalidArgument      bad input: empty command, relative path, bad signal
    +-- NotFound             unknown pid, tag, path, user
    +-- AlreadyExists        a running process already has this tag
    +-- FailedPrecondition   write to a directory, input to a closed stdin
    +-- PermissionDenied     EACCES/EPERM
    +-- ResourceExhausted    ENOSPC, too many processes
    +-- Unauthenticated      missing or wrong access token
"""

from __future__ import annotations

import errno

import grpc


class GuestdError(Exception):
    """Base: a request failed for a reason the client can act on."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidArgument(GuestdError):
    """The request itself is wrong; fix the named field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(GuestdError):
    """The named pid, tag, path or user does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(GuestdError):
    """The named thing exists already (a running process's tag)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(GuestdError):
    """The target is in the wrong state for this call (ended, no stdin, a dir)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(GuestdError):
    """The guest refused access (EACCES/EPERM)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(GuestdError):
    """Disk full, or too many processes; free something and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(GuestdError):
    """The call lacks the access token given to Guest.Init."""

    code = grpc.StatusCode.UNAUTHENTICATED


_ERRNO: dict[int, type[GuestdError]] = {
    errno.ENOENT: NotFound,
    errno.ESRCH: NotFound,
    errno.EACCES: PermissionDenied,
    errno.EPERM: PermissionDenied,
    errno.EROFS: PermissionDenied,
    errno.ENOSPC: ResourceExhausted,
    errno.EDQUOT: ResourceExhausted,
    errno.EMFILE: ResourceExhausted,
    errno.ENFILE: ResourceExhausted,
    errno.EAGAIN: ResourceExhausted,
    errno.ENOMEM: ResourceExhausted,
    errno.EEXIST: AlreadyExists,
    errno.EISDIR: FailedPrecondition,
    errno.ENOTDIR: FailedPrecondition,
    errno.ENOTEMPTY: FailedPrecondition,
    errno.EXDEV: FailedPrecondition,
    errno.EBUSY: FailedPrecondition,
    errno.ETXTBSY: FailedPrecondition,
    errno.EINVAL: InvalidArgument,
    errno.ENAMETOOLONG: InvalidArgument,
    errno.ELOOP: InvalidArgument,
    errno.ENOEXEC: InvalidArgument,
}


def path_error(exc: OSError, what: str) -> GuestdError:
    """Translates an OSError about `what` (a path or field) into our vocabulary."""
    cls = _ERRNO.get(exc.errno or 0, GuestdError)
    reason = exc.strerror or str(exc)
    return cls(f"{what}: {reason.lower()}")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for `exc`."""
    if isinstance(exc, GuestdError):
        return exc.code, str(exc)
    if isinstance(exc, OSError):
        err = path_error(exc, exc.filename or "guest")
        return err.code, str(err)
    return grpc.StatusCode.INTERNAL, f"guestd internal error: {type(exc).__name__}: {exc}"

"""hostd's one error vocabulary, mapped to gRPC status codes once, at the edge.

    MoruError                 (INTERNAL)
    ├── NotFound              (NOT_FOUND)            unknown sandbox / template
    ├── InvalidArgument       (INVALID_ARGUMENT)     bad input; the message names the field
    ├── FailedPrecondition    (FAILED_PRECONDITION)  wrong state, e.g. a paused sandbox
    ├── ResourceExhausted     (RESOURCE_EXHAUSTED)   node full (sandboxes or memory)
    ├── Unauthenticated       (UNAUTHENTICATED)      missing/bad API key or access token
    ├── PermissionDenied      (PERMISSION_DENIED)
    ├── DeadlineExceeded      (DEADLINE_EXCEEDED)    e.g. the guest never got ready
    └── Unavailable           (UNAVAILABLE)          the guest cannot be reached right now

Code below the transport raises these; `hostd.interceptors.ErrorInterceptor`
turns them into statuses. Nothing else builds gRPC statuses by hand.
"""

from __future__ import annotations

import grpc


class MoruError(Exception):
    """Base of hostd's errors; unexpected ones surface as INTERNAL."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(MoruError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(MoruError):
    """Bad input; construct with the field name so callers know what to fix."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class FailedPrecondition(MoruError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(MoruError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(MoruError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MoruError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(MoruError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(MoruError):
    code = grpc.StatusCode.UNAVAILABLE


def sandbox_not_found(sandbox_id: str) -> NotFound:
    return NotFound(f"sandbox {sandbox_id!r} not found (killed, timed out or never existed)")

"""The SDK's exceptions, and the one place gRPC statuses become them.

    SandboxException                    base of everything the SDK raises
    ├── NotFoundException               NOT_FOUND: sandbox, template, path or pid
    │   └── SandboxEndedException       the sandbox ended (killed, timed out, paused,
    │                                   VM died) while the call was running
    ├── TimeoutException                DEADLINE_EXCEEDED; a command hit its own timeout
    ├── AuthenticationException         UNAUTHENTICATED; PERMISSION_DENIED from hostd
    ├── PermissionDeniedException       PERMISSION_DENIED inside the guest (file modes)
    ├── InvalidArgumentException        INVALID_ARGUMENT, OUT_OF_RANGE, ALREADY_EXISTS
    ├── NotEnoughSpaceException         RESOURCE_EXHAUSTED from a filesystem call (disk full)
    ├── RateLimitException              RESOURCE_EXHAUSTED elsewhere (node full)
    ├── FailedPreconditionException     FAILED_PRECONDITION, e.g. the sandbox is paused
    ├── ConnectionException             UNAVAILABLE: hostd or the guest cannot be reached
    └── CommandExitException            a command exited non-zero (carries the result)

`translate()` is the only code that looks at a gRPC status code; every other
module lets `grpc.RpcError` escape into it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from moru._models import CommandResult


class SandboxException(Exception):
    """Base of the SDK's errors. `code` is the gRPC status name when one caused it."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class NotFoundException(SandboxException):
    """The sandbox, template, file or process does not exist (any more).

    A sandbox disappears when killed or when its timeout passes; list the
    live ones with `Sandbox.list()`.
    """


class SandboxEndedException(NotFoundException):
    """The sandbox ended while this call was running: killed, timed out, its VM
    died, it failed (`error`), or it was paused.

    `sandbox_id` names it and `reason` says why ("killed", "timeout",
    "vmm_exited", "error", "paused"). A paused sandbox resumes with
    `Sandbox.connect(id)`; start the command again or `commands.connect(pid)`.
    """

    def __init__(self, message: str, *, sandbox_id: str, reason: str, code: str | None = None):
        super().__init__(message, code=code)
        self.sandbox_id = sandbox_id
        self.reason = reason


class TimeoutException(SandboxException, TimeoutError):
    """An operation took longer than allowed.

    For a command this is the command's own `timeout` (not the sandbox's):
    pass a larger `timeout=` to `commands.run`, or `timeout=0` for none.
    """


class AuthenticationException(SandboxException):
    """hostd refused the API key, or a secure sandbox's access token was wrong.

    Set `MORU_API_KEY` (or pass `api_key=`) to the key hostd was started with.
    """


class PermissionDeniedException(SandboxException):
    """The guest refused access to a path (file permissions); try `user="root"`."""


class InvalidArgumentException(SandboxException):
    """The request was wrong; the message names the field or path to fix."""


class NotEnoughSpaceException(SandboxException):
    """The sandbox's disk is full; remove files or create it with more disk."""


class RateLimitException(SandboxException):
    """The node has no room (too many sandboxes or not enough memory) right now.

    Kill sandboxes you no longer need, or retry later.
    """


class FailedPreconditionException(SandboxException):
    """The target is in the wrong state, e.g. a paused sandbox (call `connect()`)."""


class ConnectionException(SandboxException):
    """hostd (or the sandbox's guest agent) could not be reached.

    Check that `moru-hostd serve` runs and that `MORU_HOSTD` points to it.
    """


class CommandExitException(SandboxException):
    """A command exited with a non-zero code. The full result is attached.

    Read `stdout`, `stderr`, `exit_code` here, or catch it to accept failures.
    """

    def __init__(self, result: CommandResult) -> None:
        msg = f"command exited with code {result.exit_code}"
        if result.error:
            msg += f" ({result.error})"
        tail = result.stderr.strip()[-500:]
        if tail:
            msg += f"; stderr: {tail}"
        super().__init__(msg)
        self.result = result
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.exit_code = result.exit_code
        self.error = result.error


_HINTS: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.NOT_FOUND: "it may have been killed or timed out; see Sandbox.list()",
    grpc.StatusCode.UNAUTHENTICATED: "set MORU_API_KEY (or pass api_key=) to hostd's API key",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the call took too long; retry or raise request_timeout=",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "free resources (kill unused sandboxes) and retry",
    grpc.StatusCode.FAILED_PRECONDITION: "a paused sandbox resumes with Sandbox.connect(id)",
}


# Trailing metadata hostd adds when a call ends because its sandbox did.
END_REASON_HEADER = "moru-end-reason"
END_SANDBOX_HEADER = "moru-sandbox-id"
# Set by hostd on the statuses it raises itself (so it is up).
STATUS_FROM_HEADER = "moru-status-from"
# hostd's prefix for an unreachable guest (hostd.passthrough.GUEST_UNREACHABLE).
GUEST_UNREACHABLE = "hostd cannot reach the sandbox's guest agent"


def from_status(
    code: grpc.StatusCode,
    details: str,
    *,
    what: str,
    address: str = "",
    guest: bool = False,
    trailers: dict[str, str] | None = None,
) -> SandboxException:
    """Builds the exception for a gRPC status; `what` says what was attempted."""
    text = f"{what}: {details}" if details else what
    name = code.name
    reason = (trailers or {}).get(END_REASON_HEADER)
    if reason and code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED):
        return SandboxEndedException(
            text,
            sandbox_id=(trailers or {}).get(END_SANDBOX_HEADER, ""),
            reason=reason,
            code=name,
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundException(text if guest else f"{text} ({_HINTS[code]})", code=name)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutException(f"{text} ({_HINTS[code]})", code=name)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationException(f"{text} ({_HINTS[code]})", code=name)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        if guest:
            return PermissionDeniedException(f"{text} (run as another user=)", code=name)
        return AuthenticationException(f"{text} (this key may not do that)", code=name)
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
    ):
        return InvalidArgumentException(text, code=name)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if guest:
            return NotEnoughSpaceException(
                f"{text} (the sandbox ran out of space; remove files)", code=name
            )
        return RateLimitException(f"{text} ({_HINTS[code]})", code=name)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        hint = "" if guest else f" ({_HINTS[code]})"
        return FailedPreconditionException(text + hint, code=name)
    if code == grpc.StatusCode.UNAVAILABLE and (
        GUEST_UNREACHABLE in details or (trailers or {}).get(STATUS_FROM_HEADER) == "hostd"
    ):
        return ConnectionException(
            f"{text} (hostd is fine; check the sandbox with get_info / is_running)", code=name
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        where = f" at {address}" if address else ""
        return ConnectionException(
            f"{text} (cannot reach hostd{where}: is `moru-hostd serve` running and "
            "MORU_HOSTD set to its address?)",
            code=name,
        )
    return SandboxException(text, code=name)


@contextlib.contextmanager
def translate(what: str, *, address: str = "", guest: bool = False) -> Iterator[None]:
    """Turns a `grpc.RpcError` raised inside into the matching SandboxException."""
    try:
        yield
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = e.details() if hasattr(e, "details") else str(e)
        raise from_status(
            code, details or "", what=what, address=address, guest=guest, trailers=_trailers(e)
        ) from e


def _trailers(e: grpc.RpcError) -> dict[str, str]:
    """The call's trailing metadata (sync and aio errors both have it; others: none)."""
    get = getattr(e, "trailing_metadata", None)
    try:
        md = get() if callable(get) else None
    except Exception:
        return {}
    return {k: v for k, v in (md or ()) if isinstance(v, str)}

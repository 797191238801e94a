"""Errors raised by the moru SDK (the tree is drawn in `moru._errors`)."""

from moru._errors import (
    AuthenticationException,
    CommandExitException,
    ConnectionException,
    FailedPreconditionException,
    InvalidArgumentException,
    NotEnoughSpaceException,
    NotFoundException,
    PermissionDeniedException,
    RateLimitException,
    SandboxEndedException,
    SandboxException,
    TimeoutException,
)

__all__ = [
    "AuthenticationException",
    "CommandExitException",
    "ConnectionException",
    "FailedPreconditionException",
    "InvalidArgumentException",
    "NotEnoughSpaceException",
    "NotFoundException",
    "PermissionDeniedException",
    "RateLimitException",
    "SandboxEndedException",
    "SandboxException",
    "TimeoutException",
]

"""moru: microVM sandboxes for AI agents.

    from moru import Sandbox

    with Sandbox.create() as sandbox:
        print(sandbox.commands.run("echo hello").stdout)

`Sandbox` is synchronous, `AsyncSandbox` the asyncio twin; errors live in
`moru.exceptions`. hostd's address comes from MORU_HOSTD (default
unix:/run/moru/hostd.sock) and its API key from MORU_API_KEY.
"""

from moru._async_sandbox import AsyncSandbox
from moru._commands import AsyncCommandHandle, AsyncCommands
from moru._connection import ConnectionConfig
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
from moru._files import AsyncFiles, AsyncWatchHandle
from moru._models import (
    CommandResult,
    EntryInfo,
    FilesystemEvent,
    NetworkPolicy,
    ProcessInfo,
    PtySize,
    SandboxInfo,
    SandboxMetrics,
    TemplateInfo,
    VolumeInfo,
)
from moru._pty import AsyncPty, Pty
from moru._sandbox import Sandbox
from moru._sync_guest import CommandHandle, Commands, Files, WatchHandle
from moru._volume import AsyncVolume, Volume

__all__ = [
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFiles",
    "AsyncPty",
    "AsyncSandbox",
    "AsyncVolume",
    "AsyncWatchHandle",
    "AuthenticationException",
    "CommandExitException",
    "CommandHandle",
    "CommandResult",
    "Commands",
    "ConnectionConfig",
    "ConnectionException",
    "EntryInfo",
    "FailedPreconditionException",
    "Files",
    "FilesystemEvent",
    "InvalidArgumentException",
    "NetworkPolicy",
    "NotEnoughSpaceException",
    "NotFoundException",
    "PermissionDeniedException",
    "ProcessInfo",
    "Pty",
    "PtySize",
    "RateLimitException",
    "Sandbox",
    "SandboxEndedException",
    "SandboxException",
    "SandboxInfo",
    "SandboxMetrics",
    "TemplateInfo",
    "TimeoutException",
    "Volume",
    "VolumeInfo",
    "WatchHandle",
]

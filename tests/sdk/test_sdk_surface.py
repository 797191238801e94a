"""The public surface of `moru` is exactly what is meant (httpx-style check)."""

from __future__ import annotations

import inspect

import moru
import moru.exceptions
from moru import AsyncSandbox, Sandbox

PUBLIC = {
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
}

EXCEPTIONS = {
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
}


def test_all_is_exactly_the_public_surface() -> None:
    assert set(moru.__all__) == PUBLIC
    for name in moru.__all__:
        assert getattr(moru, name) is not None
    public_attrs = {n for n in vars(moru) if not n.startswith("_")} - {"exceptions", "cli"}
    assert public_attrs == PUBLIC


def test_exceptions_module() -> None:
    assert set(moru.exceptions.__all__) == EXCEPTIONS
    for name in EXCEPTIONS:
        exc = getattr(moru.exceptions, name)
        assert issubclass(exc, moru.exceptions.SandboxException)
        assert exc is getattr(moru, name)
        assert exc.__doc__, f"{name} needs a docstring saying when and what to do"
    assert issubclass(moru.exceptions.TimeoutException, TimeoutError)


def test_spec_signatures() -> None:
    """Names, parameter names and defaults as the spec and the issue give them."""
    create = inspect.signature(Sandbox.create)
    expected = {
        "template": "base",
        "timeout": 300,
        "metadata": None,
        "envs": None,
        "allow_internet_access": True,
        "network": None,
        "secure": True,
        "volume_id": None,
        "volume_mount_path": None,
    }
    for name, default in expected.items():
        assert create.parameters[name].default == default, name
    assert list(create.parameters)[: len(expected)] == list(expected)
    acreate = inspect.signature(AsyncSandbox.create)
    assert list(acreate.parameters)[: len(expected)] == list(expected)
    from moru._sync_guest import Commands

    run = inspect.signature(Commands.run)
    assert [
        (p.name, p.default) for p in run.parameters.values() if p.name not in ("self", "cmd")
    ] == [
        ("envs", None),
        ("cwd", None),
        ("user", None),
        ("background", False),
        ("timeout", 60),
        ("on_stdout", None),
        ("on_stderr", None),
        ("stdin", False),
    ]
    for m in ("kill", "set_timeout", "connect", "get_info", "beta_pause"):
        assert callable(getattr(Sandbox, m)), m


def test_class_or_instance_dispatch() -> None:
    """`Sandbox.kill` called on the class needs an id and says so."""
    import pytest

    with pytest.raises(moru.InvalidArgumentException, match="sandbox_id"):
        Sandbox.kill()
    with pytest.raises(TypeError, match="set_timeout"):
        Sandbox.set_timeout(1800)

"""Sandbox: the synchronous API, a facade over AsyncSandbox on a private loop.

Every method runs the AsyncSandbox coroutine of the same name on the SDK's
loop thread (see moru._loop for why), so sync and async cannot disagree.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from moru import _loop
from moru._async_sandbox import AsyncSandbox, NetworkArg
from moru._connection import ConnectionConfig
from moru._methods import class_or_instance_method
from moru._models import SandboxInfo, SandboxMetrics, TemplateInfo
from moru._pty import Pty
from moru._sync_guest import Commands, Files


class Sandbox:
    """A microVM sandbox. `Sandbox.create()`; `with Sandbox.create() as sandbox:`
    kills it when the block ends (also on an exception)."""

    def __init__(self, core: AsyncSandbox) -> None:
        """Internal; use create() or connect()."""
        self._core = core
        self.commands = Commands(core._target)
        self.files = Files(core._target)
        self.pty = Pty(core._target)

    @classmethod
    def _for_guest(
        cls, address: str, sandbox_id: str = "local", access_token: str | None = None
    ) -> Sandbox:
        """A Sandbox whose guest calls go to `address` (a bare guestd); tests only."""
        return cls(AsyncSandbox._for_guest(address, sandbox_id, access_token))

    @property
    def sandbox_id(self) -> str:
        return self._core.sandbox_id

    @property
    def connection_config(self) -> ConnectionConfig:
        return self._core.connection_config

    @property
    def traffic_access_token(self) -> str | None:
        """The port proxy's token for this sandbox (allow_public_traffic=False),
        sent as the `x-moru-traffic-token` header; None when traffic is public."""
        return self._core.traffic_access_token

    def __repr__(self) -> str:
        return f"<Sandbox {self.sandbox_id} on {self._core.connection_config.address}>"

    @classmethod
    def create(
        cls,
        template: str = "base",
        timeout: int = 300,
        metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        allow_internet_access: bool = True,
        network: NetworkArg = None,
        secure: bool = True,
        volume_id: str | None = None,
        volume_mount_path: str | None = None,
        *,
        api_key: str | None = None,
        hostd: str | None = None,
        address: str | None = None,
        request_timeout: float | None = None,
    ) -> Sandbox:
        """Boots a sandbox from `template` (default "base"); `timeout` seconds of life."""
        return cls(
            _loop.run(
                AsyncSandbox.create(
                    template,
                    timeout,
                    metadata,
                    envs,
                    allow_internet_access,
                    network,
                    secure,
                    volume_id,
                    volume_mount_path,
                    api_key=api_key,
                    hostd=hostd,
                    address=address,
                    request_timeout=request_timeout,
                )
            )
        )

    @class_or_instance_method
    def connect(
        self_or_cls: Any,
        sandbox_id: str | int | None = None,  # on an instance: int means timeout (E2B)
        timeout: int | None = None,
        *,
        api_key: str | None = None,
        hostd: str | None = None,
        address: str | None = None,
    ) -> Sandbox:
        """`Sandbox.connect(id)`: the sandbox, resumed if paused.
        `sandbox.connect()` / `sandbox.connect(timeout=600)`: resumes this
        sandbox if paused (with that lifetime); returns it."""
        kw: dict[str, Any] = {"api_key": api_key, "hostd": hostd, "address": address}
        if isinstance(self_or_cls, type):
            new: Sandbox = self_or_cls(_loop.run(AsyncSandbox.connect(sandbox_id, timeout, **kw)))
            return new
        _loop.run(self_or_cls._core.connect(sandbox_id, timeout, **kw))
        out: Sandbox = self_or_cls
        return out

    def is_running(self) -> bool:
        return _loop.run(self._core.is_running())

    @class_or_instance_method
    def get_info(self_or_cls: Any, sandbox_id: str | None = None, **kw: Any) -> SandboxInfo:
        """template_id, started_at, end_at (aware), state, cpu_count, memory_mb, metadata."""
        info: SandboxInfo = _loop.run(_target(self_or_cls).get_info(sandbox_id, **kw))
        return info

    @class_or_instance_method
    def get_metrics(
        self_or_cls: Any, sandbox_id: str | None = None, **kw: Any
    ) -> list[SandboxMetrics]:
        """Resource samples (cpu_used_pct, mem_used/total, disk_used/total in bytes)."""
        return _loop.run(_target(self_or_cls).get_metrics(sandbox_id, **kw))

    @class_or_instance_method
    def set_timeout(self_or_cls: Any, *args: Any, **kw: Any) -> None:
        """`sandbox.set_timeout(seconds)` or `Sandbox.set_timeout(sandbox_id, seconds)`:
        the sandbox is killed that many seconds from now."""
        _loop.run(_target(self_or_cls).set_timeout(*args, **kw))

    @class_or_instance_method
    def kill(self_or_cls: Any, sandbox_id: str | None = None, **kw: Any) -> bool:
        """`sandbox.kill()` or `Sandbox.kill(sandbox_id)`; False if it did not exist."""
        killed: bool = _loop.run(_target(self_or_cls).kill(sandbox_id, **kw))
        return killed

    @class_or_instance_method
    def beta_pause(self_or_cls: Any, sandbox_id: str | None = None, **kw: Any) -> str:
        """Pauses the sandbox (filesystem kept); resume with connect()."""
        sid: str = _loop.run(_target(self_or_cls).beta_pause(sandbox_id, **kw))
        return sid

    def get_host(self, port: int) -> str:
        """`{port}-{sandbox_id}.{domain}[:{proxy_port}]`: open it as `http://{host}/`."""
        return _loop.run(self._core.get_host(port))

    def get_url(self, port: int) -> str:
        """A URL reaching `port` of the sandbox from this machine."""
        return _loop.run(self._core.get_url(port))

    @staticmethod
    def list(
        metadata: dict[str, str] | None = None,
        state: str | list[str] | None = None,
        *,
        page_size: int = 100,
        api_key: str | None = None,
        hostd: str | None = None,
    ) -> Iterator[SandboxInfo]:
        """Iterates every running, paused and error sandbox across all pages; with
        `metadata`, only those whose metadata holds every given pair."""
        return _loop.iterate(
            AsyncSandbox.list(metadata, state, page_size=page_size, api_key=api_key, hostd=hostd)
        )

    @staticmethod
    def list_templates(
        *, api_key: str | None = None, hostd: str | None = None
    ) -> builtins.list[TemplateInfo]:
        return _loop.run(AsyncSandbox.list_templates(api_key=api_key, hostd=hostd))

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


def _target(self_or_cls: Any) -> Any:
    """AsyncSandbox (class) for calls by id, the wrapped core for an instance."""
    return AsyncSandbox if isinstance(self_or_cls, type) else self_or_cls._core

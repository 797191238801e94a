"""AsyncSandbox: the one implementation of the sandbox API (asyncio, grpc.aio).

`moru.Sandbox` is a synchronous facade over this class, run on a private
event-loop thread, so both behave identically by construction.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from moru import _validate
from moru._commands import AsyncCommands
from moru._connection import CREATE_TIMEOUT, ConnectionConfig, channel
from moru._errors import InvalidArgumentException, NotFoundException, translate
from moru._files import AsyncFiles
from moru._guest import GuestTarget
from moru._methods import class_or_instance_method
from moru._models import STATE_VALUES, SandboxInfo, SandboxMetrics, TemplateInfo
from moru._pty import AsyncPty
from moru_proto.host.v1 import sandbox_pb2 as pb
from moru_proto.host.v1 import sandbox_pb2_grpc, template_pb2, template_pb2_grpc

NetworkArg = dict[str, Any] | None


def _network(network: NetworkArg) -> pb.NetworkPolicy | None:
    if network is None:
        return None
    unknown = set(network) - {"allow_out", "deny_out", "allow_public_traffic"}
    if unknown:
        raise InvalidArgumentException(
            f"network: unknown keys {sorted(unknown)}; "
            "use allow_out, deny_out, allow_public_traffic"
        )
    pol = pb.NetworkPolicy(
        allow_out=list(network.get("allow_out") or []),
        deny_out=list(network.get("deny_out") or []),
    )
    if network.get("allow_public_traffic") is not None:
        pol.allow_public_traffic = bool(network["allow_public_traffic"])
    return pol


def _stub(config: ConnectionConfig) -> Any:
    return sandbox_pb2_grpc.SandboxServiceStub(channel(config))


def _config(self_or_cls: Any, hostd: str | None, api_key: str | None) -> ConnectionConfig:
    if isinstance(self_or_cls, type):
        return ConnectionConfig.resolve(hostd=hostd, api_key=api_key)
    base: ConnectionConfig = self_or_cls._config
    return base.with_overrides(hostd=hostd, api_key=api_key)


class AsyncSandbox:
    """A running microVM sandbox. Create with `await AsyncSandbox.create()`."""

    def __init__(
        self,
        info: SandboxInfo,
        access_token: str | None,
        config: ConnectionConfig,
        traffic_token: str | None = None,
    ):
        """Internal; use create() or connect()."""
        self._info = info
        self._config = config
        self._traffic_token = traffic_token or None
        self._target = GuestTarget(config, info.sandbox_id, access_token or None)
        self.commands = AsyncCommands(self._target)
        self.files = AsyncFiles(self._target)
        self.pty = AsyncPty(self._target)

    @classmethod
    def _for_guest(
        cls, address: str, sandbox_id: str = "local", access_token: str | None = None
    ) -> AsyncSandbox:
        """A sandbox object whose guest calls go to `address` (e.g. a bare guestd).

        For tests and benchmarks: no hostd call is made; host methods will fail.
        """
        from datetime import UTC, datetime

        now = datetime.now(UTC)
        info = SandboxInfo(
            sandbox_id, "", {}, "running", now, now, 0, 0, 0, False, False, None, None, None, None
        )
        return cls(info, access_token, ConnectionConfig.resolve(hostd=address))

    @property
    def sandbox_id(self) -> str:
        return self._info.sandbox_id

    @property
    def connection_config(self) -> ConnectionConfig:
        return self._config

    @property
    def traffic_access_token(self) -> str | None:
        """The token hostd's port proxy demands when the sandbox was created
        with `network={"allow_public_traffic": False}`; send it in the
        `x-moru-traffic-token` header. None otherwise."""
        return self._traffic_token

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.sandbox_id} on {self._config.address}>"

    @classmethod
    async def create(
        cls,
        template: str = "base",
        timeout: int = 300,  # noqa: ASYNC109 - the spec's name and unit
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
    ) -> AsyncSandbox:
        """Boots a sandbox from `template`; returns once its guest is ready.

        `timeout` is the sandbox's lifetime in seconds (extend with set_timeout).
        """
        config = ConnectionConfig.resolve(hostd=hostd or address, api_key=api_key)
        if volume_id and not volume_mount_path:
            raise InvalidArgumentException(
                "volume_mount_path: required with volume_id (e.g. '/workspace')"
            )
        req = pb.CreateRequest(
            template=template or "base",
            timeout_seconds=_validate.whole_seconds(timeout, "timeout"),
            metadata=metadata or {},
            envs=envs or {},
            allow_internet_access=allow_internet_access,
            secure=secure,
            volume_id=volume_id or "",
            volume_mount_path=volume_mount_path or "",
        )
        net = _network(network)
        if net is not None:
            req.network.CopyFrom(net)
        with translate(f"creating a sandbox from template {template!r}", address=config.address):
            info = await _stub(config).Create(
                req, metadata=config.metadata(), timeout=request_timeout or CREATE_TIMEOUT
            )
        return cls(SandboxInfo.from_proto(info), info.access_token, config, info.traffic_token)

    @class_or_instance_method
    async def connect(
        self_or_cls: Any,
        sandbox_id: str | int | None = None,  # on an instance: int means timeout (E2B)
        timeout: int | None = None,  # noqa: ASYNC109
        *,
        api_key: str | None = None,
        hostd: str | None = None,
        address: str | None = None,
    ) -> AsyncSandbox:
        """A sandbox by id, resumed first if it is paused. On an instance
        (`sandbox.connect()`, `sandbox.connect(timeout=600)`, as in E2B also
        `sandbox.connect(600)`), resumes that sandbox and returns it;
        `timeout` is the sandbox's new lifetime in seconds when it resumes."""
        config = _config(self_or_cls, hostd or address, api_key)
        if not isinstance(self_or_cls, type):
            sandbox_id, timeout = _instance_connect_args(self_or_cls, sandbox_id, timeout)
        if not sandbox_id or not isinstance(sandbox_id, str):
            raise InvalidArgumentException(f"sandbox_id: required (a string), got {sandbox_id!r}")
        stub = _stub(config)
        md, t = config.metadata(), config.request_timeout
        with translate(f"connecting to sandbox {sandbox_id}", address=config.address):
            info = await stub.Get(pb.GetRequest(sandbox_id=sandbox_id), metadata=md, timeout=t)
            if info.state == pb.SANDBOX_STATE_PAUSED:
                req = pb.ResumeRequest(sandbox_id=sandbox_id)
                if timeout is not None:
                    req.timeout_seconds = _validate.whole_seconds(timeout, "timeout")
                info = await stub.Resume(req, metadata=md, timeout=CREATE_TIMEOUT)
            elif timeout is not None and _extends(
                info, _validate.whole_seconds(timeout, "timeout")
            ):
                # As E2B: on a running sandbox, a longer timeout extends its life.
                req_t = pb.SetTimeoutRequest(
                    sandbox_id=sandbox_id,
                    timeout_seconds=_validate.whole_seconds(timeout, "timeout"),
                )
                info = await stub.SetTimeout(req_t, metadata=md, timeout=t)
        if isinstance(self_or_cls, type):
            new: AsyncSandbox = self_or_cls(
                SandboxInfo.from_proto(info), info.access_token, config, info.traffic_token
            )
            return new
        self_or_cls._info = SandboxInfo.from_proto(info)
        self_or_cls._traffic_token = info.traffic_token or None
        out: AsyncSandbox = self_or_cls
        return out

    async def is_running(self) -> bool:
        """True while the sandbox runs (False when paused, killed or timed out)."""
        try:
            info = await self.get_info()
        except NotFoundException:
            return False
        return info.state == "running"

    @class_or_instance_method
    async def get_info(
        self_or_cls: Any,
        sandbox_id: str | None = None,
        *,
        api_key: str | None = None,
        hostd: str | None = None,
    ) -> SandboxInfo:
        """template_id, started_at/end_at (aware UTC), state, cpu_count, memory_mb, metadata."""
        config, sid = _config(self_or_cls, hostd, api_key), _sid(self_or_cls, sandbox_id)
        with translate(f"getting info of sandbox {sid}", address=config.address):
            info = await _stub(config).Get(
                pb.GetRequest(sandbox_id=sid),
                metadata=config.metadata(),
                timeout=config.request_timeout,
            )
        out = SandboxInfo.from_proto(info)
        if not isinstance(self_or_cls, type):
            self_or_cls._info = out
        return out

    @class_or_instance_method
    async def get_metrics(
        self_or_cls: Any,
        sandbox_id: str | None = None,
        *,
        api_key: str | None = None,
        hostd: str | None = None,
    ) -> list[SandboxMetrics]:
        """Resource samples hostd kept for the sandbox, oldest first."""
        config, sid = _config(self_or_cls, hostd, api_key), _sid(self_or_cls, sandbox_id)
        with translate(f"getting metrics of sandbox {sid}", address=config.address):
            resp = await _stub(config).GetMetrics(
                pb.GetMetricsRequest(sandbox_id=sid),
                metadata=config.metadata(),
                timeout=config.request_timeout,
            )
        return [SandboxMetrics.from_proto(m) for m in resp.metrics]

    @class_or_instance_method
    async def set_timeout(
        self_or_cls: Any,
        *args: Any,
        api_key: str | None = None,
        hostd: str | None = None,
    ) -> None:
        """The sandbox will be killed `timeout` seconds from now.

        `sandbox.set_timeout(1800)` or `Sandbox.set_timeout("sbx_...", 1800)`.
        """
        if isinstance(self_or_cls, type):
            if len(args) != 2:
                raise TypeError("Sandbox.set_timeout(sandbox_id, timeout)")
            sid, timeout = str(args[0]), args[1]
        else:
            if len(args) != 1:
                raise TypeError("sandbox.set_timeout(timeout)")
            sid, timeout = self_or_cls.sandbox_id, args[0]
        config = _config(self_or_cls, hostd, api_key)
        with translate(f"setting the timeout of sandbox {sid}", address=config.address):
            info = await _stub(config).SetTimeout(
                pb.SetTimeoutRequest(
                    sandbox_id=sid, timeout_seconds=_validate.whole_seconds(timeout, "timeout")
                ),
                metadata=config.metadata(),
                timeout=config.request_timeout,
            )
        if not isinstance(self_or_cls, type):
            self_or_cls._info = SandboxInfo.from_proto(info)

    @class_or_instance_method
    async def kill(
        self_or_cls: Any,
        sandbox_id: str | None = None,
        *,
        api_key: str | None = None,
        hostd: str | None = None,
    ) -> bool:
        """Kills the sandbox; True if it was killed, False if it did not exist."""
        config, sid = _config(self_or_cls, hostd, api_key), _sid(self_or_cls, sandbox_id)
        try:
            with translate(f"killing sandbox {sid}", address=config.address):
                await _stub(config).Kill(
                    pb.KillRequest(sandbox_id=sid),
                    metadata=config.metadata(),
                    timeout=config.request_timeout,
                )
        except NotFoundException:
            return False
        return True

    @class_or_instance_method
    async def beta_pause(
        self_or_cls: Any,
        sandbox_id: str | None = None,
        *,
        api_key: str | None = None,
        hostd: str | None = None,
    ) -> str:
        """Pauses the sandbox, keeping its filesystem; resume with connect(). Returns its id."""
        config, sid = _config(self_or_cls, hostd, api_key), _sid(self_or_cls, sandbox_id)
        with translate(f"pausing sandbox {sid}", address=config.address):
            info = await _stub(config).Pause(
                pb.PauseRequest(sandbox_id=sid), metadata=config.metadata(), timeout=CREATE_TIMEOUT
            )
        if not isinstance(self_or_cls, type):
            self_or_cls._info = SandboxInfo.from_proto(info)
        return sid

    async def get_host(self, port: int) -> str:
        """Where `port` of the sandbox is reachable through hostd's proxy:
        `{port}-{id}.{domain}`, plus `:{proxy_port}` unless that is 80/443, so
        `http://{host}/` opens as written."""
        with translate(f"getting the host of port {port}", address=self._config.address):
            resp = await _stub(self._config).GetHost(
                pb.GetHostRequest(sandbox_id=self.sandbox_id, port=_validate.port(port)),
                metadata=self._config.metadata(),
                timeout=self._config.request_timeout,
            )
        return str(resp.host)

    async def get_url(self, port: int) -> str:
        """A URL that reaches `port` of the sandbox from this machine (hostd's proxy)."""
        with translate(f"getting the URL of port {port}", address=self._config.address):
            resp = await _stub(self._config).GetHost(
                pb.GetHostRequest(sandbox_id=self.sandbox_id, port=_validate.port(port)),
                metadata=self._config.metadata(),
                timeout=self._config.request_timeout,
            )
        return str(resp.url)

    @staticmethod
    async def list(
        metadata: dict[str, str] | None = None,
        state: str | list[str] | None = None,
        *,
        page_size: int = 100,
        api_key: str | None = None,
        hostd: str | None = None,
    ) -> AsyncIterator[SandboxInfo]:
        """Every running, paused and error sandbox (all pages), optionally only those
        whose metadata holds every given pair."""
        config = ConnectionConfig.resolve(hostd=hostd, api_key=api_key)
        states = [STATE_VALUES[s] for s in _validate.states(state, STATE_VALUES)]
        token = ""
        while True:
            with translate("listing sandboxes", address=config.address):
                resp = await _stub(config).List(
                    pb.ListRequest(
                        metadata=metadata or {},
                        states=states,  # type: ignore[arg-type]
                        page_size=page_size,
                        page_token=token,
                    ),
                    metadata=config.metadata(),
                    timeout=config.request_timeout,
                )
            for s in resp.sandboxes:
                yield SandboxInfo.from_proto(s)
            token = resp.next_page_token
            if not token:
                return

    @staticmethod
    async def list_templates(
        *, api_key: str | None = None, hostd: str | None = None
    ) -> builtins.list[TemplateInfo]:
        """Templates built on the node."""
        config = ConnectionConfig.resolve(hostd=hostd, api_key=api_key)
        with translate("listing templates", address=config.address):
            stub: Any = template_pb2_grpc.TemplateServiceStub(channel(config))
            resp = await stub.List(
                template_pb2.ListTemplatesRequest(),
                metadata=config.metadata(),
                timeout=config.request_timeout,
            )
        return [TemplateInfo.from_proto(t) for t in resp.templates]

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kill()


def _instance_connect_args(
    sbx: AsyncSandbox, sandbox_id: Any, timeout: int | None
) -> tuple[str, int | None]:
    """`sandbox.connect(600)` means a timeout, as in E2B; another sandbox's id is an error."""
    if isinstance(sandbox_id, int | float) and not isinstance(sandbox_id, bool):
        if timeout is not None:
            raise InvalidArgumentException("timeout: given twice (positionally and by name)")
        return sbx.sandbox_id, _validate.whole_seconds(sandbox_id, "timeout")
    if sandbox_id and sandbox_id != sbx.sandbox_id:
        raise InvalidArgumentException(
            f"sandbox_id: {sandbox_id!r} is not this sandbox ({sbx.sandbox_id}); "
            "use Sandbox.connect(sandbox_id) for another one"
        )
    return sbx.sandbox_id, timeout


def _extends(info: pb.SandboxInfo, timeout: int) -> bool:
    """Whether `timeout` seconds from now is later than the sandbox's current end."""
    import time

    return info.state == pb.SANDBOX_STATE_RUNNING and time.time() + timeout > (
        info.end_at.seconds + info.end_at.nanos / 1e9
    )


def _sid(self_or_cls: Any, sandbox_id: str | None) -> str:
    if isinstance(self_or_cls, type):
        if not sandbox_id:
            raise InvalidArgumentException("sandbox_id: required when called on the class")
        return sandbox_id
    return sandbox_id or str(self_or_cls.sandbox_id)

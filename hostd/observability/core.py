"""Observability: the one object hostd's server creates to wire metrics, console watch and HTTP.

    obs = Observability(mgr, images_dir=config.images_path)   # hooks mgr.bus
    server = grpc.aio.server(interceptors=[obs.interceptor, EdgeInterceptor(...)])
    await stack.enter_async_context(obs.serve(config.metrics_listen))

`serve` owns its background task (the console/cgroup watcher) and the HTTP
listener and stops both on exit: no fire-and-forget tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from hostd.observability.console import ConsoleWatcher, GuestOom
from hostd.observability.http import Check, MetricsServer
from hostd.observability.interceptor import ObservabilityInterceptor
from hostd.observability.prometheus import ManagerView, Metrics

log = logging.getLogger("hostd.observability")

VMM_BINARIES = ("qemu-system-x86_64", "vhost-device-vsock")


class Observability:
    def __init__(
        self,
        mgr: ManagerView,
        *,
        images_dir: Path | None = None,
        bus: Any | None = None,
        console_interval: float = 1.0,
    ) -> None:
        self.mgr = mgr
        self.images_dir = images_dir
        self.metrics = Metrics(mgr)
        self.registry = self.metrics.registry
        self.interceptor = ObservabilityInterceptor(self.metrics.observe_rpc)
        self.bus = bus if bus is not None else getattr(mgr, "bus", None)
        self.console = ConsoleWatcher(
            mgr, self.metrics, self._publish_oom if self.bus is not None else None
        )
        self.console_interval = console_interval
        self.http: MetricsServer | None = None
        self._extra_checks: list[tuple[str, Callable[[], Awaitable[tuple[bool, str]]]]] = []
        self._serving = False
        if self.bus is not None:
            self.bus.add_hook(self._on_event)

    # -- hooks other parts may call ----------------------------------------

    def observe_lifecycle(self, operation: str, seconds: float) -> None:
        """create/kill/pause/resume latency, for callers that don't publish a timed Event."""
        self.metrics.observe_lifecycle(operation, seconds)

    def observe_guest_call(self, method: str, code: str, seconds: float) -> None:
        """A guest call hostd makes itself, e.g. ("Guest/GetMetrics", "OK", 0.004)."""
        self.metrics.observe_guest_call(method, code, seconds)

    def add_readiness_check(
        self, name: str, check: Callable[[], Awaitable[tuple[bool, str]]]
    ) -> None:
        self._extra_checks.append((name, check))

    def _on_event(self, ev: Any) -> None:
        self.metrics.on_event(ev)
        if ev.type.name in ("KILLED", "CREATE_FAILED"):
            self.console.forget(ev.sandbox_id)

    def _publish_oom(self, oom: GuestOom) -> None:
        from hostd.events import Event, EventType, Reason

        assert self.bus is not None
        self.bus.publish(
            Event(
                oom.sandbox_id,
                EventType.GUEST_OOM,
                Reason.OOM,
                oom.template_id,
                f"guest OOM killer killed pid {oom.pid} ({oom.comm})",
            )
        )

    # -- readiness ----------------------------------------------------------

    async def readiness(self) -> list[Check]:
        """Serving, templates present, VMM binaries found, plus any added checks."""
        checks = [Check("hostd", self._serving, "serving" if self._serving else "starting")]
        if self.images_dir is not None:
            from images.manifest import list_manifests

            try:
                names = [m.name for m in list_manifests(self.images_dir)]
            except Exception as e:
                names, err = [], f": {e}"
            else:
                err = ""
            checks.append(
                Check(
                    "templates",
                    bool(names),
                    ", ".join(names) if names else f"no templates in {self.images_dir}{err}",
                )
            )
        missing = [b for b in VMM_BINARIES if shutil.which(b) is None]
        checks.append(
            Check(
                "vmm",
                not missing,
                f"missing: {', '.join(missing)}" if missing else ", ".join(VMM_BINARIES),
            )
        )
        for name, fn in self._extra_checks:
            try:
                ok, detail = await fn()
            except Exception as e:
                ok, detail = False, repr(e)
            checks.append(Check(name, ok, detail))
        return checks

    # -- lifetime -----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serve(self, listen: str = "") -> AsyncIterator[Observability]:
        """Runs the console watcher and, when `listen` is set, the HTTP endpoint.

        Enter it after the manager has started (re-attached sandboxes are then
        read from their console's current end).
        """
        self.console.prime()
        async with contextlib.AsyncExitStack() as stack:
            if listen:
                self.http = MetricsServer(self.registry, self.readiness, self.metrics.render.set)
                await stack.enter_async_context(self.http.serving(listen))
            task = asyncio.create_task(self.console.run(self.console_interval))
            self._serving = True
            try:
                yield self
            finally:
                self._serving = False
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

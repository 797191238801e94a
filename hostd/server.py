"""Wires hostd together and serves it: manager, servicers, passthrough, health.

`serve(config)` runs until cancelled (SIGTERM/SIGINT in the CLI). On the way
out it stops listening and drops its handles; VMs keep running so the next
hostd re-attaches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hostd.config import Config
from hostd.data_relay import DataRelay
from hostd.events import EventBus
from hostd.interceptors import EdgeInterceptor
from hostd.operations import Operations
from hostd.passthrough import GuestPassthrough, Route
from hostd.sandboxes import SandboxManager
from hostd.services.sandbox import SandboxService
from hostd.services.template import TemplateService
from hostd.store import Store
from moru_proto.host.v1 import sandbox_pb2_grpc, template_pb2_grpc

log = logging.getLogger("hostd")

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.so_reuseport", 0),
]
# How long a stopping hostd waits for cancelled Creates/Kills to release what they hold.
DRAIN_SECONDS = 60.0


def build_manager(config: Config, bus: EventBus | None = None) -> SandboxManager:
    """The real backends: QEMU, cgroups, networking (when enabled)."""
    from hostd.cgroups import CgroupManager
    from hostd.vmm.qemu import PciQemuVmm

    network = None
    if config.network.enabled:
        from hostd.network import NetworkManager

        network = NetworkManager(config.network.for_network_module())
    return SandboxManager(
        config,
        Store(config.db_path),
        # vsock on a hot-pluggable PCIe port, so every sandbox can be paused to disk.
        PciQemuVmm(),
        CgroupManager(config.cgroup_root, cpu_reserve=config.cpu_reserve_cores),
        network,
        bus,
    )


async def serve(
    config: Config,
    ready: Callable[[], None] | None = None,
    manager: SandboxManager | None = None,
) -> None:
    """Serves until cancelled; calls `ready` once every listener accepts calls."""
    mgr = manager or build_manager(config)
    state = config.state_path
    state.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(mgr.store.close)
        if mgr.network is not None:
            await mgr.network.start()
            stack.push_async_callback(mgr.network.stop)
        from hostd.volumes import VolumeManager, add_to_server

        volumes = VolumeManager(state)
        stack.callback(volumes.close)
        mgr.volumes = volumes
        from hostd.observability import Observability

        # Before mgr.start(): re-attaching publishes events (e.g. killed/vmm_exited
        # for VMs that died while hostd was down) that the exporter must count.
        obs = Observability(mgr, images_dir=config.images_path)  # hooks mgr.bus
        await mgr.start()
        stack.push_async_callback(mgr.close)
        # Volumes held by sandboxes that did not survive the restart are free again.
        volumes.reconcile(set(mgr.ids()))
        if mgr.network is not None:
            from hostd.network import PortProxy

            net = config.network
            host, _, port = net.proxy_listen.rpartition(":")
            proxy = PortProxy(mgr.proxy_target, host.strip("[]"), int(port), net.proxy_domain)
            await proxy.start()
            stack.push_async_callback(proxy.stop)

        server = grpc.aio.server(
            # Observability first, so it times and counts calls the edge refuses.
            interceptors=[obs.interceptor, EdgeInterceptor(config.api_key)],
            options=SERVER_OPTIONS,
        )
        ops = Operations()
        sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(SandboxService(mgr, ops), server)
        template_pb2_grpc.add_TemplateServiceServicer_to_server(
            TemplateService(config.images_path), server
        )
        add_to_server(server, volumes)
        data = _data_relay(config, mgr)
        if data is not None:
            await data.start()
            stack.push_async_callback(data.close)
        server.add_generic_rpc_handlers([GuestPassthrough(
            lambda sid, token: Route(*mgr.guest_channel(sid, token), mgr.sandbox(sid)), data)])
        from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        _listen(server, config)
        await server.start()
        # On the way out (callbacks run last first): stop serving, then let the
        # Creates/Kills still in flight finish their cleanup, and only then close
        # the manager, network and store they use.
        stack.push_async_callback(ops.drain, DRAIN_SECONDS)
        stack.push_async_callback(server.stop, 5.0)
        # Prometheus endpoint (when metrics_listen is set) and the console watch.
        await stack.enter_async_context(obs.serve(config.metrics_listen))
        _secure_socket(config)
        serving = health_pb2.HealthCheckResponse.SERVING
        await health.set("", serving)
        for svc in ("moru.host.v1.SandboxService", "moru.host.v1.TemplateService"):
            await health.set(svc, serving)
        log.info(
            "hostd serving on %s", ", ".join(a for a in (config.listen, config.tcp_listen) if a)
        )
        if ready is not None:
            ready()
        await mgr.run()


def _data_relay(config: Config, mgr: SandboxManager) -> DataRelay | None:
    """The bulk-transfer relay, a unix socket next to hostd's (`<listen>.data`)."""
    if not config.listen:
        return None
    path = Path(config.listen.removeprefix("unix:"))
    return DataRelay(path.with_name(path.name + ".data"), mgr.vsock_uds)


def _listen(server: grpc.aio.Server, config: Config) -> None:
    if config.listen:
        path = Path(config.listen.removeprefix("unix:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # Created with mode 0600 through the umask; chmod again after bind.
        old = os.umask(0o177)
        try:
            server.add_insecure_port(config.listen)
        finally:
            os.umask(old)
    if config.tcp_listen:
        creds = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
        )
        server.add_secure_port(config.tcp_listen, creds)


def _secure_socket(config: Config) -> None:
    if config.listen:
        path = Path(config.listen.removeprefix("unix:"))
        if path.exists():
            os.chmod(path, 0o600)


def dump_tasks() -> None:
    """SIGUSR1: logs where every asyncio task of hostd is waiting (for stuck operations)."""
    import traceback

    for t in asyncio.all_tasks():
        frames = t.get_stack(limit=20)
        text = "".join(
            traceback.format_list(
                [(f.f_code.co_filename, f.f_lineno or 0, f.f_code.co_name, None) for f in frames]
            )
        )
        log.warning("task %s:\n%s", t.get_name(), text)


def run(config: Config, ready: Callable[[], None] | None = None) -> None:
    """Blocking entry point: uvloop when available, clean exit on SIGTERM/SIGINT."""
    import signal

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
        with contextlib.suppress(asyncio.CancelledError):
            await serve(config, ready)

    runner: Any
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    runner(main())

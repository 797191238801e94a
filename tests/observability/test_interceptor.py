"""The RPC interceptor on a real grpc.aio server: hostd's edge interceptor, its guest
passthrough in front of a real guestd subprocess, TemplateService and health.

No VM: guestd runs on the host on a unix socket (it ignores `sandbox-id`), which
is exactly what the passthrough forwards to inside a sandbox.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hostd.errors import sandbox_not_found
from hostd.guest import open_channel
from hostd.interceptors import EdgeInterceptor
from hostd.observability import Observability, install_logging
from hostd.passthrough import GuestPassthrough, Route
from hostd.services.template import TemplateService
from moru_proto.guest.v1 import process_pb2, process_pb2_grpc
from moru_proto.host.v1 import template_pb2, template_pb2_grpc

from .fakes import FakeManager, sid
from .promtext import parse, value

ROOT = Path(__file__).resolve().parents[2]


class _NeverEnds:
    """A sandbox whose end signal never fires (what the passthrough watches)."""

    def __init__(self, sandbox_id: str) -> None:
        self.id = sandbox_id
        self.ended = asyncio.Event()
        self.end_reason = ""


@pytest.fixture
def tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="mi"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def guestd(tmp: Path) -> Iterator[str]:
    """A guestd on a unix socket; ended by pid."""
    target = f"unix:{tmp}/g.sock"
    with (tmp / "guestd.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "guestd", "--listen", target],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while not (tmp / "g.sock").exists():
            assert proc.poll() is None, (tmp / "guestd.log").read_text()
            assert time.monotonic() < deadline, "guestd did not start"
            time.sleep(0.05)
        yield target
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_rpcs_timed_by_method_and_errors_counted_by_code(tmp: Path, guestd: str) -> None:
    known = sid(1)
    buf = io.StringIO()
    root_logger = logging.getLogger()
    saved = list(root_logger.handlers), root_logger.level

    async def main() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        mgr = FakeManager(tmp / "m")
        obs = Observability(mgr)
        upstream = open_channel(guestd)

        def resolve(sandbox_id: str, token: str) -> Route:
            logging.getLogger("hostd.test").info("resolving")  # tagged by the interceptor
            if sandbox_id != known:
                raise sandbox_not_found(sandbox_id)
            return Route(upstream, "", _NeverEnds(sandbox_id))

        server = grpc.aio.server(interceptors=[obs.interceptor, EdgeInterceptor("")])
        server.add_generic_rpc_handlers([GuestPassthrough(resolve)])
        template_pb2_grpc.add_TemplateServiceServicer_to_server(
            TemplateService(tmp / "noimages"), server
        )
        from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

        health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
        server.add_insecure_port(f"unix:{tmp}/h.sock")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{tmp}/h.sock") as ch:
                proc = process_pb2_grpc.ProcessStub(ch)
                md = (("sandbox-id", known),)
                await proc.List(process_pb2.ListRequest(), metadata=md)
                req = process_pb2.StartRequest(
                    config=process_pb2.ProcessConfig(shell="sleep 0.3; echo hi"),
                )
                async for _ in proc.Start(req, metadata=md):
                    pass
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await proc.List(process_pb2.ListRequest(), metadata=(("sandbox-id", sid(2)),))
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await proc.List(process_pb2.ListRequest())
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                tpl = template_pb2_grpc.TemplateServiceStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await tpl.Get(template_pb2.GetTemplateRequest(template_id="nope"))
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
                await tpl.List(template_pb2.ListTemplatesRequest())
                hc = health_pb2_grpc.HealthStub(ch)
                await hc.Check(health_pb2.HealthCheckRequest())
                # A client that gives up on a stream: counted as CANCELLED, not UNKNOWN.
                long = process_pb2.StartRequest(config=process_pb2.ProcessConfig(shell="sleep 30"))
                call = proc.Start(long, metadata=md)
                await call.read()  # the start event: the process runs
                call.cancel()
                cancelled = {"method": "/moru.guest.v1.Process/Start", "code": "CANCELLED"}
                deadline = time.monotonic() + 10
                while obs.metrics.rpc_errors.labels(**cancelled)._value.get() < 1:
                    assert time.monotonic() < deadline, "the cancelled stream was not counted"
                    await asyncio.sleep(0.05)
        finally:
            await server.stop(None)
            await upstream.close(None)
        from prometheus_client import generate_latest

        return parse(generate_latest(obs.registry))

    install_logging("info", json_format=True, stream=buf)
    try:
        m = asyncio.run(main())
    finally:
        for h in list(root_logger.handlers):
            root_logger.removeHandler(h)
        for h in saved[0]:
            root_logger.addHandler(h)
        root_logger.setLevel(saved[1])

    g = "moru_guest_call_duration_seconds"
    assert value(m, f"{g}_count", method="Process/List") == 3
    assert value(m, f"{g}_count", method="Process/Start") == 2
    assert (value(m, f"{g}_sum", method="Process/Start") or 0) >= 0.3  # the whole stream
    err = "moru_rpc_errors_total"
    assert value(m, err, method="/moru.guest.v1.Process/List", code="NOT_FOUND") == 1
    assert value(m, err, method="/moru.guest.v1.Process/List", code="INVALID_ARGUMENT") == 1
    assert value(m, err, method="/moru.host.v1.TemplateService/Get", code="NOT_FOUND") == 1
    assert value(m, err, method="/moru.host.v1.TemplateService/List", code="OK") is None
    r = "moru_rpc_duration_seconds"
    assert value(m, f"{r}_count", method="/moru.host.v1.TemplateService/List") == 1
    assert value(m, f"{r}_count", method="/grpc.health.v1.Health/Check") == 1
    tagged = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    # (the call without sandbox-id fails before resolving)
    resolved = [o["sandbox_id"] for o in tagged if o["msg"] == "resolving"]
    assert resolved == [known, known, sid(2), known]

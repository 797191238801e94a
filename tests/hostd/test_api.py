"""The API edge of a real hostd, no VM boots needed: auth, health, validation, limits."""

from __future__ import annotations

import stat
from collections.abc import Iterator

import grpc
import pytest
from conftest import require_images
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hostd_framework import Hostd, pb, running_hostd

from moru_proto.guest.v1 import guest_pb2, process_pb2
from moru_proto.host.v1 import template_pb2

KEY = "test-key-123"
UNKNOWN = "sbx_" + "0" * 20


@pytest.fixture(scope="module")
def h() -> Iterator[Hostd]:
    require_images()
    with running_hostd(api_key=KEY, memory_budget_mb=4096, max_sandboxes=4) as hostd:
        yield hostd


def code_of(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args, **kw)
    err = ei.value
    return err.code(), str(err.details())


def test_socket_is_root_only(h: Hostd) -> None:
    mode = stat.S_IMODE(h.sock.stat().st_mode)
    assert mode == 0o600, oct(mode)


def test_api_key_required_and_checked(h: Hostd) -> None:
    req = pb.ListRequest()
    code, msg = code_of(h.sandboxes.List, req)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "API key" in msg
    code, _ = code_of(h.sandboxes.List, req, metadata=[("authorization", "Bearer wrong")])
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # Guest passthrough calls are checked too, before anything else.
    code, _ = code_of(h.process.List, process_pb2.ListRequest(), metadata=[("sandbox-id", UNKNOWN)])
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert h.sandboxes.List(req, metadata=h.md()).sandboxes is not None


def test_health_is_open_and_serving(h: Hostd) -> None:
    stub = health_pb2_grpc.HealthStub(h.channel)
    for svc in ("", "moru.host.v1.SandboxService"):
        r = stub.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_templates(h: Hostd) -> None:
    resp = h.templates.List(template_pb2.ListTemplatesRequest(), metadata=h.md())
    names = {t.template_id for t in resp.templates}
    assert "base" in names
    base = h.templates.Get(template_pb2.GetTemplateRequest(template_id="base"), metadata=h.md())
    assert base.memory_mb > 0 and base.kernel_version
    code, msg = code_of(
        h.templates.Get, template_pb2.GetTemplateRequest(template_id="nope"), metadata=h.md()
    )
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in msg


@pytest.mark.parametrize(
    ("kw", "code", "field"),
    [
        ({"template": "no-such-template"}, grpc.StatusCode.NOT_FOUND, "no-such-template"),
        ({"template": "../etc"}, grpc.StatusCode.INVALID_ARGUMENT, "template"),
        ({"timeout_seconds": -1}, grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds"),
        ({"timeout_seconds": 0}, grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds"),
        ({"timeout_seconds": 24 * 3600 + 1}, grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds"),
        ({"metadata": {"k": "x" * 100_000}}, grpc.StatusCode.INVALID_ARGUMENT, "metadata"),
        (
            {"metadata": {str(i): "v" for i in range(100)}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "metadata",
        ),
        ({"envs": {"BAD-NAME": "1"}}, grpc.StatusCode.INVALID_ARGUMENT, "envs"),
        ({"memory_mb": 16}, grpc.StatusCode.INVALID_ARGUMENT, "memory_mb"),
        (
            {"volume_id": "v1", "volume_mount_path": "/data"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "volume_id",
        ),
        (
            {"volume_id": "vol_aaaaaaaaaaaa", "volume_mount_path": "data"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "volume_mount_path",
        ),
        (
            {"volume_id": "vol_aaaaaaaaaaaa", "volume_mount_path": "/data"},
            grpc.StatusCode.NOT_FOUND,
            "vol_aaaaaaaaaaaa",
        ),
        # Above the node's memory budget (4096 MB here): the node is full, not the input bad.
        ({"memory_mb": 8192}, grpc.StatusCode.RESOURCE_EXHAUSTED, "memory"),
    ],
)
def test_create_bad_inputs(h: Hostd, kw: dict, code: grpc.StatusCode, field: str) -> None:  # type: ignore[type-arg]
    got, msg = code_of(h.sandboxes.Create, pb.CreateRequest(**kw), metadata=h.md(), timeout=30)
    assert got == code, msg
    assert field in msg
    # Nothing was booted or left behind by a refused create.
    assert h.check_clean() == []


def test_network_options_refused_when_networking_is_off(h: Hostd) -> None:
    got, msg = code_of(
        h.sandboxes.Create,
        pb.CreateRequest(network=pb.NetworkPolicy(allow_out=["not a host!"])),
        metadata=h.md(),
    )
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "network.allow_out[0]" in msg
    got, msg = code_of(
        h.sandboxes.Create, pb.CreateRequest(allow_internet_access=False), metadata=h.md()
    )
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "network" in msg


@pytest.mark.parametrize("bad", ["", "sbx_short", "../../etc/passwd", "SBX_" + "A" * 20])
def test_invalid_sandbox_ids(h: Hostd, bad: str) -> None:
    md = h.md()
    for call, req in (
        (h.sandboxes.Get, pb.GetRequest(sandbox_id=bad)),
        (h.sandboxes.Kill, pb.KillRequest(sandbox_id=bad)),
        (h.sandboxes.SetTimeout, pb.SetTimeoutRequest(sandbox_id=bad, timeout_seconds=10)),
        (h.sandboxes.Pause, pb.PauseRequest(sandbox_id=bad)),
    ):
        got, msg = code_of(call, req, metadata=md)
        assert got == grpc.StatusCode.INVALID_ARGUMENT and "sandbox_id" in msg


def test_unknown_sandbox_is_not_found_everywhere(h: Hostd) -> None:
    md = h.md()
    for call, req in (
        (h.sandboxes.Get, pb.GetRequest(sandbox_id=UNKNOWN)),
        (h.sandboxes.Kill, pb.KillRequest(sandbox_id=UNKNOWN)),
        (h.sandboxes.Resume, pb.ResumeRequest(sandbox_id=UNKNOWN)),
        (h.sandboxes.GetMetrics, pb.GetMetricsRequest(sandbox_id=UNKNOWN)),
        (h.sandboxes.GetHost, pb.GetHostRequest(sandbox_id=UNKNOWN, port=80)),
        (h.sandboxes.GetConsoleLog, pb.GetConsoleLogRequest(sandbox_id=UNKNOWN)),
    ):
        got, msg = code_of(call, req, metadata=md)
        assert got == grpc.StatusCode.NOT_FOUND and UNKNOWN in msg
    got, _ = code_of(
        h.process.List, process_pb2.ListRequest(), metadata=(*md, ("sandbox-id", UNKNOWN))
    )
    assert got == grpc.StatusCode.NOT_FOUND
    got, msg = code_of(h.process.List, process_pb2.ListRequest(), metadata=md)
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "sandbox-id" in msg


def test_guest_service_is_not_exposed(h: Hostd) -> None:
    got, _ = code_of(
        h.guest.Init, guest_pb2.InitRequest(), metadata=(*h.md(), ("sandbox-id", UNKNOWN))
    )
    assert got == grpc.StatusCode.UNIMPLEMENTED


def test_list_paging_errors(h: Hostd) -> None:
    got, msg = code_of(h.sandboxes.List, pb.ListRequest(page_token="garbage!"), metadata=h.md())
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in msg
    got, msg = code_of(h.sandboxes.List, pb.ListRequest(page_size=5000), metadata=h.md())
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in msg

"""Bad input, through the SDK and through raw gRPC to a real hostd and a real
microVM: each case gets a typed error (INVALID_ARGUMENT or the status that fits)
whose message names the field, is short, and never echoes megabytes back.

Uses the session's shared sandbox (no VM of its own).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from hostd_fixture import API_KEY

from moru import Sandbox
from moru.exceptions import (
    FailedPreconditionException,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
)
from moru_proto.guest.v1 import filesystem_pb2
from moru_proto.guest.v1 import process_pb2 as ppb
from moru_proto.host.v1 import sandbox_pb2 as hpb

pytestmark = pytest.mark.vm
MB = 1 << 20

SdkCase = tuple[str, Callable[[Sandbox], object], type[SandboxException], str]
SDK_CASES: list[SdkCase] = [
    (
        "list state unknown",
        lambda s: list(Sandbox.list(state="bogus")),
        InvalidArgumentException,
        "state",
    ),
    (
        "NUL in command",
        lambda s: s.commands.run("echo a\0b"),
        InvalidArgumentException,
        "config.shell",
    ),
    (
        "NUL in env value",
        lambda s: s.commands.run("true", envs={"A": "x\0y"}),
        InvalidArgumentException,
        "config.env",
    ),
    (
        "= in env name",
        lambda s: s.commands.run("true", envs={"A=B": "x"}),
        InvalidArgumentException,
        "config.env",
    ),
    ("1 MB command", lambda s: s.commands.run("x" * MB), InvalidArgumentException, "config.shell"),
    (
        "create timeout nan",
        lambda s: Sandbox.create(timeout=math.nan),  # type: ignore[arg-type]
        InvalidArgumentException,
        "timeout",
    ),
    (
        "create timeout inf",
        lambda s: Sandbox.create(timeout=math.inf),  # type: ignore[arg-type]
        InvalidArgumentException,
        "timeout",
    ),
    (
        "timeout 10**30",
        lambda s: s.commands.run("true", timeout=10**30),
        InvalidArgumentException,
        "timeout",
    ),
    ("set_timeout nan", lambda s: s.set_timeout(math.nan), InvalidArgumentException, "timeout"),
    ("set_timeout 10**30", lambda s: s.set_timeout(10**30), InvalidArgumentException, "timeout"),
    ("get_host -1", lambda s: s.get_host(-1), InvalidArgumentException, "port"),
]


@pytest.fixture(scope="module")
def sbx(shared_sandbox: Sandbox) -> Sandbox:
    return shared_sandbox


@pytest.mark.parametrize("case", SDK_CASES, ids=[c[0] for c in SDK_CASES])
def test_sdk_bad_input(sbx: Sandbox, case: SdkCase) -> None:
    _, call, exc, field = case
    with pytest.raises(exc) as e:
        call(sbx)
    assert field in str(e.value), str(e.value)
    assert len(str(e.value)) < 1000, len(str(e.value))
    sbx.commands.run("true")  # the sandbox is unharmed


def test_sdk_list_one_state_name(sbx: Sandbox) -> None:
    assert sbx.sandbox_id in [s.sandbox_id for s in Sandbox.list(state="running")]


def test_sdk_write_proc_file_is_not_not_found(sbx: Sandbox) -> None:
    """A /proc file exists: writing it works (root) or is refused for what it is,
    never "not found" (the old temporary-sibling write could not create in /proc)."""
    try:
        sbx.files.write("/proc/sysrq-trigger", "h")  # h: the kernel prints its help
    except NotFoundException as e:
        pytest.fail(f"exists, but: {e}")
    except SandboxException as e:
        assert "/proc/sysrq-trigger" in str(e) and e.code == "PERMISSION_DENIED", str(e)


def _hostd_channel() -> grpc.Channel:
    return grpc.insecure_channel(os.environ["MORU_HOSTD"])


Md = tuple[tuple[str, str | bytes], ...]


def _raw(ch: grpc.Channel, method: str, body: bytes, md: Md) -> grpc.RpcError:
    call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        call(body, metadata=md, timeout=60)
    return e.value


def test_raw_grpc_bad_input(sbx: Sandbox) -> None:
    auth: Md = (("authorization", f"Bearer {API_KEY}"),)
    guest: Md = tuple(sbx._core._target.metadata)
    start = "/moru.guest.v1.Process/Start"
    cases: list[tuple[str, bytes, Md, str]] = [
        ("/moru.host.v1.SandboxService/Get", b"\xff\xff\xff\xff", auth, "request"),
        (
            "/moru.host.v1.SandboxService/List",
            hpb.ListRequest(states=[99]).SerializeToString(),  # type: ignore[list-item]
            auth,
            "states",
        ),
        ("/moru.guest.v1.Process/List", b"\xff\xff\xff\xff", guest, "request"),
        ("/moru.guest.v1.Filesystem/Stat", b"\x0a\xff", guest, "request"),
    ]
    with _hostd_channel() as ch:
        for method, body, md, field in cases:
            err = _raw(ch, method, body, md)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err)
            assert field in (err.details() or ""), (method, err.details())
        # a 1 MB argv through the passthrough: refused, named, not echoed
        start_req = ppb.StartRequest(config=ppb.ProcessConfig(argv=["echo", "y" * MB]))
        stream = ch.unary_stream(start, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            list(stream(start_req.SerializeToString(), metadata=guest, timeout=60))
        bad: Any = e.value
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert "config.argv[1]" in bad.details() and len(bad.details()) < 1000, bad.details()


def test_raw_read_of_an_endless_device_is_refused(sbx: Sandbox) -> None:
    req = filesystem_pb2.ReadRequest(path="/dev/zero").SerializeToString()
    with _hostd_channel() as ch:
        read = ch.unary_stream(
            "/moru.guest.v1.Filesystem/Read", request_serializer=None, response_deserializer=None
        )
        call: Any = read(req, metadata=tuple(sbx._core._target.metadata), timeout=60)
        try:
            first = next(call, None)  # old guestd: endless data, the first chunk at once
            assert first is None, "Read('/dev/zero') streamed data"
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
            assert "/dev/zero" in (e.details() or ""), e.details()
        finally:
            call.cancel()
    with pytest.raises(FailedPreconditionException, match="/dev/zero"):
        sbx.files.read("/dev/zero")


def test_guest_unreachable_is_not_blamed_on_hostd() -> None:
    from hostd.passthrough import GUEST_UNREACHABLE as HOSTD_SAYS
    from moru._errors import GUEST_UNREACHABLE, from_status

    e = from_status(
        grpc.StatusCode.UNAVAILABLE,
        f"{GUEST_UNREACHABLE} (its VM may have stopped): connection refused",
        what="running a command",
        address="unix:/run/moru/hostd.sock",
        guest=True,
    )
    assert "moru-hostd serve" not in str(e) and "guest agent" in str(e), str(e)
    assert HOSTD_SAYS.startswith(GUEST_UNREACHABLE)


def test_a_status_hostd_raises_itself_is_not_blamed_on_the_connection() -> None:
    """A failed pause is UNAVAILABLE from hostd (the VM keeps running): the
    message must not ask whether hostd runs. Real grpc.aio server with
    hostd's edge interceptor, read through the SDK's translation."""
    import asyncio
    import tempfile

    from hostd.errors import Unavailable
    from hostd.interceptors import EdgeInterceptor
    from moru._errors import ConnectionException, translate

    async def fails(request: bytes, context: Any) -> bytes:
        raise Unavailable("pausing sbx_x to disk failed; it keeps running")

    async def main() -> str:
        with tempfile.TemporaryDirectory(dir="/tmp") as d:
            server = grpc.aio.server(interceptors=[EdgeInterceptor("")])
            server.add_generic_rpc_handlers(
                [grpc.method_handlers_generic_handler(
                    "t.T", {"Pause": grpc.unary_unary_rpc_method_handler(fails)})]
            )  # fmt: skip
            server.add_insecure_port(f"unix:{d}/h.sock")
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"unix:{d}/h.sock") as ch:
                    try:
                        with translate("pausing", address=f"unix:{d}/h.sock"):
                            await ch.unary_unary("/t.T/Pause")(b"")
                    except ConnectionException as e:
                        return str(e)
                    raise AssertionError("no error")
            finally:
                await server.stop(None)

    msg = asyncio.run(main())
    assert "keeps running" in msg and "moru-hostd serve" not in msg, msg

"""Guest service and the edge: Init, token enforcement, metrics that move, info, shutdown."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from guestd_harness import Guestd, argv, collect

from moru_proto.guest.v1 import filesystem_pb2 as fpb
from moru_proto.guest.v1 import guest_pb2 as pb
from moru_proto.guest.v1 import process_pb2 as ppb


def test_health_and_info_before_and_after_init(fresh_guestd: Guestd) -> None:
    g = fresh_guestd
    h = g.guest.Health(pb.HealthRequest())
    assert h.ok and not h.initialized
    g.guest.Init(pb.InitRequest(sandbox_id="sbx-1", template_id="base"))
    assert g.guest.Health(pb.HealthRequest()).initialized
    info = g.guest.GetInfo(pb.GetInfoRequest())
    assert (info.sandbox_id, info.template_id, info.initialized) == ("sbx-1", "base", True)
    assert info.guestd_version and info.kernel_release and info.python_version.startswith("3.")
    assert info.uptime_seconds > 0


def test_access_token_is_enforced_on_every_service(fresh_guestd: Guestd) -> None:
    g = fresh_guestd
    g.guest.Init(pb.InitRequest(access_token="s3cret"))
    calls: list[Callable[[tuple[tuple[str, str], ...]], object]] = [
        lambda md: g.guest.Health(pb.HealthRequest(), metadata=md),
        lambda md: g.guest.GetMetrics(pb.GetMetricsRequest(), metadata=md),
        lambda md: g.process.List(ppb.ListRequest(), metadata=md),
        lambda md: collect(g.process.Start(argv("true"), metadata=md)),
        lambda md: list(g.fs.Read(fpb.ReadRequest(path="/etc/hostname"), metadata=md)),
        lambda md: g.guest.Init(pb.InitRequest(access_token="other"), metadata=md),
    ]
    for call in calls:
        for md in [(), (("x-moru-access-token", "wrong"),)]:
            with pytest.raises(grpc.RpcError) as e:
                call(md)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "x-moru-access-token" in (e.value.details() or "")
    good = (("x-moru-access-token", "s3cret"),)
    for call in calls[:-1]:
        call(good)
    # sandbox-id metadata (added by hostd's pass-through) is ignored.
    g.process.List(ppb.ListRequest(), metadata=(*good, ("sandbox-id", "sbx-9")))


def test_metrics_move_with_cpu_and_memory_use(guestd: Guestd) -> None:
    m0 = guestd.guest.GetMetrics(pb.GetMetricsRequest())
    assert m0.cpu_count >= 1 and m0.mem_total > m0.mem_used > 0
    assert m0.disk_total > m0.disk_used > 0 and m0.timestamp.seconds > 0
    burn = "import time\nt=time.time()\nwhile time.time()-t<1.5: pass\n"
    hold = ("b=bytearray(1024**3)\nb[::4096]=b'x'*len(b[::4096])\n"
            "print('touched', flush=True)\nimport time; time.sleep(60)")
    procs = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(m0.cpu_count)]
    try:
        time.sleep(0.2)
        guestd.guest.GetMetrics(pb.GetMetricsRequest())  # start a window inside the burn
        time.sleep(1.0)
        busy = guestd.guest.GetMetrics(pb.GetMetricsRequest())
    finally:
        for p in procs:
            p.wait(10)
    assert busy.cpu_used_pct > 70, busy
    before = guestd.guest.GetMetrics(pb.GetMetricsRequest()).mem_used
    mem = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE)
    try:
        assert mem.stdout is not None and mem.stdout.readline() == b"touched\n"
        during = guestd.guest.GetMetrics(pb.GetMetricsRequest()).mem_used
    finally:
        mem.kill()
        mem.wait()
    # 1 GiB allocated and touched; the host's other work (VMs coming and going)
    # moves the total too, so ask for a clear half of it.
    assert during - before > 512 * 1024**2, (before, during)


@pytest.mark.parametrize(
    ("net", "field"),
    [
        (pb.NetworkConfig(address="10.0.0.2"), "network.address"),
        (pb.NetworkConfig(address="10.0.0.300/30"), "network.address"),
        (pb.NetworkConfig(address="10.0.0.2/30", gateway="gw"), "network.gateway"),
        (pb.NetworkConfig(address="10.0.0.2/30", gateway="fd00::1"), "network.gateway"),
        (pb.NetworkConfig(address="10.0.0.2/30", dns="x.y"), "network.dns"),
        (pb.NetworkConfig(address="10.0.0.2/30", mac="02:00:00:00:00"), "network.mac"),
    ],
)
def test_init_refuses_a_malformed_network_naming_the_field(
    fresh_guestd: Guestd, net: pb.NetworkConfig, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        fresh_guestd.guest.Init(pb.InitRequest(sandbox_id="sbx-1", network=net))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (e.value.details() or "")
    assert not fresh_guestd.guest.Health(pb.HealthRequest()).initialized


def test_init_logs_how_long_it_took_at_debug() -> None:
    g = Guestd("--log-level", "DEBUG")
    try:
        g.guest.Init(pb.InitRequest(sandbox_id="sbx-timed"))
        assert "Init sbx-timed took" in g.logs()
    finally:
        g.close()


def test_identity_files_are_rewritten_only_when_they_change(tmp_path: Path) -> None:
    from guestd.guest import _write_text

    f = tmp_path / "hostname"
    _write_text(str(f), "a\n")
    before = f.stat()
    _write_text(str(f), "a\n")  # the name a claimed member already has: untouched
    assert f.stat().st_mtime_ns == before.st_mtime_ns and f.stat().st_ino == before.st_ino
    f.chmod(0o444)  # a write would fail now
    _write_text(str(f), "a\n")
    f.chmod(0o644)
    _write_text(str(f), "b\n")
    assert f.read_text() == "b\n"

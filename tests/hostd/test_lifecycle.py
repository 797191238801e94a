"""Sandbox lifecycle on real microVMs through a real hostd (one hostd for the module)."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from hostd_framework import EventWatcher, Hostd, pb, wait_for

from moru_proto.guest.v1 import filesystem_pb2, filesystem_pb2_grpc, process_pb2

pytestmark = pytest.mark.vm

RUNNING, PAUSED = pb.SANDBOX_STATE_RUNNING, pb.SANDBOX_STATE_PAUSED


@pytest.fixture(scope="module")
def pair(hostd: Hostd) -> list[pb.SandboxInfo]:
    """Two sandboxes shared by the read-mostly tests below (booted in parallel)."""
    with ThreadPoolExecutor(2) as ex:
        a = ex.submit(
            hostd.create,
            timeout_seconds=900,
            metadata={"project": "p1", "n": "1"},
            envs={"FOO": "bar"},
        )
        b = ex.submit(hostd.create, timeout_seconds=900, metadata={"project": "p2"}, memory_mb=256)
        return [a.result(), b.result()]


def sandbox_cgroup(h: Hostd, sid: str, controller: str) -> Path:
    paths = [p for p in h.sandbox_cgroups() if p.name == sid and p.parent.parent.name == controller]
    if not paths:  # cgroup v2: one directory
        paths = [p for p in h.sandbox_cgroups() if p.name == sid]
    assert paths, f"no cgroup for {sid}"
    return paths[0]


def test_create_and_get(hostd: Hostd, pair: list[pb.SandboxInfo]) -> None:
    a, b = pair
    assert a.sandbox_id.startswith("sbx_") and a.sandbox_id != b.sandbox_id
    assert a.state == RUNNING and a.template_id == "base"
    assert a.cpu_count == 2 and a.memory_mb == 512 and b.memory_mb == 256
    assert a.secure and a.access_token
    got = hostd.sandboxes.Get(pb.GetRequest(sandbox_id=a.sandbox_id), metadata=hostd.md())
    assert got.metadata == {"project": "p1", "n": "1"}
    left = got.end_at.ToSeconds() - time.time()
    assert 800 < left <= 900


def test_guest_calls_pass_through_with_env_and_identity(
    hostd: Hostd, pair: list[pb.SandboxInfo]
) -> None:
    a, _ = pair
    code, out, err = hostd.run(a, 'echo "$FOO $(uname -n) $(nproc)"')
    assert code == 0, err
    assert out.split() == ["bar", a.sandbox_id.replace("_", "-"), "2"]
    code, out, _ = hostd.run(a, "exit 3")
    assert code == 3
    # A client-streaming call (StreamInput) and a unary one pass through too.
    lst = hostd.process.List(process_pb2.ListRequest(), metadata=hostd.md(a))
    assert lst is not None


def test_file_streams_pass_through_both_ways(hostd: Hostd, pair: list[pb.SandboxInfo]) -> None:
    """Client streaming (Write) and server streaming (Read) of 3 MB through hostd."""
    a, _ = pair
    fs = filesystem_pb2_grpc.FilesystemStub(hostd.channel)
    data = os.urandom(3 << 20)
    chunks = [data[i : i + (256 << 10)] for i in range(0, len(data), 256 << 10)]
    reqs = [filesystem_pb2.WriteRequest(header=filesystem_pb2.WriteHeader(path="/root/blob"))]
    reqs += [filesystem_pb2.WriteRequest(data=c) for c in chunks]
    resp = fs.Write(iter(reqs), metadata=hostd.md(a), timeout=120)
    assert resp.bytes_written == len(data)
    got = b"".join(
        r.data
        for r in fs.Read(
            filesystem_pb2.ReadRequest(path="/root/blob"), metadata=hostd.md(a), timeout=120
        )
    )
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    # A guest error passes through with its own code.
    with pytest.raises(grpc.RpcError) as ei:
        fs.Stat(filesystem_pb2.StatRequest(path="/nope"), metadata=hostd.md(a))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_secure_sandbox_needs_its_token(hostd: Hostd, pair: list[pb.SandboxInfo]) -> None:
    a, b = pair
    for token in ("", "wrong", b.access_token):
        with pytest.raises(grpc.RpcError) as ei:
            hostd.run(a, "true", token=token)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_list_filters_and_pages(hostd: Hostd, pair: list[pb.SandboxInfo]) -> None:
    a, b = pair
    ids = {s.sandbox_id for s in hostd.list_all(metadata={"project": "p1"})}
    assert ids == {a.sandbox_id}
    ids = {s.sandbox_id for s in hostd.list_all()}
    assert {a.sandbox_id, b.sandbox_id} <= ids
    assert hostd.list_all(states=[PAUSED]) == []
    seen, token = [], ""
    while True:
        r = hostd.sandboxes.List(pb.ListRequest(page_size=1, page_token=token), metadata=hostd.md())
        assert len(r.sandboxes) <= 1
        seen += [s.sandbox_id for s in r.sandboxes]
        token = r.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))


def test_set_timeout(hostd: Hostd, pair: list[pb.SandboxInfo]) -> None:
    a, _ = pair
    info = hostd.sandboxes.SetTimeout(
        pb.SetTimeoutRequest(sandbox_id=a.sandbox_id, timeout_seconds=1200), metadata=hostd.md()
    )
    assert abs(info.end_at.ToSeconds() - (time.time() + 1200)) < 3
    with pytest.raises(grpc.RpcError) as ei:
        hostd.sandboxes.SetTimeout(
            pb.SetTimeoutRequest(sandbox_id=a.sandbox_id, timeout_seconds=-1), metadata=hostd.md()
        )
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_metrics_and_console(hostd: Hostd, pair: list[pb.SandboxInfo]) -> None:
    a, _ = pair
    m = hostd.sandboxes.GetMetrics(
        pb.GetMetricsRequest(sandbox_id=a.sandbox_id), metadata=hostd.md()
    )
    assert m.metrics, "the first sample is taken right after Create"
    s = m.metrics[-1]
    assert s.cpu_count == 2 and 0 < s.mem_used < s.mem_total and s.disk_total > 0
    log = hostd.sandboxes.GetConsoleLog(
        pb.GetConsoleLogRequest(sandbox_id=a.sandbox_id, tail_bytes=4096), metadata=hostd.md()
    )
    assert b"guestd" in log.data and len(log.data) <= 4096


def test_cgroup_limits(hostd: Hostd, pair: list[pb.SandboxInfo]) -> None:
    a, _ = pair
    cpu = sandbox_cgroup(hostd, a.sandbox_id, "cpu")
    if (cpu / "cpu.cfs_quota_us").exists():
        quota = int((cpu / "cpu.cfs_quota_us").read_text())
        period = int((cpu / "cpu.cfs_period_us").read_text())
        mem = sandbox_cgroup(hostd, a.sandbox_id, "memory") / "memory.limit_in_bytes"
        limit = int(mem.read_text())
    else:
        q, p = (cpu / "cpu.max").read_text().split()
        quota, period = int(q), int(p)
        limit = int((cpu / "memory.max").read_text())
    # Its 2 vcpus, capped by what hostd's CPU reserve (default 0.25 cores) leaves.
    reserve = float(hostd.config.get("cpu_reserve_cores", 0.25))
    want = min(2.0, (os.cpu_count() or 1) - reserve) if reserve else 2.0
    assert quota == int(want * period)
    assert 512 << 20 < limit <= (512 + 1024) << 20
    procs = sandbox_cgroup(hostd, a.sandbox_id, "pids") / "cgroup.procs"
    comms = {Path(f"/proc/{p}/comm").read_text().strip() for p in procs.read_text().split()}
    assert any(c.startswith("qemu") for c in comms) and "vhost-device-vs" in comms, comms


def test_guest_oom_stays_inside_the_guest(hostd: Hostd, pair: list[pb.SandboxInfo]) -> None:
    a, b = pair  # b has 256 MB
    # Touches 16 MB after 16 MB until the 256 MB guest runs out.
    grow = "a = []\nwhile True: a.append(b'x' * (16 << 20))"
    code, _, err = hostd.run(b, f'python3 -c "{grow}"', timeout=240)
    assert code == 128 + signal.SIGKILL, (code, err)  # killed by the guest's OOM killer
    code, out, _ = hostd.run(b, "dmesg | grep -ci 'out of memory'")
    assert int(out.strip() or 0) >= 1
    # The sandbox itself, its neighbour and the host are fine.
    assert hostd.run(b, "echo alive")[1] == "alive\n"
    assert hostd.run(a, "echo alive")[1] == "alive\n"
    info = hostd.sandboxes.Get(pb.GetRequest(sandbox_id=b.sandbox_id), metadata=hostd.md())
    assert info.state == RUNNING


def test_pause_resume(hostd: Hostd, pair: list[pb.SandboxInfo]) -> None:
    """Pause is to disk: the VM's processes end (no CPU, no guest memory), Resume restores it."""
    a, _ = pair
    assert hostd.run(a, "echo before > /root/p; sleep 3600 & echo ok")[1] == "ok\n"
    before = hostd.sandboxes.Get(pb.GetRequest(sandbox_id=a.sandbox_id), metadata=hostd.md())
    info = hostd.sandboxes.Pause(
        pb.PauseRequest(sandbox_id=a.sandbox_id), metadata=hostd.md(), timeout=600
    )
    assert info.state == PAUSED
    # No VM process left in the sandbox's cgroup, so no CPU is used while paused.
    procs = sandbox_cgroup(hostd, a.sandbox_id, "pids") / "cgroup.procs"
    assert procs.read_text().split() == []
    acct = sandbox_cgroup(hostd, a.sandbox_id, "cpuacct")
    usage_file = acct / "cpuacct.usage" if (acct / "cpuacct.usage").exists() else None
    if usage_file is not None:
        u1 = int(usage_file.read_text())
        time.sleep(1.5)
        u2 = int(usage_file.read_text())
        assert u2 - u1 == 0, "a paused sandbox uses no CPU"
    else:
        time.sleep(1.5)
    with pytest.raises(grpc.RpcError) as ei:
        hostd.run(a, "true")
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "resume" in str(ei.value.details())
    t0 = time.monotonic()
    info = hostd.sandboxes.Resume(
        pb.ResumeRequest(sandbox_id=a.sandbox_id), metadata=hostd.md(), timeout=600
    )
    resume_s = time.monotonic() - t0
    assert info.state == RUNNING
    # The clock stopped while paused: end_at moved by about the paused time
    # (Resume from disk included: it takes 5-30 s under TCG).
    moved = info.end_at.ToSeconds() - before.end_at.ToSeconds()
    assert 1 <= moved <= 60 + 2 * resume_s, (moved, resume_s)
    code, out, _ = hostd.run(a, "cat /root/p; pgrep -c -x sleep")
    assert code == 0 and out.split() == ["before", "1"], out


def test_kill_releases_everything(hostd: Hostd, pair: list[pb.SandboxInfo]) -> None:
    with EventWatcher(hostd) as w:
        for s in pair:
            hostd.kill(s.sandbox_id)
            ev = w.wait(s.sandbox_id, pb.EVENT_TYPE_KILLED, 10)
            assert ev.reason == pb.EVENT_REASON_USER
    for s in pair:
        sid = s.sandbox_id
        with pytest.raises(grpc.RpcError) as e1:
            hostd.sandboxes.Get(pb.GetRequest(sandbox_id=sid), metadata=hostd.md())
        with pytest.raises(grpc.RpcError) as e2:
            hostd.kill(sid)
        with pytest.raises(grpc.RpcError) as e3:
            hostd.run(s, "true")
        for e in (e1, e2, e3):
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert hostd.check_clean() == []


def test_expiry(hostd: Hostd) -> None:
    with EventWatcher(hostd) as w:
        s = hostd.create(timeout_seconds=2)
        end_at = s.end_at.ToNanoseconds() / 1e9
        ev = w.wait(s.sandbox_id, pb.EVENT_TYPE_KILLED, 30)
        assert ev.reason == pb.EVENT_REASON_TIMEOUT
        assert ev.time.ToNanoseconds() / 1e9 - end_at < 1.0
    with pytest.raises(grpc.RpcError) as ei:
        hostd.sandboxes.Get(pb.GetRequest(sandbox_id=s.sandbox_id), metadata=hostd.md())
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert hostd.check_clean() == []


def test_vmm_killed_is_reported_and_cleaned_up(hostd: Hostd) -> None:
    s = hostd.create()
    procs = sandbox_cgroup(hostd, s.sandbox_id, "pids") / "cgroup.procs"
    qemu = [
        int(p)
        for p in procs.read_text().split()
        if Path(f"/proc/{p}/comm").read_text().startswith("qemu")
    ]
    assert len(qemu) == 1
    with EventWatcher(hostd) as w:
        os.kill(qemu[0], signal.SIGKILL)  # the VMM of a sandbox this test created
        ev = w.wait(s.sandbox_id, pb.EVENT_TYPE_KILLED, 10)
        assert ev.reason == pb.EVENT_REASON_VMM_EXITED
    with pytest.raises(grpc.RpcError) as ei:
        hostd.sandboxes.Get(pb.GetRequest(sandbox_id=s.sandbox_id), metadata=hostd.md())
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    wait_for(lambda: hostd.check_clean() == [], 10, what="cleanup after VMM death")

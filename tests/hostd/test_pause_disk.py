"""Pause to disk through hostd's API, on real microVMs: processes keep running, memory is freed.

One sandbox walks through: a counting background process -> Pause (QEMU gone,
cgroup memory ~0, snapshot on disk) -> hostd kill -9, its cgroups removed (as
by a host reboot), hostd restart -> Resume
(still counting, earlier files there, guest clock right) -> Pause again ->
damaged / missing snapshot errors (sandbox kept, PAUSED) -> Kill while paused
to disk leaks nothing. A second hostd whose state dir is a small tmpfs shows
that a pause which does not fit on disk is refused and the sandbox keeps
running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import require_images
from hostd_framework import EventWatcher, Hostd, our_pids, pb, running_hostd, wait_for

from hostd.rundir import RunDir, snapshot_meta, snapshot_ram
from hostd.vmm.base import SnapshotInfo
from hostd.vmm.qemu.hotplug import EJECT_SCRIPT
from hostd.vmm.snapfile import QEMU_MAGIC, read_info

pytestmark = pytest.mark.vm

RUNNING, PAUSED = pb.SANDBOX_STATE_RUNNING, pb.SANDBOX_STATE_PAUSED
COUNTER = (
    "echo kept > /root/before; "
    # Written then renamed, so a reader never sees the file empty mid-write.
    "nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /root/count.new;"
    " mv /root/count.new /root/count; sleep 0.2; done'"
    " >/dev/null 2>&1 & echo started"
)


def count(h: Hostd, s: pb.SandboxInfo) -> int:
    code, out, err = h.run(s, "cat /root/count")
    assert code == 0, err
    return int(out)


def clock_offset(h: Hostd, s: pb.SandboxInfo) -> float:
    """Guest wall clock minus the host's, in seconds."""
    t0 = time.time()
    guest = float(h.run(s, "date +%s.%N")[1])
    return guest - (t0 + time.time()) / 2


def memory_cgroup(h: Hostd, sid: str) -> Path:
    for cg in h.sandbox_cgroups():
        if cg.name == sid and (cg / "memory.usage_in_bytes").exists():
            return cg
        if cg.name == sid and (cg / "memory.current").exists():
            return cg
    raise AssertionError(f"no memory cgroup for {sid}")


def cgroup_memory(cg: Path) -> int:
    f = cg / "memory.usage_in_bytes"
    return int((f if f.exists() else cg / "memory.current").read_text())


def vm_pids(h: Hostd, sid: str) -> list[int]:
    return our_pids(str(h.state / "sandboxes" / sid))


def get(h: Hostd, sid: str) -> pb.SandboxInfo:
    info: pb.SandboxInfo = h.sandboxes.Get(pb.GetRequest(sandbox_id=sid), metadata=h.md())
    return info


def resume_error(h: Hostd, sid: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        h.sandboxes.Resume(pb.ResumeRequest(sandbox_id=sid), metadata=h.md(), timeout=600)
    return ei.value


def test_pause_to_disk_survives_hostd_restart_and_kill_leaks_nothing() -> None:
    require_images()
    with running_hostd(max_sandboxes=4, memory_budget_mb=4096) as h:
        s = h.create(timeout_seconds=1800, memory_mb=512)
        sid = s.sandbox_id
        run_dir = h.state / "sandboxes" / sid
        assert h.run(s, COUNTER)[1] == "started\n"
        wait_for(lambda: h.run(s, "cat /root/count 2>/dev/null")[1].strip(), 30,
                 what="the counter's first write")  # fmt: skip
        c1 = count(h, s)
        cg = memory_cgroup(h, sid)
        mem_running = cgroup_memory(cg)
        assert mem_running > 64 << 20, mem_running
        assert len(vm_pids(h, sid)) == 2  # QEMU and vhost-device-vsock
        before = get(h, sid)
        offset_before = clock_offset(h, s)

        with EventWatcher(h, sid) as w:
            t0 = time.monotonic()
            info = h.sandboxes.Pause(pb.PauseRequest(sandbox_id=sid), metadata=h.md(),
                                     timeout=600)  # fmt: skip
            pause_s = time.monotonic() - t0
            t_paused = time.monotonic()
            ev = w.wait(sid, pb.EVENT_TYPE_PAUSED, 10)
        assert info.state == PAUSED
        assert ev.message.startswith("to disk"), ev.message
        # Memory freed: no VM process left, the cgroup holds (almost) nothing.
        assert vm_pids(h, sid) == []
        assert (cg / "cgroup.procs").read_text().split() == []
        mem_paused = cgroup_memory(cg)
        assert mem_paused < 16 << 20, f"{mem_paused} bytes still charged while paused to disk"
        # The guest's RAM is on disk beside the device state, and gone from /dev/shm.
        ram = snapshot_ram(run_dir / "mem.snap")
        assert ram.stat().st_blocks * 512 > 16 << 20
        assert not RunDir(run_dir).ram.exists()
        # Guest calls are refused; the clock is stopped (no expiry while paused).
        with pytest.raises(grpc.RpcError) as ei:
            h.run(s, "true")
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "resume" in str(ei.value.details())

        # hostd dies (kill -9) and comes back: the sandbox is still there, paused.
        time.sleep(10)  # long enough that a guest clock left as it was would show
        h.kill9()
        # As after a host reboot: the sandbox's cgroups are gone too (they are
        # empty while paused to disk); hostd re-creates them at start.
        for d in h.sandbox_cgroups():
            if d.name == sid:
                d.rmdir()
        assert not [d for d in h.sandbox_cgroups() if d.name == sid]
        # As if hostd had died between recording the pause and removing its
        # `pausing` marker: the start removes it (else the next start after
        # Resume would take the running sandbox for an interrupted pause).
        (run_dir / "pausing").touch()
        h.start()
        got = get(h, sid)
        assert got.state == PAUSED
        assert not (run_dir / "pausing").exists()
        assert vm_pids(h, sid) == []
        cg = memory_cgroup(h, sid)

        with EventWatcher(h, sid) as w:
            t0 = time.monotonic()
            info = h.sandboxes.Resume(pb.ResumeRequest(sandbox_id=sid), metadata=h.md(),
                                      timeout=600)  # fmt: skip
            resume_s = time.monotonic() - t0
            paused_for = time.monotonic() - t_paused  # what a clock left as it was would lose
            w.wait(sid, pb.EVENT_TYPE_RESUMED, 10)
        assert info.state == RUNNING
        # Init was sent again with the wall clock: the guest is not behind by the
        # time it spent on disk (its refined-jiffies clock loses time under TCG
        # anyway, paused or not, so compare with its offset just before pausing).
        offset_after = clock_offset(h, s)
        assert offset_after > offset_before - 5, (offset_before, offset_after, paused_for)
        moved = info.end_at.ToSeconds() - before.end_at.ToSeconds()
        assert moved >= 2, f"the timeout clock ran while paused (end_at moved {moved} s)"
        # The same process still counts, from where it was; earlier files are there.
        c2 = count(h, s)
        assert c2 >= c1
        wait_for(lambda: count(h, s) > c2, 30, what="the counter to go on after resume")
        code, out, _ = h.run(s, "cat /root/before; pgrep -c -f '[e]cho .i > /root/count'")
        assert code == 0 and out.split() == ["kept", "1"], out
        assert not (run_dir / "mem.snap").exists(), "the snapshot is removed once resumed"
        assert len(vm_pids(h, sid)) == 2
        print(f"pause to disk {pause_s:.1f} s, resume {resume_s:.1f} s (512 MiB guest)")

        # Paused to disk again, then a damaged snapshot, then a missing one:
        # clear errors, and the sandbox is kept (paused) until killed.
        h.sandboxes.Pause(pb.PauseRequest(sandbox_id=sid), metadata=h.md(), timeout=600)
        snap = run_dir / "mem.snap"
        with snap.open("r+b") as f:
            f.truncate(snap.stat().st_size // 2)
        e = resume_error(h, sid)
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
        assert "snapshot" in str(e.details()) and sid in str(e.details())
        snap.unlink()
        e = resume_error(h, sid)
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
        assert "snapshot is gone" in str(e.details())
        assert get(h, sid).state == PAUSED
        assert vm_pids(h, sid) == []

        with EventWatcher(h, sid) as w:
            h.kill(sid)
            w.wait(sid, pb.EVENT_TYPE_KILLED, 10)
        assert not run_dir.exists()
        assert h.check_clean() == []


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "moru-test", str(path)],
                   check=True)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_pause_without_disk_space_is_refused_and_in_place_pause_stays_available() -> None:
    require_images()
    h = Hostd(max_sandboxes=2, memory_budget_mb=2048)
    left: list[str] = []
    # The state dir (run dirs, so snapshots) on a 256 MiB tmpfs: a 512 MiB guest's
    # snapshot cannot fit, while its overlay disk (a few MiB written) does.
    with tmpfs(h.state, "256m"):
        try:
            h.start()
            s = h.create(timeout_seconds=600, memory_mb=512)
            assert h.run(s, "echo x > /root/f; echo ok")[1] == "ok\n"
            with pytest.raises(grpc.RpcError) as ei:
                h.sandboxes.Pause(pb.PauseRequest(sandbox_id=s.sandbox_id), metadata=h.md(),
                                  timeout=600)  # fmt: skip
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "not enough disk" in str(ei.value.details())
            assert get(h, s.sandbox_id).state == RUNNING
            assert h.run(s, "cat /root/f")[1] == "x\n"
            assert not list((h.state / "sandboxes" / s.sandbox_id).glob("mem.snap*"))
            # The same sandbox under a hostd with pause_to_disk = false: paused in
            # place (processes stopped, memory kept), resumed at once.
            h.config["pause_to_disk"] = False
            h.stop()
            h.start()
            sid = s.sandbox_id
            with EventWatcher(h, sid) as w:
                h.sandboxes.Pause(pb.PauseRequest(sandbox_id=sid), metadata=h.md(), timeout=60)
                assert w.wait(sid, pb.EVENT_TYPE_PAUSED, 10).message == "in place"
            pids = vm_pids(h, sid)
            assert len(pids) == 2
            # Stopped (T), and frozen by the cgroup freezer on top (shown as D on v1).
            states = [Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
                      for p in pids]  # fmt: skip
            assert set(states) <= {"T", "D"}, states
            t0 = time.monotonic()
            h.sandboxes.Resume(pb.ResumeRequest(sandbox_id=sid), metadata=h.md(), timeout=60)
            assert time.monotonic() - t0 < 5
            assert h.run(s, "cat /root/f")[1] == "x\n"
        finally:
            left = h.close()
    shutil.rmtree(h.root, ignore_errors=True)
    assert not left, f"left behind: {left}"


def test_a_volume_stays_mounted_across_pause_to_disk() -> None:
    """The volume is an extra disk in the VM argv: restored with it, the guest mount carries on."""
    from moru_proto.host.v1 import volume_pb2, volume_pb2_grpc

    require_images()
    with running_hostd(max_sandboxes=2, memory_budget_mb=2048) as h:
        vols = volume_pb2_grpc.VolumeServiceStub(h.channel)
        vol = vols.Create(volume_pb2.CreateVolumeRequest(name="pausevol", size_mb=32),
                          metadata=h.md(), timeout=60)  # fmt: skip
        s = h.create(timeout_seconds=900, volume_id=vol.volume_id, volume_mount_path="/data")
        sid = s.sandbox_id
        assert h.run(s, "echo before > /data/a && echo ok")[1] == "ok\n"
        h.sandboxes.Pause(pb.PauseRequest(sandbox_id=sid), metadata=h.md(), timeout=600)
        assert vm_pids(h, sid) == []
        # Still attached while paused: another sandbox cannot take it.
        got = vols.Get(volume_pb2.GetVolumeRequest(volume_id=vol.volume_id), metadata=h.md())
        assert got.attached_to == sid
        h.sandboxes.Resume(pb.ResumeRequest(sandbox_id=sid), metadata=h.md(), timeout=600)
        code, out, err = h.run(s, "cat /data/a; echo after > /data/b && sync && "
                                  "grep -c ' /data ext4 ' /proc/mounts")  # fmt: skip
        assert code == 0 and out.split() == ["before", "1"], (out, err)
        h.kill(sid)
        # The data written after the restore reached the volume's disk.
        s2 = h.create(timeout_seconds=600, volume_id=vol.volume_id, volume_mount_path="/data")
        assert h.run(s2, "cat /data/a /data/b")[1].split() == ["before", "after"]
        h.kill(s2.sandbox_id)
        vols.Delete(volume_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), metadata=h.md(),
                    timeout=60)  # fmt: skip


def _net_hostd() -> Hostd:
    import secrets
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = int(sk.getsockname()[1])
    h = Hostd(max_sandboxes=4, memory_budget_mb=4096)
    h.network = {
        "enabled": True,
        "pool_cidr": "10.229.0.0/16",
        "proxy_listen": f"127.0.0.1:{port}",
        "name_prefix": f"mpd{secrets.token_hex(1)}",
        "veth_prefix": "mpv",
        "run_dir": str(h.root / "net"),
    }
    return h


def _fetch(port: int, host: str) -> bytes | None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": host})
        r = conn.getresponse()
        return bytes(r.read()) if r.status == 200 else None
    except OSError:
        return None
    finally:
        conn.close()


def test_networking_survives_pause_to_disk_and_a_lost_network() -> None:
    """A server in the guest answers through hostd's proxy after Resume, also after the
    sandbox network was lost while hostd was down (host reboot) and re-created with
    another address, which Resume gives the guest through Init."""
    require_images()
    h = _net_hostd()
    left: list[str] = []
    try:
        h.start(timeout=120)
        port = int(h.network["proxy_listen"].rsplit(":", 1)[1])
        first = h.create(timeout_seconds=900)
        s = h.create(timeout_seconds=900)
        sid = s.sandbox_id
        h.kill(first.sandbox_id)  # frees the lower address slot
        h.run(s, "cd /root && nohup python3 -m http.server 8000 >/dev/null 2>&1 & echo ok")
        host = f"8000-{sid}.localhost:{port}"
        wait_for(lambda: _fetch(port, host), 60, 0.5, "http.server through the proxy")
        ip_before = h.run(s, "ip -4 -o addr show eth0")[1].split()[3]

        h.sandboxes.Pause(pb.PauseRequest(sandbox_id=sid), metadata=h.md(), timeout=600)
        assert _fetch(port, host) is None  # paused: nothing answers
        h.sandboxes.Resume(pb.ResumeRequest(sandbox_id=sid), metadata=h.md(), timeout=600)
        assert wait_for(lambda: _fetch(port, host), 60, 0.5, "the proxy after resume")

        h.sandboxes.Pause(pb.PauseRequest(sandbox_id=sid), metadata=h.md(), timeout=600)
        h.kill9()
        rec = json.loads(
            subprocess.run(["sqlite3", str(h.state / "hostd.db"),
                            f"SELECT data FROM sandboxes WHERE sandbox_id='{sid}'"],
                           capture_output=True, text=True, check=True).stdout
        )  # fmt: skip
        net = rec["network"]
        subprocess.run(["ip", "netns", "del", net["netns"]], check=True)
        subprocess.run(["ip", "link", "del", net["host_veth"]], check=False)
        h.start(timeout=120)
        assert get(h, sid).state == PAUSED
        h.sandboxes.Resume(pb.ResumeRequest(sandbox_id=sid), metadata=h.md(), timeout=600)
        ip_after = h.run(s, "ip -4 -o addr show eth0")[1].split()[3]
        assert ip_after != ip_before, "expected the re-created network to use the freed slot"
        assert wait_for(lambda: _fetch(port, host), 60, 0.5, "the proxy after a lost network")
        h.kill(sid)
    finally:
        left = h.close()
        subprocess.run(["nft", "delete", "table", "inet", h.network["name_prefix"]],
                       capture_output=True)  # fmt: skip
    assert not left, f"left behind: {left}"


# 0.3 s: the guest is ejecting its vsock. 3 s: on a loaded host, unplugging or
# saving; on a quiet one the save is done (~2.5 s) and the VM being ended or the
# row recorded. kill9() closes the test's channel first, so hostd sees the Pause
# cancelled and starts giving the VM back a moment before SIGKILL: the late
# cases also exercise a hostd dying in the middle of that give-back.
@pytest.mark.parametrize("after", [0.3, 3.0, 3.5])
def test_hostd_killed_during_a_pause_leaves_a_usable_sandbox(after: float) -> None:
    """kill -9 of hostd `after` seconds into a Pause (ejecting / unplugging / saving):
    the restarted hostd has the sandbox running and reachable, or paused to disk and
    resumable, never running but unreachable."""
    import threading

    require_images()
    with running_hostd(max_sandboxes=2, memory_budget_mb=2048) as h:
        s = h.create(timeout_seconds=900)
        sid = s.sandbox_id
        assert h.run(s, "echo x > /root/f; echo ok")[1] == "ok\n"
        errors: list[BaseException] = []

        def pause() -> None:
            try:
                h.sandboxes.Pause(pb.PauseRequest(sandbox_id=sid), metadata=h.md(), timeout=600)
            except grpc.RpcError as e:
                errors.append(e)

        t = threading.Thread(target=pause)
        t.start()
        time.sleep(after)
        h.kill9()
        t.join(30)
        # Giving a half-paused VM back (re-plugging its vsock) happens before hostd
        # is ready, and can take a while on a loaded TCG host.
        h.start(timeout=300)
        try:
            state = get(h, sid).state
        except grpc.RpcError:
            print(h.log_tail(20000))  # shown on failure
            raise
        print(f"killed {after} s into Pause: restarted hostd has it {pb.SandboxState.Name(state)}")
        try:
            if state == PAUSED:
                h.sandboxes.Resume(pb.ResumeRequest(sandbox_id=sid), metadata=h.md(), timeout=600)
            assert h.run(s, "cat /root/f", timeout=120)[1] == "x\n"
        except (grpc.RpcError, AssertionError):
            print(h.log_tail(20000))  # shown on failure
            raise
        assert not list((h.state / "sandboxes" / sid).glob("mem.snap*"))
        assert not (h.state / "sandboxes" / sid / "pausing").exists()
        h.kill(sid)


def test_hostd_killed_while_giving_a_vm_back_leaves_it_running() -> None:
    """What a hostd leaves when SIGKILL lands in a give-back (a Pause cancelled by its
    client or a stop, then kill -9), made by hand since the test above hits it only by
    chance: the guest ejected its vsock, vhost-device-vsock was killed and its
    successor not started, the `pausing` marker is there, and a complete snapshot of a
    VM that ran on since. The restarted hostd used to discard the sandbox (or kill
    QEMU and restore the stale snapshot); it starts a fresh backend and gives the VM
    back running, and drops the snapshot."""
    require_images()
    with running_hostd(max_sandboxes=2, memory_budget_mb=2048) as h:
        s = h.create(timeout_seconds=900)
        sid = s.sandbox_id
        run_dir = h.state / "sandboxes" / sid
        assert h.run(s, "echo x > /root/f; echo ok")[1] == "ok\n"
        assert h.run(s, EJECT_SCRIPT + " echo ejecting")[1] == "ejecting\n"
        h.kill9()
        (run_dir / "pausing").touch()
        snap = run_dir / "mem.snap"
        snap.write_bytes(QEMU_MAGIC + bytes(60))
        info = SnapshotInfo(snap, 64, s.memory_mb, s.cpu_count, time.time(), 0.1, 1.0, format=1)
        snapshot_meta(snap).write_text(info.to_json())
        assert read_info(snap) == info  # complete, as far as hostd can tell
        vsk = int((run_dir / "vsk.pid").read_text())
        os.kill(vsk, signal.SIGKILL)
        wait_for(lambda: vsk not in vm_pids(h, sid), 10, 0.1, "vhost-device-vsock to exit")
        qemu = int((run_dir / "vmm.pid").read_text())

        h.start(timeout=300)
        assert get(h, sid).state == RUNNING
        assert h.run(s, "cat /root/f", timeout=120)[1] == "x\n"
        assert qemu in vm_pids(h, sid), "the VM was given back, not restored"
        assert len(vm_pids(h, sid)) == 2
        assert not list(run_dir.glob("mem.snap*"))
        assert not (run_dir / "pausing").exists()
        h.kill(sid)

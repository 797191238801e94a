"""Faults inside and around one sandbox: a fork bomb, a killed guestd, a killed
vsock backend and a hostd restart on top of it. One sandbox serves the module
(in order); each test leaves it working or fails.

Before: the bomb got guestd OOM-killed for good while the sandbox was listed
as running; a restarted guestd came back without the sandbox's env and token and
without the processes the old one started;
a dead vhost-device-vsock was never noticed, and a hostd restart then
destroyed the live VM.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostd_framework import EventWatcher, Hostd, wait_for

from moru import Sandbox
from moru.exceptions import CommandExitException, SandboxException, TimeoutException
from moru_proto.host.v1 import sandbox_pb2 as pb

ENV = {"FAULT_VAR": "kept-across-faults"}
# Asks the live guestd itself (its inner unix socket) with a wrong token, so the
# guest-side token check is what answers, not hostd's.
TOKEN_PROBE = r"""
import glob, os, sys
sys.path[:0] = ["/opt/moru/lib", "/opt/moru/site-packages"]
import grpc
from moru_proto.guest.v1 import guest_pb2, guest_pb2_grpc
sock = max(glob.glob("/tmp/guestd-*/vsock-*.sock"), key=os.path.getmtime)
stub = guest_pb2_grpc.GuestStub(grpc.insecure_channel("unix:" + sock))
try:
    r = stub.GetInfo(guest_pb2.GetInfoRequest(), timeout=60,
                     metadata=(("x-moru-access-token", "wrong"),))
    print("ANSWERED", r.sandbox_id)
except grpc.RpcError as e:
    print("REFUSED", e.code().name)
"""


@pytest.fixture(scope="module")
def sbx(hostd: Hostd) -> Iterator[Sandbox]:
    s = Sandbox.create(timeout=3600, envs=ENV, secure=True)
    try:
        yield s
    finally:
        s.kill()


def guestd_pid(sbx: Sandbox) -> int:
    """guestd is the parent of the shell a root command runs in."""
    r = sbx.commands.run("echo $PPID; tr '\\0' ' ' </proc/$PPID/cmdline", user="root")
    pid, cmdline = r.stdout.split("\n", 1)
    assert "guestd" in cmdline, cmdline
    return int(pid)


def works(sbx: Sandbox) -> bool:
    try:
        r = sbx.commands.run("echo $FAULT_VAR", timeout=60)
    except SandboxException:
        return False
    return r.stdout.strip() == ENV["FAULT_VAR"]


def state(h: Hostd, sandbox_id: str) -> pb.SandboxInfo:
    info: pb.SandboxInfo = h.sandboxes.Get(pb.GetRequest(sandbox_id=sandbox_id),
                                           metadata=h.md())  # fmt: skip
    return info


@pytest.mark.vm
def test_fork_bomb_leaves_guestd_alive(hostd: Hostd, sbx: Sandbox) -> None:
    before = guestd_pid(sbx)
    bomb = sbx.commands.run("timeout 20 bash -c ':(){ :|:& };:'", background=True)
    group = f"/sys/fs/cgroup/moru-user/p{bomb.pid}"
    # bash's `&` outlives `timeout`: the bomb goes on in its own group.
    wait_for(lambda: int(sbx.files.read(f"{group}/pids.current")) > 100, 120, interval=1.0,
             what="the bomb confined to its command's group")  # fmt: skip
    wait_for(lambda: works(sbx), 180, interval=1.0, what="a command while the bomb runs")
    assert guestd_pid(sbx) == before, "guestd was killed and restarted"
    assert state(hostd, sbx.sandbox_id).state == pb.SANDBOX_STATE_RUNNING
    sbx.commands.run(f"echo 1 >{group}/cgroup.kill", user="root", timeout=60)
    with contextlib.suppress(CommandExitException, TimeoutException):
        bomb.wait()
    wait_for(lambda: sbx.files.read(f"{group}/pids.current").strip() == "0"
             if sbx.files.exists(group) else True, 60, interval=1.0,
             what="the bomb gone")  # fmt: skip


@pytest.mark.vm
def test_killed_guestd_comes_back_with_env_token_and_its_processes(
    hostd: Hostd, sbx: Sandbox
) -> None:
    """Also: a command started before the kill is listed by the new guestd, a
    kill ends it and a Connect to it returns its end (before: it ran on unseen)."""
    survivor = sbx.commands.run("sleep 1000", background=True)
    before = guestd_pid(sbx)
    with EventWatcher(hostd, sbx.sandbox_id) as events:
        try:
            sbx.commands.run(f"kill -9 {before}", user="root", timeout=30)
        except SandboxException:
            pass  # the call dies with guestd
        ev = events.wait(sbx.sandbox_id, pb.EVENT_TYPE_REPAIRED, 180)
    assert "initialised" in ev.message
    wait_for(lambda: works(sbx), 120, interval=1.0, what="env back after the restart")
    assert guestd_pid(sbx) != before
    sbx.files.write("/tmp/token_probe.py", TOKEN_PROBE)
    probe = sbx.commands.run("python3 /tmp/token_probe.py", user="root", timeout=120)
    assert probe.stdout.split() == ["REFUSED", "UNAUTHENTICATED"], probe.stdout + probe.stderr

    listed = {p.pid: p for p in sbx.commands.list()}
    assert survivor.pid in listed, listed
    assert "sleep 1000" in " ".join(listed[survivor.pid].args)
    again = sbx.commands.connect(survivor.pid)
    assert sbx.commands.kill(survivor.pid)
    with pytest.raises(CommandExitException) as ended:
        again.wait()
    # Not guestd's child any more: its status is read from the zombie if guestd is
    # quicker than init, else reported as unknown (-1).
    assert ended.value.exit_code == -1, ended.value
    assert survivor.pid not in {p.pid for p in sbx.commands.list()}


def vsock_backend_pid(h: Hostd, sandbox_id: str) -> int:
    return int((Path(h.state) / "sandboxes" / sandbox_id / "vsk.pid").read_text())


@pytest.mark.vm
def test_killed_vsock_backend_is_restarted_also_across_a_hostd_restart(
    hostd: Hostd, sbx: Sandbox
) -> None:
    sid = sbx.sandbox_id
    with EventWatcher(hostd, sid) as events:
        os.kill(vsock_backend_pid(hostd, sid), signal.SIGKILL)
        ev = events.wait(sid, pb.EVENT_TYPE_REPAIRED, 180)
    assert "vsock backend" in ev.message
    wait_for(lambda: works(sbx), 120, interval=1.0, what="commands after the repair")
    # hostd gone, then the backend: the next hostd keeps the live VM and repairs it.
    hostd.kill9()
    os.kill(vsock_backend_pid(hostd, sid), signal.SIGKILL)
    hostd.start(timeout=120)
    assert state(hostd, sid).state == pb.SANDBOX_STATE_RUNNING
    wait_for(lambda: works(sbx), 180, interval=1.0, what="commands after hostd restart")

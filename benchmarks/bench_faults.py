#!/usr/bin/env python3
"""Fault soak: N create/command/fault/kill cycles on one hostd; hung calls, leaks, states.

Each cycle creates a sandbox, opens a long command stream (`sleep 1000`),
injects one fault picked at random, and checks what hostd makes of it:
- `guestd`: kill -9 guestd in the guest -> repaired (Init again), commands work,
  and the new guestd lists the `sleep` the old one started (adopted);
- `vsock`: kill -9 the sandbox's vhost-device-vsock -> repaired or marked error;
- `qemu`: kill -9 QEMU -> killed (vmm_exited);
- `none`: nothing.
Then the sandbox is killed (if still there) and the open stream must have
ended: a stream still open `--hang` seconds after its sandbox ended is a hung
call. A cycle whose outcome differs from the expected one is counted as
wrong. At the end: no sandbox left, no process, cgroup, run dir or socket,
and (with sandbox networking, the default) no namespace, veth or nft table
of a sandbox: each sandbox gets a namespace with its egress rules, its DNS
upstream a test host in a namespace this benchmark creates (no traffic
leaves the machine; `--no-network` to leave networking off).

Figures, each next to its floor measured in the same run:
- how long an open stream takes to end after Kill is called, vs the Kill
  call's own duration (the floor: hostd releasing the sandbox);
- how long a repair takes (event repaired after the fault), vs the health
  check period (the floor: a fault is seen at the next check at the earliest).

Usage (root; images built): bench_faults.py [--cycles N] [--seed S] [--hang SECONDS]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "hostd"))

import grpc  # noqa: E402
from hostd_framework import EventWatcher, Hostd, pb  # noqa: E402

from moru_proto.guest.v1 import process_pb2  # noqa: E402

FAULTS = ("guestd", "vsock", "qemu", "none")
HEALTH_INTERVAL = 1.0
TAG = secrets.token_hex(2)
UPLINK = f"mbfup{TAG}"  # a veth to the test host's namespace: the sandboxes' uplink
INET_NS = f"mbfinet{TAG}"
UPLINK_IP, INET_IP = "198.51.100.1", "198.51.100.2"
PREFIX, VETH_PREFIX = f"mbf{TAG}", "mbfv"


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def test_host() -> Iterator[None]:
    """A namespace joined to the host by a veth: the uplink and DNS upstream."""
    sh("ip", "netns", "add", INET_NS)
    try:
        sh("ip", "link", "add", UPLINK, "type", "veth", "peer", "name", "eth0", "netns", INET_NS)
        sh("ip", "addr", "add", f"{UPLINK_IP}/24", "dev", UPLINK)
        sh("ip", "link", "set", UPLINK, "up")
        sh("ip", "-n", INET_NS, "addr", "add", f"{INET_IP}/24", "dev", "eth0")
        sh("ip", "-n", INET_NS, "link", "set", "eth0", "up")
        yield
    finally:
        subprocess.run(["ip", "link", "del", UPLINK], capture_output=True)
        subprocess.run(["ip", "netns", "del", INET_NS], capture_output=True)


def network_leaks() -> list[str]:
    """Sandbox namespaces, veths and nft tables of this run still there."""
    left = [f"netns {n}" for n in sh("ip", "netns", "list").split()
            if n.startswith(PREFIX + "-")]  # fmt: skip
    left += [f"link {n}" for n in os.listdir("/sys/class/net") if n.startswith(VETH_PREFIX)]
    return left


class Stream:
    """An open `sleep 1000` command stream, read in a thread."""

    def __init__(self, h: Hostd, info: pb.SandboxInfo) -> None:
        self.ended_at: float | None = None
        self.status = ""
        self.pid = 0
        req = process_pb2.StartRequest(config=process_pb2.ProcessConfig(shell="sleep 1000"))
        self.started = threading.Event()

        def go() -> None:
            try:
                for ev in h.process.Start(req, metadata=h.md(info)):
                    if ev.HasField("start"):
                        self.pid = ev.start.pid
                    self.started.set()
            except grpc.RpcError as e:
                self.status = e.code().name
            else:
                self.status = "OK"
            finally:
                self.ended_at = time.monotonic()
                self.started.set()

        threading.Thread(target=go, daemon=True).start()


def run(h: Hostd, info: pb.SandboxInfo, shell: str) -> str:
    try:
        code, out, _ = h.run(info, shell, timeout=60)
    except grpc.RpcError as e:
        return f"error {e.code().name}"
    return out.strip() if code == 0 else f"exit {code}"


def listed(h: Hostd, info: pb.SandboxInfo, pid: int) -> str:
    """Whether guestd lists `pid` as running (after a guestd restart: adopted)."""
    try:
        r = h.process.List(process_pb2.ListRequest(), metadata=h.md(info), timeout=60)
    except grpc.RpcError as e:
        return f"list error {e.code().name}"
    return "listed" if any(p.pid == pid and p.running for p in r.processes) else "NOT listed"


def state_of(h: Hostd, sid: str) -> str:
    try:
        i = h.sandboxes.Get(pb.GetRequest(sandbox_id=sid), metadata=h.md(), timeout=30)
    except grpc.RpcError as e:
        return e.code().name.lower()
    return str(pb.SandboxState.Name(i.state)).removeprefix("SANDBOX_STATE_").lower()


def pid_file(h: Hostd, sid: str, name: str) -> int:
    return int((Path(h.state) / "sandboxes" / sid / name).read_text())


def fault(h: Hostd, info: pb.SandboxInfo, kind: str) -> None:
    sid = info.sandbox_id
    if kind == "guestd":
        with_ppid = "kill -9 $PPID"  # the shell's parent is guestd
        try:
            h.run(info, with_ppid, timeout=30)
        except grpc.RpcError:
            pass
    elif kind == "vsock":
        os.kill(pid_file(h, sid, "vsk.pid"), signal.SIGKILL)
    elif kind == "qemu":
        os.kill(pid_file(h, sid, "vmm.pid"), signal.SIGKILL)


def cycle(h: Hostd, kind: str, hang: float, out: dict[str, list[float]]) -> str:
    info = h.create(template="base", timeout_seconds=1800, envs={"SOAK": "1"})
    sid = info.sandbox_id
    s = Stream(h, info)
    s.started.wait(60)
    with EventWatcher(h, sid) as events:
        t_fault = time.monotonic()
        fault(h, info, kind)
        verdict = ""
        if kind in ("guestd", "vsock"):
            try:
                events.wait(sid, pb.EVENT_TYPE_REPAIRED, 240)
                out["repair_s"].append(time.monotonic() - t_fault)
                verdict = "repaired, " + run(h, info, "echo $SOAK")
                if kind == "guestd":
                    verdict += f", sleep {listed(h, info, s.pid)}"
            except TimeoutError:
                verdict = f"not repaired; state {state_of(h, sid)}"
        elif kind == "qemu":
            try:
                events.wait(sid, pb.EVENT_TYPE_KILLED, 60)
                verdict = "killed (vmm_exited)"
            except TimeoutError:
                verdict = f"not cleaned; state {state_of(h, sid)}"
        else:
            verdict = run(h, info, "echo $SOAK")
        final = state_of(h, sid)
        if final not in ("not_found",):
            open_before = s.ended_at is None
            t0 = time.monotonic()
            try:
                h.kill(sid)
            except grpc.RpcError:
                pass
            t_kill = time.monotonic()
            out["kill_s"].append(t_kill - t0)
            deadline = t_kill + hang
            while s.ended_at is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if s.ended_at is None:
                out["hung"].append(1.0)
                verdict += "; HUNG stream"
            elif open_before:
                out["stream_end_s"].append(s.ended_at - t0)
    line = f"{kind:<7} {verdict}; before kill: {final}; stream: {s.status or 'open'}"
    expect = {"guestd": "repaired, 1, sleep listed", "vsock": "repaired, 1",
              "qemu": "killed (vmm_exited)", "none": "1"}[kind]  # fmt: skip
    wrong = (not verdict.startswith(expect) or "HUNG" in verdict
             or final != ("not_found" if kind == "qemu" else "running"))  # fmt: skip
    if wrong:
        out["wrong"].append(1.0)
    return line


def figure(name: str, values: list[float], floor: list[float], unit: str = "s") -> None:
    if not values:
        print(f"{name:<40} (no samples)")
        return
    v = statistics.median(values)
    f = statistics.median(floor) if floor else 0.0
    ratio = f"{v / f:5.2f}x" if f else "  n/a"
    print(f"{name:<40} median {v:8.3f} {unit}  max {max(values):8.3f} {unit}"
          f"   floor {f:8.3f} {unit}   ratio {ratio}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=8)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--hang", type=float, default=30.0, help="seconds before a call counts hung")
    ap.add_argument("--no-network", action="store_true", help="sandboxes without networking")
    a = ap.parse_args()
    with contextlib.ExitStack() as stack:
        if not a.no_network:
            stack.enter_context(test_host())
        soak(a)


def soak(a: argparse.Namespace) -> None:
    rng = random.Random(a.seed)
    h = Hostd(health_interval_seconds=HEALTH_INTERVAL, guest_unhealthy_seconds=60.0,
              error_kill_seconds=10.0, max_sandboxes=4)  # fmt: skip
    if not a.no_network:
        h.network = {
            "enabled": True, "uplink": UPLINK, "dns_upstream": INET_IP,
            "pool_cidr": "10.236.0.0/16", "proxy_listen": "127.0.0.1:0",
            "name_prefix": PREFIX, "veth_prefix": VETH_PREFIX, "run_dir": str(h.root / "net"),
        }  # fmt: skip
    h.start(timeout=120)
    out: dict[str, list[float]] = {"repair_s": [], "kill_s": [], "stream_end_s": [], "hung": [],
                                   "wrong": []}  # fmt: skip
    t0 = time.monotonic()
    try:
        for i in range(a.cycles):
            kind = FAULTS[i] if i < len(FAULTS) else rng.choice(FAULTS)
            print(f"cycle {i + 1:>3}: {cycle(h, kind, a.hang, out)}", flush=True)
        left = [s.sandbox_id for s in h.list_all(states=[
            pb.SANDBOX_STATE_RUNNING, pb.SANDBOX_STATE_PAUSED, pb.SANDBOX_STATE_ERROR])]
    finally:
        leaks = h.close()
        if not a.no_network:
            leaks += network_leaks()
            # The host table is per hostd, kept by design across restarts: ours goes.
            subprocess.run(["nft", "delete", "table", "inet", PREFIX], capture_output=True)
    print(f"\n{a.cycles} cycles in {time.monotonic() - t0:.0f} s (seed {a.seed})")
    figure("open stream ends after Kill is called", out["stream_end_s"], out["kill_s"])
    figure("repair after the fault (event repaired)", out["repair_s"],
           [HEALTH_INTERVAL] * len(out["repair_s"]))  # fmt: skip
    print(f"hung calls: {len(out['hung'])}")
    print(f"cycles with a wrong outcome (not repaired/cleaned, state, adoption): "
          f"{len(out['wrong'])}")
    print(f"sandboxes left listed: {left}")
    print(f"leaks (processes, cgroups, run dirs, sockets, namespaces with their nft rules, "
          f"veths): {leaks or 'none'}")


if __name__ == "__main__":
    main()

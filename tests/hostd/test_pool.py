"""The warm pool through a real hostd (networking on, real VMs on TCG).

One hostd for the module keeps two `base` members (`warm_pool = {base = 2}`).
Creates with base's defaults claim them; Init gives each its own identity
(hostname, env, token, entropy, clock) and the claim applies its egress
policy. Members are never listed; an empty pool falls back to booting; kill,
expiry, SIGTERM and kill -9 of hostd leave nothing behind. The test host the
guests reach lives in a namespace this module creates; hostd's uplink and
DNS upstream point at it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hostd_framework import IMAGES, EventWatcher, Hostd, our_pids, pb, wait_for
from prometheus_client.parser import text_string_to_metric_families
from pyroute2 import IPRoute, NetNS, netns

pytestmark = pytest.mark.vm

HELPER = str(Path(__file__).resolve().parents[1] / "network" / "nethelpers.py")
INET_NS = f"mpool-inet{secrets.token_hex(2)}"
UPLINK = f"mpup{secrets.token_hex(2)}"
UPLINK_IP = "198.51.100.1"
INET_IP = "198.51.100.2"
FILL_TIMEOUT = 900.0  # two cold boots on a loaded 2-core TCG host
CLOCK_SLACK = 20.0
SHAPE = "base:2:512:2048"


@pytest.fixture(scope="module")
def test_host() -> Iterator[str]:
    """A namespace joined to the host by a veth (our uplink), serving HTTP on INET_IP:80."""
    netns.create(INET_NS)
    server = None
    try:
        with IPRoute() as ip:
            ip.link("add", ifname=UPLINK, kind="veth", peer={"ifname": "eth0",
                                                             "net_ns_fd": INET_NS})  # fmt: skip
            idx = ip.link_lookup(ifname=UPLINK)[0]
            ip.addr("add", index=idx, address=UPLINK_IP, prefixlen=24)
            ip.link("set", index=idx, state="up")
        with NetNS(INET_NS) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            e = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=e, address=INET_IP, prefixlen=24)
            ns.link("set", index=e, state="up")
        server = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{INET_NS}", sys.executable, HELPER, "serve", "inet",
             INET_IP],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert server.stdout is not None and "ready" in server.stdout.readline()
        yield INET_IP
    finally:
        if server is not None:
            server.kill()
            server.wait()
        with IPRoute() as ip:
            for idx in ip.link_lookup(ifname=UPLINK):
                ip.link("del", index=idx)
        netns.remove(INET_NS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PoolHostd:
    """The module's hostd, its metrics URL and a watcher of every event since its start."""

    def __init__(self, h: Hostd, prefix: str) -> None:
        self.h = h
        self.prefix = prefix
        self.url = ""
        self.watch: EventWatcher | None = None

    def start(self) -> None:
        port = free_port()
        self.h.config["metrics_listen"] = f"127.0.0.1:{port}"
        self.url = f"http://127.0.0.1:{port}"
        self.h.start(timeout=120)
        self.watch = EventWatcher(self.h).__enter__()

    def stop(self, kill9: bool = False) -> None:
        if self.watch is not None:
            self.watch.__exit__()
            self.watch = None
        self.h.kill9() if kill9 else self.h.stop()

    def metric(self, name: str, **labels: str) -> float:
        """One sample of hostd's /metrics; -1 when absent."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            text = r.read().decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return -1.0

    def wait_full(self) -> None:
        wait_for(lambda: self.metric("moru_warm_pool_ready", template="base", shape=SHAPE) == 2,
                 FILL_TIMEOUT, interval=1.0, what="two ready pool members")  # fmt: skip

    def events(self, type_: int) -> list[pb.SandboxEvent]:
        assert self.watch is not None
        return [e for e in self.watch.events if e.type == type_]

    def members(self) -> set[str]:
        """Members ready now: ready events minus claimed (created) and removed ones."""
        ready = {e.sandbox_id for e in self.events(pb.EVENT_TYPE_POOL_MEMBER_READY)}
        gone = {e.sandbox_id for e in self.events(pb.EVENT_TYPE_CREATED)}
        gone |= {e.sandbox_id for e in self.events(pb.EVENT_TYPE_POOL_MEMBER_REMOVED)}
        return ready - gone

    def left_besides(self, keep: set[str]) -> list[str]:
        """What is left of sandboxes other than `keep` (cgroups, run dirs, netns, processes)."""
        h, left = self.h, []
        cgs = {p.name for p in h.sandbox_cgroups()} - keep
        if cgs:
            left.append(f"cgroups {sorted(cgs)}")
        sdir = h.state / "sandboxes"
        dirs = {p.name for p in sdir.iterdir()} - keep if sdir.is_dir() else set()
        if dirs:
            left.append(f"run dirs {sorted(dirs)}")
        n_ns = len([n for n in netns.listnetns() if n.startswith(self.prefix)])
        if n_ns != len(keep):
            left.append(f"{n_ns} sandbox netns for {len(keep)} members")
        pids = [p for p in our_pids(str(h.state)) if h.proc is None or p != h.proc.pid]
        mine = [p for p in pids if not any(k in _cmdline(p) for k in keep)]
        if mine:
            left.append(f"processes {mine}")
        return left


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def pool(test_host: str) -> Iterator[PoolHostd]:
    if not (IMAGES / "templates" / "base" / "manifest.json").is_file():
        pytest.fail(f"template 'base' is not built in {IMAGES}")
    prefix = f"mpl{secrets.token_hex(1)}"
    h = Hostd(max_sandboxes=8, memory_budget_mb=8192, warm_pool={"base": 2})
    h.network = {
        "enabled": True,
        "uplink": UPLINK,
        "dns_upstream": test_host,
        "pool_cidr": "10.234.0.0/16",
        "proxy_listen": "127.0.0.1:0",
        "name_prefix": prefix,
        "veth_prefix": "mpv",
        "run_dir": str(h.root / "net"),
    }
    p = PoolHostd(h, prefix)
    try:
        p.start()
        yield p
    finally:
        with contextlib.suppress(OSError):  # for post-mortems: close() removes it
            shutil.copy(h.log, "/tmp/moru-pool-tests-hostd.log")
        if p.watch is not None:
            p.watch.__exit__()
        try:
            left = h.close()  # SIGTERM with members in the pool
        finally:
            subprocess.run(["nft", "delete", "table", "inet", prefix], capture_output=True)
            stale = [n for n in netns.listnetns() if n.startswith(prefix)]
            for n in stale:  # after a failure above: removed, and reported below
                subprocess.run(["ip", "netns", "del", n], capture_output=True)
        assert not left, f"left behind: {left}"
        assert not stale, f"netns left behind: {stale}"


def sh(h: Hostd, sbx: pb.SandboxInfo, cmd: str) -> str:
    code, out, err = h.run(sbx, cmd, timeout=120)
    assert code == 0, f"{cmd!r} exited {code}: {err}"
    return out.strip()


def created_how(p: PoolHostd, sid: str) -> str:
    assert p.watch is not None
    return str(p.watch.wait(sid, pb.EVENT_TYPE_CREATED, 30).message)


def test_claims_get_their_own_identity_policy_and_nothing_of_each_other(
    pool: PoolHostd, test_host: str
) -> None:
    h = pool.h
    pool.wait_full()
    members = pool.members()
    assert len(members) == 2
    assert h.list_all() == [], "pool members are listed"

    def create(kw: dict[str, object]) -> tuple[pb.SandboxInfo, float]:
        t0 = time.monotonic()
        return h.create(template="base", timeout_seconds=3600, **kw), time.monotonic() - t0

    # Two Creates at once: each claims its own member.
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        kws: list[dict[str, object]] = [
            {"envs": {"WHO": "a"}},
            {"envs": {"WHO": "b"}, "allow_internet_access": False},
        ]
        (a, ta), (b, tb) = ex.map(create, kws)
    print(f"claimed in {ta:.3f} s and {tb:.3f} s")
    assert {a.sandbox_id, b.sandbox_id} == members
    assert (created_how(pool, a.sandbox_id), created_how(pool, b.sandbox_id)) == (
        "warm_pool", "warm_pool")  # fmt: skip
    assert a.access_token and b.access_token and a.access_token != b.access_token
    assert {s.sandbox_id for s in h.list_all()} == {a.sandbox_id, b.sandbox_id}
    assert pool.metric("moru_warm_pool_claims_total", template="base", shape=SHAPE) == 2
    assert pool.metric("moru_sandbox_creates_total", path="warm_pool") == 2

    seen = {}
    for sbx, who in ((a, "a"), (b, "b")):
        t = time.time()
        out = sh(h, sbx, "hostname; printenv WHO; date +%s.%N; head -c 16 /dev/urandom | od -An"
                 " -tx1 | tr -d ' \\n'; echo; cat /proc/sys/kernel/random/boot_id; "
                 f"echo {who} > /root/mine; sleep 600 >/dev/null 2>&1 & "
                 f"curl -sS --max-time 5 http://{test_host}/{who} || echo blocked")  # fmt: skip
        host, env, clock, rnd, boot_id, body = out.splitlines()
        assert host == sbx.sandbox_id.replace("_", "-")
        assert env == who
        assert abs(float(clock) - t) < CLOCK_SLACK, (clock, t)
        seen[who] = (host, rnd, boot_id)
        if who == "a":
            assert body.startswith(f"inet {test_host} /a"), body
        else:  # Create's allow_internet_access=False, applied at claim
            assert body == "blocked", body
    assert seen["a"][0] != seen["b"][0]
    assert seen["a"][1] != seen["b"][1], "claimed members produce the same random bytes"
    print(f"boot_id a={seen['a'][2]} b={seen['b'][2]}")
    # Each sandbox sees its own file and its own sleeper only.
    count = "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done | grep -c '^sleep 600'"
    for sbx, own in ((a, "a"), (b, "b")):
        assert sh(h, sbx, f"cat /root/mine; {count}").splitlines() == [own, "1"]
    # The pool's token is gone: the guest accepts only the sandbox's own.
    with pytest.raises(grpc.RpcError) as e:
        h.run(a, "true", token=b.access_token)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for sbx in (a, b):
        h.kill(sbx.sandbox_id)
    pool.wait_full()  # no member being prepared (their ids are known once ready)
    assert not pool.left_besides(pool.members()), pool.left_besides(pool.members())


def test_a_dead_member_is_never_claimed_and_an_empty_pool_falls_back(pool: PoolHostd) -> None:
    h = pool.h
    pool.wait_full()
    dead, live = sorted(pool.members())
    for cg in h.sandbox_cgroups():
        if cg.name == dead and cg.parent.parent.name == "pids":
            for pid in (cg / "cgroup.procs").read_text().split():
                os.kill(int(pid), signal.SIGKILL)  # its QEMU and vsock device
    misses = pool.metric("moru_warm_pool_misses_total", template="base", shape=SHAPE)
    # The dead member is never handed out: seen dead, or (its QEMU still exiting)
    # its claim fails and the Create takes the next ready member.
    a = h.create(template="base", timeout_seconds=3600)
    assert a.sandbox_id == live
    # Creates back to back empty the pool (a refill waits 1 s after a claim and
    # takes seconds): one of three misses and falls back to the ready snapshot or a boot.
    extra: list[pb.SandboxInfo] = []
    try:
        for i in range(3):
            extra.append(h.create(template="base", timeout_seconds=3600, envs={"WHO": f"c{i}"}))
            assert extra[-1].sandbox_id != dead
            if created_how(pool, extra[-1].sandbox_id) != "warm_pool":
                break
        c = extra[-1]
        assert created_how(pool, c.sandbox_id) in ("cold_boot", "ready_snapshot")
        assert sh(h, c, "echo $WHO") == f"c{len(extra) - 1}"
        got = pool.metric("moru_warm_pool_misses_total", template="base", shape=SHAPE)
        assert got == misses + 1

        def removal() -> list[pb.SandboxEvent]:
            return [e for e in pool.events(pb.EVENT_TYPE_POOL_MEMBER_REMOVED)
                    if e.sandbox_id == dead]  # fmt: skip

        removed = wait_for(removal, 30, what="the dead member's removal")
        assert len(removed) == 1
        assert removed[0].reason in (pb.EVENT_REASON_VMM_EXITED, pb.EVENT_REASON_CREATE_FAILED)
        # Another shape never claims a member, however full the pool.
        d = h.create(template="base", timeout_seconds=3600, vcpus=1)
        extra.append(d)
        assert created_how(pool, d.sandbox_id) != "warm_pool"
        assert sh(h, d, "nproc") == "1"
    finally:
        for sbx in (a, *extra):
            with contextlib.suppress(grpc.RpcError):
                h.kill(sbx.sandbox_id)
    pool.wait_full()
    assert not pool.left_besides(pool.members()), pool.left_besides(pool.members())


def test_sigterm_and_kill_9_with_a_full_pool_leave_nothing(pool: PoolHostd) -> None:
    h = pool.h
    pool.wait_full()
    pool.stop()  # SIGTERM: members are destroyed with hostd
    assert not h.check_clean(), h.check_clean()
    assert not [n for n in netns.listnetns() if n.startswith(pool.prefix)]
    pool.start()
    pool.wait_full()
    members = pool.members()
    assert len(members) == 2
    pool.stop(kill9=True)
    assert {p.name for p in h.sandbox_cgroups()} == members  # the VMs outlive hostd
    # The next hostd (pool off, so nothing new appears) destroys them.
    h.config["warm_pool"] = {}
    pool.start()
    assert not h.check_clean(), h.check_clean()
    assert not [n for n in netns.listnetns() if n.startswith(pool.prefix)]
    assert h.list_all() == []

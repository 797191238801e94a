"""Create from a ready snapshot, through a real hostd (networking on, real VMs on TCG).

One hostd for the module, told to keep a ready snapshot of `base`; it boots
and saves it in the background after start. Creates with the template's
defaults then restore it, and Init gives each clone its own identity and
network. A volume request, or a damaged snapshot, boots cold. The test host
the guests reach lives in a namespace this module creates (never anything
else): hostd's uplink and DNS upstream point at it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostd_framework import IMAGES, EventWatcher, Hostd, our_pids, pb, wait_for
from pyroute2 import IPRoute, NetNS, netns

from hostd.create_steps import parse
from images.manifest import load_manifest
from moru_proto.host.v1 import volume_pb2, volume_pb2_grpc

pytestmark = pytest.mark.vm

HELPER = str(Path(__file__).resolve().parents[1] / "network" / "nethelpers.py")
INET_NS = f"mrdy-inet{secrets.token_hex(2)}"
UPLINK = f"mrup{secrets.token_hex(2)}"
UPLINK_IP = "198.51.100.1"
INET_IP = "198.51.100.2"
# How long the background maker may take: one cold boot plus a save, on a
# loaded 2-core TCG host.
MAKE_TIMEOUT = 900.0
SNAPSHOT_AGE = 90.0
CLOCK_SLACK = 20.0
RANDOM = "python3 -c 'import os; print(os.urandom(16).hex())'"


@pytest.fixture(scope="module")
def test_host() -> Iterator[str]:
    """A namespace joined to the host by a veth (our uplink), serving HTTP on INET_IP:80."""
    netns.create(INET_NS)
    server = None
    try:
        with IPRoute() as ip:
            peer = {"ifname": "eth0", "net_ns_fd": INET_NS}
            ip.link("add", ifname=UPLINK, kind="veth", peer=peer)
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


@pytest.fixture(scope="module")
def images() -> Iterator[Path]:
    """A private copy of the built `base` (files and manifest).

    Other engineers rebuild the shared image cache while tests run; a rebuilt
    template rightly no longer matches its ready snapshot (Creates boot cold),
    and an old build's files may be pruned. The copy holds still.
    """
    if not (IMAGES / "templates" / "base" / "manifest.json").is_file():
        pytest.fail(f"template 'base' is not built in {IMAGES}")
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="mrdyimg"))
    try:
        m = load_manifest("base", IMAGES)
        files = root / "files"
        files.mkdir()
        paths: dict[str, Any] = {}
        for key in ("kernel", "initramfs", "rootfs"):
            dst = files / Path(getattr(m, key)).name
            subprocess.run(["cp", "--sparse=always", getattr(m, key), str(dst)], check=True)
            paths[key] = str(dst)
        mine = dataclasses.replace(m, **paths)
        (root / "templates" / "base").mkdir(parents=True)
        (root / "templates" / "base" / "manifest.json").write_text(mine.to_json())
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def hostd(test_host: str, images: Path) -> Iterator[Hostd]:
    prefix = f"mrd{secrets.token_hex(1)}"
    h = Hostd(
        images_dir=str(images),
        max_sandboxes=8,
        memory_budget_mb=8192,
        ready_snapshot_templates="base",
        ready_snapshot_check_seconds=3600.0,
    )
    h.network = {
        "enabled": True,
        "uplink": UPLINK,
        "dns_upstream": test_host,
        "pool_cidr": "10.233.0.0/16",
        "proxy_listen": "127.0.0.1:0",
        "name_prefix": prefix,
        "veth_prefix": "mrv",
        "run_dir": str(h.root / "net"),
    }
    try:
        h.start(timeout=120)
        yield h
    finally:
        with contextlib.suppress(OSError):  # for post-mortems: close() removes it
            shutil.copy(h.log, "/tmp/moru-ready-tests-hostd.log")
        try:
            left = h.close()
        finally:
            subprocess.run(["nft", "delete", "table", "inet", prefix], capture_output=True)
        assert not left, f"left behind: {left}"
        assert not [n for n in netns.listnetns() if n.startswith(prefix)], "netns left behind"


def ready_dirs(h: Hostd) -> list[Path]:
    root = h.state / "ready"
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if (d / "ready.json").is_file())


def wait_snapshot(h: Hostd) -> Path:
    found: list[Path] = wait_for(lambda: ready_dirs(h), MAKE_TIMEOUT, interval=1.0,
                                 what="the ready snapshot of base")  # fmt: skip
    return found[0]


def create(h: Hostd, w: EventWatcher, **kw: object) -> tuple[pb.SandboxInfo, str, float]:
    """Creates a sandbox; returns it, how hostd started it (the CREATED event's message), time."""
    t0 = time.monotonic()
    sbx = h.create(template="base", timeout_seconds=3600, **kw)
    took = time.monotonic() - t0
    ev = w.wait(sbx.sandbox_id, pb.EVENT_TYPE_CREATED, 30)
    return sbx, ev.message, took


def sh(h: Hostd, sbx: pb.SandboxInfo, cmd: str) -> str:
    code, out, err = h.run(sbx, cmd, timeout=120)
    assert code == 0, f"{cmd!r} exited {code}: {err}"
    return out.strip()


def clock_offset(h: Hostd, sbx: pb.SandboxInfo) -> float:
    t = time.time()
    return round(float(sh(h, sbx, "date +%s.%N")) - t, 1)


def test_sandboxes_from_the_ready_snapshot_have_their_own_identity_and_network(
    hostd: Hostd, test_host: str
) -> None:
    snap = wait_snapshot(hostd)
    meta = json.loads((snap / "ready.json").read_text())
    print(f"ready snapshot {snap.name}: boot {meta['boot_seconds']} s, save "
          f"{meta['save_seconds']} s, {meta['snapshot_bytes'] >> 20} MiB")  # fmt: skip
    # Old enough that a clock not set by Init would be far off.
    time.sleep(max(0.0, meta["created_at"] + SNAPSHOT_AGE - time.time()))
    with EventWatcher(hostd) as w:
        a, how_a, ta = create(hostd, w, envs={"WHO": "a"})
        offsets = [clock_offset(hostd, a)]
        b, how_b, tb = create(hostd, w, envs={"WHO": "b"})
        offsets.append(clock_offset(hostd, b))
    print(f"created from the ready snapshot in {ta:.1f} s and {tb:.1f} s; "
          f"clock offsets right after {offsets}")  # fmt: skip
    assert (how_a, how_b) == ("ready_snapshot", "ready_snapshot")
    # QEMU started while the RAM image was still copied (the restore then waited for
    # the rest of the copy), and Init went out without a probe dial or channel wait first.
    steps = [parse(ln) for ln in hostd.log.read_text().splitlines()
             if ln.find(f"{a.sandbox_id}: create steps") >= 0]  # fmt: skip
    assert steps and steps[0] is not None, "no create steps line for the sandbox"
    assert {"RAM copy finishing", "gRPC connect + Init"} <= set(steps[0][1]), steps[0]
    assert "guestd reachable" not in steps[0][1], steps[0]
    assert a.sandbox_id != b.sandbox_id and a.guest_ip and a.guest_ip != b.guest_ip
    # Set by Init: without it the guest would be SNAPSHOT_AGE or more behind.
    # (TCG guests on a loaded host lose time later on: refined-jiffies clock.)
    assert all(abs(o) < CLOCK_SLACK for o in offsets), offsets

    seen = {}
    for sbx, who in ((a, "a"), (b, "b")):
        # One command per clone: each costs seconds on a loaded TCG host.
        out = sh(hostd, sbx, "set -e; hostname; printenv WHO; ip -4 -o addr show dev eth0; "
                 "ip route show default; cat /etc/resolv.conf; "
                 f"curl -sS --max-time 30 http://{test_host}/ready; {RANDOM}; "
                 "cat /proc/sys/kernel/random/boot_id /sys/class/net/eth0/address")  # fmt: skip
        host, env, addrs, route, resolv, body, rnd, boot_id, mac = out.splitlines()
        assert host == sbx.sandbox_id.replace("_", "-")
        assert env == who
        # Network from Init: its own address, a default route, DNS at the gateway,
        assert f" {sbx.guest_ip}/" in addrs, addrs
        gw = route.split()[2]
        assert resolv == f"nameserver {gw}"
        # ... and it reaches the test host through its own netns and NAT.
        assert body.startswith(f"inet {test_host} /ready"), body
        seen[who] = (host, rnd, boot_id, mac)
    assert seen["a"][0] != seen["b"][0]
    assert seen["a"][1] != seen["b"][1], "clones produce the same random bytes"
    # boot_id is made on its first read; nothing reads it before the snapshot,
    # so each clone makes its own from its reseeded CRNG.
    print(f"boot_id a={seen['a'][2]} b={seen['b'][2]}")
    assert seen["a"][2] != seen["b"][2]
    # The snapshot's device state carries the maker's MAC; Init sets each clone's own.
    assert seen["a"][3] != seen["b"][3] and seen["a"][3].startswith("02:6d:72:"), seen
    for sbx in (a, b):
        hostd.kill(sbx.sandbox_id)
    assert not hostd.check_clean()


def test_a_restored_sandbox_pauses_to_disk_and_resumes_with_its_network(
    hostd: Hostd, test_host: str
) -> None:
    """Pause to disk saves the clone (its own overlay and memory), not the ready snapshot."""
    wait_snapshot(hostd)
    with EventWatcher(hostd) as w:
        sbx, how, _ = create(hostd, w, envs={"WHO": "p"})
    assert how == "ready_snapshot"
    sh(hostd, sbx, "echo kept > /root/f")
    md = hostd.md()
    hostd.sandboxes.Pause(pb.PauseRequest(sandbox_id=sbx.sandbox_id), metadata=md, timeout=600)
    hostd.sandboxes.Resume(pb.ResumeRequest(sandbox_id=sbx.sandbox_id), metadata=md, timeout=600)
    out = sh(hostd, sbx, "set -e; cat /root/f; printenv WHO; hostname; "
             f"curl -sS --max-time 30 http://{test_host}/again")  # fmt: skip
    f, env, host, body = out.splitlines()
    assert (f, env, host) == ("kept", "p", sbx.sandbox_id.replace("_", "-"))
    assert body.startswith(f"inet {test_host} /again"), body
    assert ready_dirs(hostd), "the ready snapshot is still there for the next Create"
    hostd.kill(sbx.sandbox_id)
    assert not hostd.check_clean()

def test_a_volume_request_boots_cold(hostd: Hostd) -> None:
    wait_snapshot(hostd)
    vols = volume_pb2_grpc.VolumeServiceStub(hostd.channel)
    vol = vols.Create(volume_pb2.CreateVolumeRequest(name=f"r{secrets.token_hex(3)}", size_mb=32),
                      metadata=hostd.md(), timeout=60)  # fmt: skip
    try:
        with EventWatcher(hostd) as w:
            sbx, how, took = create(hostd, w, volume_id=vol.volume_id, volume_mount_path="/data")
        print(f"cold create with a volume: {took:.1f} s")
        assert how == "cold_boot"
        sh(hostd, sbx, "echo hi > /data/x && cat /data/x")
        hostd.kill(sbx.sandbox_id)
    finally:
        vols.Delete(volume_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), metadata=hostd.md(),
                    timeout=60)  # fmt: skip
    assert not hostd.check_clean()


def test_a_damaged_snapshot_falls_back_to_a_cold_boot_and_is_discarded(hostd: Hostd) -> None:
    snap = wait_snapshot(hostd)
    with (snap / "mem.snap").open("ab") as f:  # size no longer what was written
        f.write(b"x")
    with EventWatcher(hostd) as w:
        sbx, how, _ = create(hostd, w, envs={"WHO": "c"})
    assert how == "cold_boot"
    assert sh(hostd, sbx, "printenv WHO") == "c"
    assert not snap.exists() and not ready_dirs(hostd)
    assert "booting cold" in hostd.log_tail(100_000)
    hostd.kill(sbx.sandbox_id)
    assert not hostd.check_clean()
    leftovers = [p.name for p in (hostd.state / "ready").iterdir()]
    assert leftovers == [], leftovers



def test_a_snapshot_being_made_is_cleaned_up_after_kill_9_and_on_sigterm(images: Path) -> None:
    """The maker VM outlives a kill -9 of hostd (own session); the next hostd removes it."""
    h = Hostd(images_dir=str(images), ready_snapshot_templates="base")
    try:
        h.start(timeout=120)
        ready = h.state / "ready"

        def maker() -> list[int]:
            return our_pids(str(ready / ".tmp-"))

        first = wait_for(maker, 120, interval=0.2, what="the maker VM")
        tmp = [p for p in ready.iterdir() if p.name.startswith(".tmp-")]
        h.kill9()
        assert all(Path(f"/proc/{p}").exists() for p in first), "maker died with hostd?"
        h.start(timeout=120)
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in first), 60,
                 what="the old maker VM to be killed")  # fmt: skip
        assert not any(p.exists() for p in tmp), "the unfinished snapshot was not removed"
        wait_for(maker, 120, interval=0.2, what="a new maker VM")
        h.stop()  # SIGTERM while making: everything of the maker goes
        assert not h.check_clean(), h.check_clean()
        assert not maker()
        assert not [p for p in ready.iterdir() if p.name.startswith(".tmp-")]
    finally:
        left = h.close()
        assert not left, f"left behind: {left}"

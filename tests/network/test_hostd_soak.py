"""Robustness of a networking hostd (real hostd, real microVMs, the fake internet as uplink).

- A client that cancels Create at different stages (network set-up, VM boot,
  guestd ready): hostd keeps serving, and everything the half-made sandbox took
  (VM processes, cgroup, netns, veth, dnsmasq, run dir, store row) is released.
- A soak: repeated create -> commands (the guest reaches the fake internet by
  name) -> kill, with hostd's liveness, leftovers and open fds checked each round.
  MORU_SOAK_ROUNDS sets the number of rounds (default 3).

An earlier session saw a networking hostd exit during its second Create
(CancelledError in create, then "closed database"); these tests would catch
the server stopping, a leak after a cancelled create, or a create that cancels
work shared with other calls.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from .conftest import DNS_IP, HOSTS, UPLINK

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hostd"))
import hostd_framework as hf

pb = hf.pb
pytestmark = pytest.mark.vm

ROUNDS = int(os.environ.get("MORU_SOAK_ROUNDS", "3"))
MEMORY_MB = 256


def _netns_names() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


class NetHostd(hf.Hostd):  # type: ignore[misc]
    """A hostd with networking on, its uplink and DNS upstream in the fake internet."""

    def __init__(self) -> None:
        super().__init__(max_sandboxes=4, memory_budget_mb=4096)
        self.prefix = f"msk{secrets.token_hex(1)}"
        self.veth = f"mk{secrets.token_hex(1)[0]}"
        self.network = {
            "enabled": True,
            "uplink": UPLINK,
            "dns_upstream": DNS_IP,
            "pool_cidr": "10.232.0.0/16",
            "proxy_listen": "127.0.0.1:0",
            "name_prefix": self.prefix,
            "veth_prefix": self.veth,
            "run_dir": str(self.root / "net"),
        }

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def net_leftovers(self) -> list[str]:
        left = []
        ns = sorted(n for n in _netns_names() if n.startswith(self.prefix))
        if ns:
            left.append(f"netns {ns}")
        veths = [ln.split(":")[1].strip() for ln in _links().splitlines()
                 if ln.split(":")[1].strip().startswith(self.veth)]  # fmt: skip
        if veths:
            left.append(f"links {veths}")
        # dnsmasq and VM processes mention our root (run dirs, confs) on their command line.
        pids = [p for p in hf.our_pids(str(self.root)) if p != (self.proc.pid if self.proc else -1)]
        if pids:
            left.append(f"processes {pids}")
        return left

    def leftovers(self) -> list[str]:
        return self.check_clean() + self.net_leftovers()

    def fds(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def close(self) -> list[str]:
        left = super().close()
        subprocess.run(["nft", "delete", "table", "inet", self.prefix], capture_output=True)
        return left


@pytest.fixture(scope="module")
def h(fake_inet: None) -> Iterator[NetHostd]:
    h = NetHostd()
    h.start(timeout=120)
    try:
        yield h
    finally:
        log = h.log_tail(20000)
        left = h.close()
        assert not left, f"left behind: {left}\n{log}"


def _wait_clean(h: NetHostd, within: float) -> None:
    end = time.monotonic() + within
    while (left := h.leftovers()) and time.monotonic() < end:
        time.sleep(0.2)
    assert not left, f"left behind: {left}\n{h.log_tail()}"


def _run_dirs(h: NetHostd) -> list[Path]:
    d = h.state / "sandboxes"
    return list(d.iterdir()) if d.is_dir() else []


def _console_says(h: NetHostd, needle: bytes) -> bool:
    for d in _run_dirs(h):
        try:
            if needle in (d / "console.log").read_bytes():
                return True
        except OSError:
            pass
    return False


def _cancel_create_when(h: NetHostd, ready: Any, what: str, within: float = 600) -> None:
    """Starts a Create, cancels it (as a client would) once `ready()` holds."""
    fut = h.sandboxes.Create.future(
        pb.CreateRequest(template="base", memory_mb=MEMORY_MB), metadata=h.md(), timeout=660
    )
    end = time.monotonic() + within
    while not ready():
        assert not fut.done(), f"create ended before {what}: {fut.exception() or fut.result()}"
        assert time.monotonic() < end, f"never reached {what}"
        time.sleep(0.02)
    assert fut.cancel(), f"create could not be cancelled at {what}"
    with pytest.raises(grpc.FutureCancelledError):
        fut.result()


@pytest.mark.parametrize(
    "stage",
    ["network set-up", "VM boot", "guestd ready"],
)
def test_cancelled_create_releases_everything_and_hostd_keeps_serving(
    h: NetHostd, stage: str
) -> None:
    assert h.alive()
    fds0 = h.fds()
    if stage == "network set-up":
        ready = lambda: any(n.startswith(h.prefix) for n in _netns_names())  # noqa: E731
    elif stage == "VM boot":
        ready = lambda: any((d / "console.log").exists() for d in _run_dirs(h))  # noqa: E731
    else:
        ready = lambda: _console_says(h, b"guestd listening on vsock")  # noqa: E731
    _cancel_create_when(h, ready, stage)
    _wait_clean(h, 60)
    assert h.alive(), h.log_tail()
    # The half-made sandbox is not listed in any state, and hostd still serves.
    states = [pb.SANDBOX_STATE_CREATING, pb.SANDBOX_STATE_RUNNING, pb.SANDBOX_STATE_PAUSED]
    assert h.list_all(states=states) == []
    assert h.fds() <= fds0 + 2, "hostd leaks file descriptors on a cancelled create"


def test_soak_create_command_kill(h: NetHostd) -> None:
    fds: list[int] = []
    for i in range(ROUNDS):
        s = h.create(template="base", memory_mb=MEMORY_MB, metadata={"round": str(i)})
        assert h.alive(), h.log_tail()
        code, out, err = h.run(s, "echo hi; ip -4 -o addr show eth0 | wc -l")
        assert (code, out.split()) == (0, ["hi", "1"]), (code, out, err)
        # By name through the sandbox's resolver and NAT to the fake internet.
        code, out, err = h.run(s, "curl -sS -m 20 http://allowed.test/", 60)
        assert code == 0 and out.startswith(f"inet {HOSTS['allowed.test']} /"), (code, out, err)
        h.kill(s.sandbox_id)
        with pytest.raises(grpc.RpcError) as e:
            h.sandboxes.Get(pb.GetRequest(sandbox_id=s.sandbox_id), metadata=h.md())
        assert e.value.code() is grpc.StatusCode.NOT_FOUND
        _wait_clean(h, 30)
        assert h.alive(), h.log_tail()
        fds.append(h.fds())
    # Open descriptors do not grow round after round.
    assert max(fds) - min(fds) <= 4, fds


def _ns_table(h: NetHostd, sandbox_id: str) -> str:
    ns = f"{h.prefix}-{sandbox_id.removeprefix('sbx_')[:40]}"
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", h.prefix],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip


def test_hostd_kill9_reapplies_the_namespace_rules(h: NetHostd) -> None:
    """A namespace left with an older hostd's rules gets this hostd's after a
    kill -9 and restart (before: they stayed until the policy changed)."""
    s = h.create(template="base", memory_mb=MEMORY_MB,
                 network=pb.NetworkPolicy(deny_out=[HOSTS["other.test"] + "/32"]))
    try:
        ns = f"{h.prefix}-{s.sandbox_id.removeprefix('sbx_')[:40]}"
        t = h.prefix
        stale = (f"add table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n"
                 "  chain forward { type filter hook forward priority filter; policy accept; }\n"
                 "}\n")  # fmt: skip
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=stale, text=True,
                       check=True)  # fmt: skip
        assert "antispoof" not in _ns_table(h, s.sandbox_id)
        h.kill9()
        h.start(timeout=120)
        table = _ns_table(h, s.sandbox_id)
        assert "chain antispoof" in table and HOSTS["other.test"] in table, table
        code, out, err = h.run(s, "curl -sS -m 20 http://allowed.test/", 60)
        assert code == 0 and out.startswith(f"inet {HOSTS['allowed.test']} /"), (code, out, err)
        code, out, err = h.run(s, f"curl -sS -m 5 http://{HOSTS['other.test']}/", 60)
        assert code != 0, (code, out, err)  # the stored deny_out holds again
    finally:
        h.kill(s.sandbox_id)
    _wait_clean(h, 30)


def test_stop_during_create_releases_everything(fake_inet: None) -> None:
    """SIGTERM while a Create boots: hostd exits 0 once the Create has released all it took.

    Before the fix the store was closed under the Create's cleanup ("Cannot
    operate on a closed database") and its run dir stayed behind.
    """
    h = NetHostd()
    h.start(timeout=120)
    try:
        fut = h.sandboxes.Create.future(
            pb.CreateRequest(template="base", memory_mb=MEMORY_MB), metadata=h.md(), timeout=660
        )
        end = time.monotonic() + 300
        while not any((d / "console.log").exists() for d in _run_dirs(h)):
            assert not fut.done() and time.monotonic() < end, h.log_tail()
            time.sleep(0.02)
        assert h.proc is not None
        h.proc.send_signal(signal.SIGTERM)
        assert h.proc.wait(120) == 0, h.log_tail()
        with pytest.raises(grpc.RpcError) as e:
            fut.result()
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        h.proc = None
        log = h.log_tail(200000)
        assert "Traceback" not in log and "closed database" not in log, log
        # Right after the stop, before any restart could reconcile: nothing left.
        assert h.leftovers() == [], log
    finally:
        left = h.close()
        assert not left, left

"""A real hostd (real QEMU microVMs) for the SDK tests, one per session.

Reuses the hostd test framework (own state dir, socket, cgroup root, always
cleaned up). Networking is on, with names, address pool, proxy port and run
dir of its own so it never collides with another hostd on this machine.
The SDK finds it the way users' code does: MORU_HOSTD and MORU_API_KEY.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from hostd_framework import IMAGES, Hostd

API_KEY = "sdk-test-" + secrets.token_hex(8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(network: bool, **config: Any) -> Hostd:
    if not (IMAGES / "templates" / "base" / "manifest.json").is_file():
        pytest.fail(f"template 'base' is not built in {IMAGES}: run `moru-images build base`")
    h = Hostd(api_key=API_KEY, max_sandboxes=12, metrics_interval_seconds=1.0, **config)
    if network:
        h.network = {
            "enabled": True,
            # Own pool, veth and namespace names: a second hostd of this kind (another
            # test run on the machine) would otherwise take these for its orphans.
            "pool_cidr": f"10.231.{secrets.randbelow(256)}.0/24",
            "proxy_listen": f"127.0.0.1:{_free_port()}",
            "name_prefix": f"msdk{secrets.token_hex(2)}",
            "veth_prefix": f"ms{secrets.token_hex(1)}",
            "run_dir": str(h.root / "net"),
        }
    h.start(timeout=120)
    return h


def _close(h: Hostd, name: str) -> None:
    # Keep the daemon's log for post-mortems (the run dir is removed).
    with contextlib.suppress(OSError):
        shutil.copy(h.log, f"/tmp/moru-sdk-tests-{name}.log")
    left = h.close()
    # A stopped hostd keeps its host nft table on purpose (sandboxes outlive a
    # daemon restart); a test hostd is gone for good, so its table goes too.
    prefix = (getattr(h, "network", None) or {}).get("name_prefix")
    if prefix:
        subprocess.run(["nft", "delete", "table", "inet", prefix], capture_output=True)
    assert not left, f"{name} left behind: {left}"


@pytest.fixture(scope="session")
def hostd() -> Iterator[Hostd]:
    """The session's hostd (networking off); MORU_HOSTD points at it."""
    h = _start(network=False)
    try:
        with h.moru_env():
            yield h
    finally:
        _close(h, "hostd")


@pytest.fixture(scope="module")
def net_hostd(hostd: Hostd) -> Iterator[Hostd]:
    """A hostd with networking (own netns names, pool, proxy port, run dir).

    MORU_HOSTD points at it for the module's tests that use it.
    """
    h = _start(network=True)
    try:
        yield h
    finally:
        _close(h, "net-hostd")


@pytest.fixture
def use_net_hostd(net_hostd: Hostd) -> Iterator[Hostd]:
    with net_hostd.moru_env():
        yield net_hostd


@pytest.fixture(scope="session")
def shared_sandbox(hostd: Hostd) -> Iterator[object]:
    """One sandbox for the tests that only need *a* running sandbox."""
    from moru import Sandbox

    sbx = Sandbox.create(timeout=3 * 3600, metadata={"suite": "sdk-shared"})
    try:
        yield sbx
    finally:
        sbx.kill()

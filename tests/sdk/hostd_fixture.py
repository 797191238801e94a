"""A real hostd (real QEMU microVMs) for the SDK tests, one per session.

Reuses the hostd test framework (own state dir, socket, cgroup root, always
cleaned up). Networking is on, with names, address pool, proxy port and run
dir of its own so it never collides with another hostd on this machine.
The SDK finds it the way users' code does: MORU_HOSTD and MORU_API_KEY.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
from collections.abc import Iterator

import pytest
from hostd_framework import IMAGES, Hostd

API_KEY = "sdk-test-" + secrets.token_hex(8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def hostd() -> Iterator[Hostd]:
    if not (IMAGES / "templates" / "base" / "manifest.json").is_file():
        pytest.fail(f"template 'base' is not built in {IMAGES}: run `moru-images build base`")
    h = Hostd(api_key=API_KEY, max_sandboxes=12, metrics_interval_seconds=1.0)
    h.network = {
        "enabled": True,
        "pool_cidr": "10.231.0.0/16",
        "proxy_listen": f"127.0.0.1:{_free_port()}",
        "name_prefix": f"msdk{secrets.token_hex(1)[0]}",
        "veth_prefix": "msk",
        "run_dir": str(h.root / "net"),
    }
    old = {k: os.environ.get(k) for k in ("MORU_HOSTD", "MORU_API_KEY")}
    try:
        h.start(timeout=120)
        os.environ["MORU_HOSTD"] = f"unix:{h.sock}"
        os.environ["MORU_API_KEY"] = API_KEY
        yield h
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        # Keep the daemon's log for post-mortems (the run dir is removed).
        with contextlib.suppress(OSError):
            shutil.copy(h.log, "/tmp/moru-sdk-tests-hostd.log")
        left = h.close()
        assert not left, f"hostd left behind: {left}"


@pytest.fixture(scope="session")
def shared_sandbox(hostd: Hostd) -> Iterator[object]:
    """One sandbox for the tests that only need *a* running sandbox."""
    from moru import Sandbox

    sbx = Sandbox.create(metadata={"suite": "sdk-shared"})
    try:
        yield sbx
    finally:
        sbx.kill()

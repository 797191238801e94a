"""Fixtures for the fault suite: one real hostd (real QEMU microVMs) for the session.

Health checks run every second here so repairs are seen quickly; guestd may
stay silent for 60 s (a fork bomb keeps a TCG guest busy) before a sandbox
is marked error. The SDK finds hostd through MORU_HOSTD / MORU_API_KEY.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "hostd"))

from hostd_framework import IMAGES, Hostd  # noqa: E402

API_KEY = "faults-" + secrets.token_hex(8)


@pytest.fixture(scope="session")
def hostd() -> Iterator[Hostd]:
    if not (IMAGES / "templates" / "base" / "manifest.json").is_file():
        pytest.fail(f"template 'base' is not built in {IMAGES}: run `moru-images build base`")
    h = Hostd(api_key=API_KEY, max_sandboxes=8, health_interval_seconds=1.0,
              guest_unhealthy_seconds=60.0, error_kill_seconds=30.0)  # fmt: skip
    h.start(timeout=120)
    try:
        with h.moru_env():
            yield h
    finally:
        h.kill_all()
        with contextlib.suppress(OSError):  # kept for post-mortems (the run dir goes)
            shutil.copy(h.log, "/tmp/moru-faults-hostd.log")
        left = h.close()
        assert not left, f"left behind: {left}"

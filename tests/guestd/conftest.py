"""Fixtures: guestd subprocesses (shared, fresh, small-buffer) and short temp dirs."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest
from guestd_harness import Guestd, quiet_home

from moru_proto.guest.v1 import guest_pb2


@pytest.fixture(scope="session")
def guestd() -> Iterator[Guestd]:
    """Shared by tests that need no Init of their own (Init changes env and token for all)."""
    g = Guestd("--keepalive-seconds", "0.5")
    g.guest.Init(guest_pb2.InitRequest(env={"HOME": quiet_home(g)}))
    yield g
    g.close()


@pytest.fixture
def fresh_guestd() -> Iterator[Guestd]:
    g = Guestd("--keepalive-seconds", "0.5", env={"MORU_IMAGE_VAR": "image", "SHADOWED": "image"})
    yield g
    g.close()


@pytest.fixture
def small_buffer_guestd() -> Iterator[Guestd]:
    g = Guestd("--output-buffer-bytes", "65536")
    yield g
    g.close()


@pytest.fixture
def tmpdir_short() -> Iterator[str]:
    d = tempfile.mkdtemp(dir="/tmp", prefix="mt")
    yield d
    shutil.rmtree(d, ignore_errors=True)

"""Fixtures for SDK tests.

`guestd_address`: a REAL bare guestd (`python -m guestd`) on a unix socket,
started once per session. It ignores `sandbox-id`, so the SDK's guest layer
(commands, files) is tested against it without hostd or a VM.

`hostd` (in hostd_fixture.py): a real hostd booting real microVMs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moru_proto.guest.v1 import guest_pb2, guest_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
# The hostd test framework lives in tests/hostd (not a package), as its own tests import it.
sys.path.insert(0, str(REPO / "tests" / "hostd"))

from hostd_fixture import (  # noqa: E402, F401 - fixtures
    hostd,
    net_hostd,
    shared_sandbox,
    use_net_hostd,
)


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str, limit: float) -> None:
    """Polls (bounded) until `path` exists; fails with the process's output."""
    deadline = time.monotonic() + limit
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            proc.kill()
            pytest.fail(f"{what} did not come up (exit {proc.poll()}):\n{out[-4000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def guestd_address() -> Iterator[str]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="msdk"))
    sock = d / "g.sock"
    # A file, not a pipe nobody reads: a full pipe would block guestd's logging.
    log = (d / "guestd.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "guestd", "--listen", f"unix:{sock}"],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_socket(sock, proc, "guestd", 30)
        # An empty HOME for `bash -l`: root's login profile on these dev hosts
        # runs `pyenv rehash` (slow, with a global lock); guest images have none.
        home = d / "home"
        home.mkdir()
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            guest_pb2_grpc.GuestStub(ch).Init(
                guest_pb2.InitRequest(env={"HOME": str(home)}), timeout=30, wait_for_ready=True
            )
        yield f"unix:{sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def scratch() -> Iterator[str]:
    """A fresh directory the bare guestd (same machine) reads and writes."""
    d = tempfile.mkdtemp(dir="/tmp", prefix="msdkf")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)

"""A real guestd subprocess on a real unix socket, and sync gRPC stubs to it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moru_proto.guest.v1 import filesystem_pb2_grpc, guest_pb2, guest_pb2_grpc, process_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1)]


class Guestd:
    """One guestd process; `close()` ends it by pid and removes its directory."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.dir = tempfile.mkdtemp(dir="/tmp", prefix="mg")
        self.sock = f"{self.dir}/g.sock"
        self.target = f"unix:{self.sock}"
        self.log = open(f"{self.dir}/guestd.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "guestd", "--listen", self.target, *args],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self.process = process_pb2_grpc.ProcessStub(self.channel)
        self.fs = filesystem_pb2_grpc.FilesystemStub(self.channel)
        self.guest = guest_pb2_grpc.GuestStub(self.channel)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.guest.Health(guest_pb2.HealthRequest(), timeout=1)
                break
            except grpc.RpcError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"guestd did not start: {self.logs()}") from None
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        return Path(f"{self.dir}/guestd.log").read_text(errors="replace")

    def vm_hwm_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def close(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def quiet_home(g: Guestd) -> str:
    """An empty HOME for `bash -l` commands: root's login profile on the dev
    hosts runs `pyenv rehash` (seconds, and a global lock); a guest image has
    no such profile. Tests that check the passwd defaults use `sh -c` instead."""
    home = f"{g.dir}/home"
    os.makedirs(home, exist_ok=True)
    return home


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

"""Test harness: a real guestd subprocess on a real unix socket, sync gRPC stubs to it,
and helpers that run commands and collect their events."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from moru_proto.guest.v1 import filesystem_pb2_grpc, guest_pb2, guest_pb2_grpc, process_pb2_grpc
from moru_proto.guest.v1 import process_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1)]
_IGNORING_TRAMPOLINE = (
    "import os,signal,sys\n"
    "[signal.signal(int(s), signal.SIG_IGN) for s in sys.argv[1].split(',')]\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class Guestd:
    """One guestd process; `close()` ends it by pid and removes its directory."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 ignored_signals: tuple[int, ...] = (), data_listener: bool = False,
                 prefix: tuple[str, ...] = ()) -> None:
        self.dir = tempfile.mkdtemp(dir="/tmp", prefix="mg")
        self.sock = f"{self.dir}/g.sock"
        self.target = f"unix:{self.sock}"
        self.data_target = f"unix:{self.dir}/data.sock" if data_listener else ""
        self.log = open(f"{self.dir}/guestd.log", "wb")
        command = [sys.executable, "-m", "guestd", "--listen", self.target, *args]
        if data_listener:
            command += ["--data-listen", self.data_target]
        if ignored_signals:  # as under nohup or `guestd &`: SIG_IGN survives exec
            command = [sys.executable, "-c", _IGNORING_TRAMPOLINE,
                       ",".join(map(str, ignored_signals)), *command]
        self.proc = subprocess.Popen(
            [*prefix, *command],  # prefix: a wrapper that execs the rest (same pid)
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

@dataclass
class Result:
    pid: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    pty: bytes = b""
    order: list[tuple[str, bytes]] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    keepalives: int = 0
    end: pb.EndEvent | None = None


def collect(events: Iterable[pb.ProcessEvent]) -> Result:
    r = Result()
    for ev in events:
        kind = ev.WhichOneof("event")
        if kind == "start":
            r.pid = ev.start.pid
        elif kind == "data":
            which = str(ev.data.WhichOneof("output"))
            data = getattr(ev.data, which)
            setattr(r, which, getattr(r, which) + data)
            r.order.append((which, data))
        elif kind == "dropped":
            for k in ("stdout", "stderr", "pty"):
                r.dropped[k] = r.dropped.get(k, 0) + getattr(ev.dropped, f"{k}_bytes")
        elif kind == "keepalive":
            r.keepalives += 1
        elif kind == "end":
            r.end = ev.end
    return r


def shell(cmd: str, **kw: object) -> pb.StartRequest:
    cfg = {k: kw.pop(k) for k in ("env", "cwd", "user") if k in kw}
    return pb.StartRequest(config=pb.ProcessConfig(shell=cmd, **cfg), **kw)  # type: ignore[arg-type]


def argv(*args: str, **kw: object) -> pb.StartRequest:
    cfg = {k: kw.pop(k) for k in ("env", "cwd", "user") if k in kw}
    return pb.StartRequest(config=pb.ProcessConfig(argv=list(args), **cfg), **kw)  # type: ignore[arg-type]

"""A real hostd for tests: its own state dir, socket and cgroup root; always cleaned up.

`Hostd` runs `moru-hostd serve` as a child process (so tests can kill -9 it
and start it again), waits for its sd_notify READY=1 on a socket the test
owns, and talks to it over gRPC like any client. `check_clean()` proves
nothing was left behind: no process mentioning its state dir, no sandbox
cgroup, no run dir or socket.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from hostd.rundir import SHM_DIR, RunDir
from moru_proto.guest.v1 import guest_pb2, guest_pb2_grpc, process_pb2, process_pb2_grpc
from moru_proto.host.v1 import sandbox_pb2 as pb
from moru_proto.host.v1 import sandbox_pb2_grpc, template_pb2_grpc

VENV_BIN = Path("/opt/moru/venv/bin")
IMAGES = Path(os.environ.get("MORU_IMAGES_DIR", "/var/lib/moru/images"))
CGROUP_FS = Path("/sys/fs/cgroup")


def our_pids(marker: str) -> list[int]:
    """PIDs whose command line mentions `marker` (our unique temp dir): only ours."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmd:
            out.append(int(d.name))
    return out


def cgroup_dirs(root_name: str) -> list[Path]:
    """Our cgroup root in each hierarchy (v1: one per controller; v2: one)."""
    found = [p for p in CGROUP_FS.glob(f"*/{root_name}") if p.is_dir()]
    if (CGROUP_FS / root_name).is_dir():
        found.append(CGROUP_FS / root_name)
    return found


class Hostd:
    def __init__(self, *, api_key: str = "", **config: Any) -> None:
        self.root = Path(tempfile.mkdtemp(dir="/tmp", prefix="mh"))
        self.sock = self.root / "h.sock"
        self.state = self.root / "s"
        self.cgroup_root = f"moru-t{secrets.token_hex(3)}"
        self.api_key = api_key
        self.config: dict[str, Any] = {
            "listen": f"unix:{self.sock}",
            "state_dir": str(self.state),
            "images_dir": str(IMAGES),
            "cgroup_root": self.cgroup_root,
            "metrics_interval_seconds": 1.0,
            "create_deadline_seconds": 600.0,
            "log_level": "info",
            **config,
        }
        if api_key:
            self.config["api_key"] = api_key
        self.network: dict[str, Any] = {"enabled": False}
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None
        self.log = self.root / "hostd.log"

    # -- process ------------------------------------------------------------

    def _write_config(self) -> Path:
        def val(v: Any) -> str:
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, int | float):
                return repr(v)
            if isinstance(v, dict):  # an inline table, e.g. warm_pool = {base = 2}
                return "{" + ", ".join(f"{val(str(k))} = {val(x)}" for k, x in v.items()) + "}"
            return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

        lines = [f"{k} = {val(v)}" for k, v in self.config.items()]
        lines.append("[network]")
        lines += [f"{k} = {val(v)}" for k, v in self.network.items()]
        path = self.root / "hostd.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 60.0) -> float:
        """Starts hostd; returns seconds until it notified READY=1."""
        cfg = self._write_config()
        notify = self.root / "n.sock"
        with contextlib.suppress(FileNotFoundError):
            notify.unlink()
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ns.bind(str(notify))
        ns.settimeout(0.5)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MORU_")}
        env["NOTIFY_SOCKET"] = str(notify)
        t0 = time.monotonic()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "moru-hostd"), "--config", str(cfg), "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            while time.monotonic() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"hostd exited ({self.proc.returncode}):\n{self.log_tail()}")
                try:
                    if b"READY=1" in ns.recv(4096):
                        return time.monotonic() - t0
                except TimeoutError:
                    continue
            raise TimeoutError(f"hostd not ready in {timeout} s:\n{self.log_tail()}")
        finally:
            ns.close()
            notify.unlink()

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(30)
        self.proc = None

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    # -- clients ------------------------------------------------------------

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(
                f"unix:{self.sock}", options=[("grpc.max_receive_message_length", -1)]
            )
        return self._channel

    @property
    def sandboxes(self) -> sandbox_pb2_grpc.SandboxServiceStub:
        return sandbox_pb2_grpc.SandboxServiceStub(self.channel)

    @property
    def templates(self) -> template_pb2_grpc.TemplateServiceStub:
        return template_pb2_grpc.TemplateServiceStub(self.channel)

    @property
    def process(self) -> process_pb2_grpc.ProcessStub:
        return process_pb2_grpc.ProcessStub(self.channel)

    @property
    def guest(self) -> guest_pb2_grpc.GuestStub:
        return guest_pb2_grpc.GuestStub(self.channel)

    @contextlib.contextmanager
    def moru_env(self) -> Iterator[None]:
        """Points MORU_HOSTD / MORU_API_KEY at this hostd, as a user's environment would."""
        old = {k: os.environ.get(k) for k in ("MORU_HOSTD", "MORU_API_KEY")}
        os.environ["MORU_HOSTD"] = f"unix:{self.sock}"
        os.environ["MORU_API_KEY"] = self.api_key
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def md(
        self, sbx: pb.SandboxInfo | None = None, token: str | None = None
    ) -> tuple[tuple[str, str], ...]:
        out: list[tuple[str, str]] = []
        if self.api_key:
            out.append(("authorization", f"Bearer {self.api_key}"))
        if sbx is not None:
            out.append(("sandbox-id", sbx.sandbox_id))
            tok = sbx.access_token if token is None else token
            if tok:
                out.append(("x-moru-access-token", tok))
        return tuple(out)

    def create(self, **kw: Any) -> pb.SandboxInfo:
        try:
            info: pb.SandboxInfo = self.sandboxes.Create(
                pb.CreateRequest(**kw), metadata=self.md(), timeout=660
            )
        except grpc.RpcError:
            print(f"--- hostd log ({self.log}) ---\n{self.log_tail(6000)}")  # shown on failure
            raise
        return info

    def kill(self, sandbox_id: str) -> None:
        self.sandboxes.Kill(pb.KillRequest(sandbox_id=sandbox_id), metadata=self.md(), timeout=30)

    def run(
        self, sbx: pb.SandboxInfo, shell: str, timeout: float = 60, token: str | None = None
    ) -> tuple[int, str, str]:
        """Runs a shell command in the sandbox through hostd: (exit code, stdout, stderr)."""
        req = process_pb2.StartRequest(
            config=process_pb2.ProcessConfig(shell=shell), timeout_seconds=timeout
        )
        out: list[bytes] = []
        err: list[bytes] = []
        code: int | None = None
        for ev in self.process.Start(req, metadata=self.md(sbx, token), timeout=timeout + 10):
            kind = ev.WhichOneof("event")
            if kind == "data":
                which = ev.data.WhichOneof("output")
                (out if which == "stdout" else err).append(getattr(ev.data, which or "stdout"))
            elif kind == "end":
                code = ev.end.exit_code if ev.end.exited else 128 + ev.end.signal
        assert code is not None, "no end event"
        return code, b"".join(out).decode(), b"".join(err).decode()

    def list_all(self, **kw: Any) -> list[pb.SandboxInfo]:
        resp = self.sandboxes.List(pb.ListRequest(page_size=1000, **kw), metadata=self.md())
        return list(resp.sandboxes)

    # -- cleanup ------------------------------------------------------------

    def sandbox_cgroups(self) -> list[Path]:
        return [d for root in cgroup_dirs(self.cgroup_root) for d in root.iterdir() if d.is_dir()]

    def kill_all(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        live = [pb.SANDBOX_STATE_RUNNING, pb.SANDBOX_STATE_PAUSED, pb.SANDBOX_STATE_ERROR]
        for s in self.list_all(states=live):
            with contextlib.suppress(grpc.RpcError):
                self.kill(s.sandbox_id)

    def check_clean(self) -> list[str]:
        """What is left of sandboxes (processes, cgroups, run dirs, sockets); [] when clean."""
        left = []
        pids = [p for p in our_pids(str(self.state)) if not self.proc or p != self.proc.pid]
        if pids:
            left.append(f"processes {pids}")
        if self.sandbox_cgroups():
            left.append(f"cgroups {self.sandbox_cgroups()}")
        sdir = self.state / "sandboxes"
        if sdir.is_dir() and any(sdir.iterdir()):
            left.append(f"run dirs {list(sdir.iterdir())}")
        socks = [p for p in self.state.rglob("*") if p.is_socket()]
        if socks:
            left.append(f"sockets {socks}")
        if self.ram_files():
            left.append(f"guest RAM files {self.ram_files()}")
        return left

    def ram_files(self) -> list[Path]:
        """Guest RAM files in /dev/shm of this hostd's sandboxes (RunDir.ram)."""
        sdir = self.state / "sandboxes"
        return [p for p in SHM_DIR.glob("moru-*.ram")
                if RunDir(sdir / p.name[5:].rsplit("-", 1)[0]).ram == p]  # fmt: skip

    def close(self) -> list[str]:
        """Kills every sandbox, stops hostd, reports leftovers, then removes everything."""
        try:
            self.kill_all()
        finally:
            self.stop()
        left = self.check_clean()
        # Everything under our temp dir (state, and a test's network run dir: dnsmasq).
        for pid in our_pids(str(self.root)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for root in cgroup_dirs(self.cgroup_root):
            for d in sorted(root.glob("**/"), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    d.rmdir()
        for p in self.ram_files():
            p.unlink(missing_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)
        return left


class EventWatcher:
    """Collects WatchEvents in a thread while the `with` block runs."""

    def __init__(self, h: Hostd, sandbox_id: str = "") -> None:
        self.events: list[pb.SandboxEvent] = []
        self._call = h.sandboxes.WatchEvents(
            pb.WatchEventsRequest(sandbox_id=sandbox_id), metadata=h.md()
        )
        self._thread = threading.Thread(target=self._pump, daemon=True)

    def _pump(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for ev in self._call:
                self.events.append(ev)

    def __enter__(self) -> EventWatcher:
        self._thread.start()
        time.sleep(0.2)  # the stream is subscribed before anything happens
        return self

    def __exit__(self, *exc: object) -> None:
        self._call.cancel()  # type: ignore[no-untyped-call]
        self._thread.join(5)

    def wait(self, sandbox_id: str, type_: int, timeout: float) -> pb.SandboxEvent:
        def find() -> pb.SandboxEvent | None:
            for ev in self.events:
                if ev.sandbox_id == sandbox_id and ev.type == type_:
                    return ev
            return None

        ev: pb.SandboxEvent = wait_for(find, timeout, what=f"event {type_} of {sandbox_id}")
        return ev


@contextlib.contextmanager
def running_hostd(**kw: Any) -> Iterator[Hostd]:
    h = Hostd(**kw)
    try:
        h.start()
        yield h
    finally:
        left = h.close()
        assert not left, f"left behind: {left}"


def wait_for(pred: Any, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout} s")
        time.sleep(interval)


__all__ = ["EventWatcher", "Hostd", "guest_pb2", "pb", "running_hostd", "wait_for"]

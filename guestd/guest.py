"""The Guest servicer: Init (identity, env, token; hostname/clock/entropy as the
guest's agent), Health, GetMetrics, GetInfo and Shutdown."""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import socket
import time

from google.protobuf.timestamp_pb2 import Timestamp

from guestd import __version__
from guestd.errors import FailedPrecondition, InvalidArgument
from guestd.metrics import Metrics
from guestd.rpc_types import Ctx
from guestd.state import GuestState
from moru_proto.guest.v1 import guest_pb2 as pb
from moru_proto.guest.v1 import guest_pb2_grpc


def _os_release() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return ""


def _mix_entropy(data: bytes) -> None:
    """Writing to /dev/urandom mixes bytes into the pool (without crediting them)."""
    with open("/dev/urandom", "wb") as f:
        f.write(data)


def _uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except OSError:
        return 0.0


def set_hostname(name: str) -> None:
    """Kernel hostname, /etc/hostname and a /etc/hosts line for it."""
    socket.sethostname(name)
    with open("/etc/hostname", "w") as f:
        f.write(name + "\n")
    try:
        with open("/etc/hosts") as f:
            lines = [ln for ln in f.read().splitlines() if not ln.startswith("127.0.1.1")]
    except FileNotFoundError:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines.append(f"127.0.1.1\t{name}")
    with open("/etc/hosts", "w") as f:
        f.write("\n".join(lines) + "\n")


class GuestService(guest_pb2_grpc.GuestServicer):
    def __init__(self, state: GuestState, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics

    async def Init(self, request: pb.InitRequest, context: Ctx,
                   ) -> pb.InitResponse:
        s = self.state
        if request.hostname and not all(c.isalnum() or c in "-." for c in request.hostname):
            raise InvalidArgument(f"hostname: invalid host name {request.hostname!r}")
        if s.guest_mode:
            if request.hostname:
                set_hostname(request.hostname)
            if request.HasField("wall_clock"):
                time.clock_settime(time.CLOCK_REALTIME, request.wall_clock.ToNanoseconds() / 1e9)
            if request.entropy:
                _mix_entropy(request.entropy)
        s.env = dict(request.env)
        s.sandbox_id = request.sandbox_id
        s.template_id = request.template_id
        s.hostname = request.hostname or socket.gethostname()
        s.access_token = request.access_token
        s.initialized = True
        return pb.InitResponse()

    async def Health(self, request: pb.HealthRequest, context: Ctx,
                     ) -> pb.HealthResponse:
        return pb.HealthResponse(ok=True, initialized=self.state.initialized)

    async def GetMetrics(self, request: pb.GetMetricsRequest, context: Ctx,
                         ) -> pb.Metrics:
        m = await self.metrics.sample()
        ts = Timestamp()
        ts.GetCurrentTime()
        return pb.Metrics(timestamp=ts, cpu_count=m.cpu_count, cpu_used_pct=m.cpu_used_pct,
                          mem_total=m.mem_total, mem_used=m.mem_used,
                          disk_total=m.disk_total, disk_used=m.disk_used)

    async def GetInfo(self, request: pb.GetInfoRequest, context: Ctx,
                      ) -> pb.GetInfoResponse:
        uptime = _uptime() or time.monotonic() - self.state.started_monotonic
        s = self.state
        return pb.GetInfoResponse(
            guestd_version=__version__, kernel_release=platform.release(),
            os_release=_os_release(), python_version=platform.python_version(),
            uptime_seconds=uptime, sandbox_id=s.sandbox_id, template_id=s.template_id,
            initialized=s.initialized, hostname=s.hostname or socket.gethostname())

    async def Shutdown(self, request: pb.ShutdownRequest, context: Ctx,
                       ) -> pb.ShutdownResponse:
        if not self.state.guest_mode:
            raise FailedPrecondition("guestd is not running as the guest's agent (--guest)")
        await asyncio.to_thread(os.sync)
        # busybox init convention, honoured by moru's init: USR2 powers off, TERM reboots.
        sig = signal.SIGTERM if request.reboot else signal.SIGUSR2
        asyncio.get_running_loop().call_later(0.2, os.kill, 1, sig)
        return pb.ShutdownResponse()

"""The Guest servicer: Init (identity, env, token; hostname/clock/entropy as the
guest's agent), Health, GetMetrics, GetInfo and Shutdown."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import re
import signal
import socket
import struct
import sys
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


# <linux/random.h> ioctls (need CAP_SYS_ADMIN): RNDADDENTROPY = _IOW('R', 0x03, int[2])
# mixes bytes in AND credits them; RNDRESEEDCRNG reseeds the CRNG from the pool now.
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
IFACE = "eth0"
# An Init at least this long is logged at INFO (DEBUG otherwise): the console is slow.
SLOW_INIT_MS = 50.0
log = logging.getLogger("guestd.guest")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def _mix_entropy(data: bytes) -> None:
    """Mixes host-provided random bytes into the input pool, credited, then reseeds the CRNG.

    Clones of one snapshot (a ready snapshot, a warm pool member) start with
    the same CRNG state. A plain write to /dev/urandom mixes without credit and
    does not reach the CRNG until its next scheduled reseed, so clones would
    read the same bytes meanwhile. Crediting (the host's bytes come from its
    own CRNG) also makes a CRNG that was not ready yet ready, where
    RNDRESEEDCRNG alone fails with ENODATA.
    """
    fd = os.open("/dev/urandom", os.O_WRONLY)
    try:
        info = struct.pack("ii", len(data) * 8, len(data)) + data
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        try:
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        except OSError as e:
            # ENODATA: not ready even so (cannot happen after a credited add); the
            # add itself reseeds a CRNG it makes ready.
            if e.errno != errno.ENODATA:
                raise
    finally:
        os.close(fd)


def check_network(net: pb.NetworkConfig) -> None:
    """INVALID_ARGUMENT naming the field for anything malformed."""
    import ipaddress  # only restored clones get a network through Init: not at boot

    try:
        iface = ipaddress.ip_interface(net.address)
    except ValueError:
        raise InvalidArgument(
            f"network.address: {net.address!r} is not an address with a prefix (10.0.0.2/30)"
        ) from None
    if "/" not in net.address:
        raise InvalidArgument(f"network.address: {net.address!r} has no prefix length")
    for name, value in (("gateway", net.gateway), ("dns", net.dns)):
        if value:
            try:
                addr = ipaddress.ip_address(value)
            except ValueError:
                raise InvalidArgument(f"network.{name}: {value!r} is not an IP address") from None
            if name == "gateway" and addr.version != iface.version:
                raise InvalidArgument(f"network.gateway: {value!r} is not an IPv{iface.version} "
                                      "address like network.address")
    if net.mac and not _MAC.match(net.mac):
        raise InvalidArgument(f"network.mac: {net.mac!r} is not a MAC like 02:00:00:00:00:01")


def _iface_mac() -> str | None:
    """eth0's MAC (sysfs, no blocking to speak of); None while there is no eth0."""
    try:
        with open(f"/sys/class/net/{IFACE}/address") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _write_resolv(dns: str) -> None:
    tmp = "/etc/resolv.conf.moru-tmp"
    with open(tmp, "w") as f:
        f.write(f"nameserver {dns}\n")
    os.replace(tmp, "/etc/resolv.conf")


async def apply_network(net: pb.NetworkConfig) -> None:
    """What the guest init does with `moru.net=` at boot; idempotent (Init may come again)."""
    for _ in range(200):  # the device may still be probing right after a restore
        mac = _iface_mac()
        if mac is not None:
            break
        await asyncio.sleep(0.01)
    else:
        raise FailedPrecondition(f"network: the guest has no {IFACE} (no network device)")
    # Only restored clones get a network through Init: not imported at boot (ipaddress).
    from guestd import netconf

    try:
        # Netlink from guestd, not busybox `ip`: 5-6 processes cost a just-restored
        # TCG guest 250-400 ms of Init (guestd.netconf).
        netconf.configure(IFACE, net.address, net.gateway,
                          net.mac if net.mac and net.mac != mac else "")  # fmt: skip
    except OSError as e:
        raise FailedPrecondition(f"network: {e.strerror or e}") from None
    if net.dns:
        _write_resolv(net.dns)


def _uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except OSError:
        return 0.0


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _write_text(path: str, text: str) -> None:
    """Only when it differs: a rewrite on ext4 queues writeback, and a claim's
    Init usually sets the name the member already has."""
    if _read_text(path) != text:
        with open(path, "w") as f:
            f.write(text)


def set_hostname(name: str) -> None:
    """Kernel hostname, /etc/hostname and a /etc/hosts line for it (each only if it changes)."""
    if socket.gethostname() != name:
        socket.sethostname(name)
    _write_text("/etc/hostname", name + "\n")
    hosts = _read_text("/etc/hosts")
    if hosts is None:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    else:
        lines = [ln for ln in hosts.splitlines() if not ln.startswith("127.0.1.1")]
    lines.append(f"127.0.1.1\t{name}")
    _write_text("/etc/hosts", "\n".join(lines) + "\n")


class _Steps:
    """How long each Init step took, for one log line (the claim path is timed by it)."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.parts: list[str] = []

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.parts.append(f"{name} {(now - self.last) * 1000:.1f}")
        self.last = now

    def log(self, sandbox_id: str) -> None:
        total = (time.perf_counter() - self.t0) * 1000
        log.log(logging.INFO if total >= SLOW_INIT_MS else logging.DEBUG,
                "Init %s took %.1f ms (%s)", sandbox_id, total, ", ".join(self.parts) or "-")


class GuestService(guest_pb2_grpc.GuestServicer):
    def __init__(self, state: GuestState, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics

    async def Init(self, request: pb.InitRequest, context: Ctx,
                   ) -> pb.InitResponse:
        s = self.state
        if request.hostname and not all(c.isalnum() or c in "-." for c in request.hostname):
            raise InvalidArgument(f"hostname: invalid host name {request.hostname!r}")
        if request.HasField("network"):
            check_network(request.network)
        steps = _Steps()
        if s.guest_mode:
            if request.hostname:
                set_hostname(request.hostname)
                steps.done("hostname")
            if request.HasField("wall_clock"):
                time.clock_settime(time.CLOCK_REALTIME, request.wall_clock.ToNanoseconds() / 1e9)
                steps.done("clock")
            if request.entropy:
                _mix_entropy(request.entropy)
                steps.done("entropy")
            if request.HasField("network"):
                await apply_network(request.network)
                steps.done("network")
        s.env = dict(request.env)
        s.sandbox_id = request.sandbox_id
        s.template_id = request.template_id
        s.hostname = request.hostname or socket.gethostname()
        s.access_token = request.access_token
        s.initialized = True
        steps.log(request.sandbox_id)
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
                          disk_total=m.disk_total, disk_used=m.disk_used,
                          initialized=self.state.initialized)

    async def GetInfo(self, request: pb.GetInfoRequest, context: Ctx,
                      ) -> pb.GetInfoResponse:
        uptime = _uptime() or time.monotonic() - self.state.started_monotonic
        s = self.state
        return pb.GetInfoResponse(
            guestd_version=__version__, kernel_release=os.uname().release,
            os_release=_os_release(), python_version=sys.version.split()[0],
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

"""hostd's own calls to a sandbox's guestd (Init, metrics, health) over its channel.

Client calls to Process/Filesystem do not come through here: they are
forwarded as raw bytes by `hostd.passthrough`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from moru_proto.guest.v1 import guest_pb2, guest_pb2_grpc

TOKEN_HEADER = "x-moru-access-token"
# Guest file chunks and process output can be large; never cap them here.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # A guestd that restarts (or a vsock backend hostd restarts) is back within
    # seconds: reconnect at most 2 s apart, not grpc's default of up to 120 s.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True)
class Sample:
    """One metrics sample: the guest's view plus the VMM's cgroup (host view)."""

    timestamp: float
    cpu_count: int
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    disk_used: int
    disk_total: int
    host_cpu_seconds: float = 0.0
    host_memory_bytes: int = 0
    # guestd said it is initialised: the sample doubles as a health check (hostd.health)
    guest_initialized: bool = False


def open_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


class GuestClient:
    def __init__(self, channel: grpc.aio.Channel, access_token: str) -> None:
        self._stub = guest_pb2_grpc.GuestStub(channel)
        self._md = ((TOKEN_HEADER, access_token),) if access_token else ()

    async def init(
        self,
        *,
        sandbox_id: str,
        template_id: str,
        hostname: str,
        env: dict[str, str],
        access_token: str,
        rpc_timeout: float,
        network: guest_pb2.NetworkConfig | None = None,
    ) -> None:
        """`network`: only for a guest whose kernel command line did not carry it (a restore)."""
        ts = Timestamp()
        ts.FromNanoseconds(time.time_ns())
        await self._stub.Init(
            guest_pb2.InitRequest(
                env=env,
                sandbox_id=sandbox_id,
                template_id=template_id,
                hostname=hostname,
                wall_clock=ts,
                access_token=access_token,
                entropy=os.urandom(64),
                network=network,
            ),
            metadata=self._md,
            timeout=rpc_timeout,
            wait_for_ready=True,
        )

    async def metrics(self, rpc_timeout: float = 3.0) -> Sample:
        m = await self._stub.GetMetrics(
            guest_pb2.GetMetricsRequest(), metadata=self._md, timeout=rpc_timeout
        )
        # Host time: the guest clock may drift and history queries use host time.
        ts = time.time()
        return Sample(
            timestamp=ts,
            cpu_count=m.cpu_count,
            cpu_used_pct=m.cpu_used_pct,
            mem_used=m.mem_used,
            mem_total=m.mem_total,
            disk_used=m.disk_used,
            disk_total=m.disk_total,
            guest_initialized=m.initialized,
        )

    async def health(
        self, rpc_timeout: float = 3.0, wait_for_ready: bool = False
    ) -> guest_pb2.HealthResponse:
        """ok, and whether guestd was initialised (false: a restarted guestd)."""
        r: guest_pb2.HealthResponse = await self._stub.Health(
            guest_pb2.HealthRequest(), metadata=self._md, timeout=rpc_timeout,
            wait_for_ready=wait_for_ready,
        )
        return r

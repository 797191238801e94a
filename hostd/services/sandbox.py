"""moru.host.v1.SandboxService: message conversion only; logic is in hostd.sandboxes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from hostd.errors import InvalidArgument
from hostd.events import Event
from hostd.guest import Sample
from hostd.operations import Operations
from hostd.sandboxes import CreateOptions, SandboxManager
from hostd.state import State
from hostd.store import SandboxRecord
from moru_proto.host.v1 import sandbox_pb2 as pb
from moru_proto.host.v1 import sandbox_pb2_grpc

Ctx = Any

STATE_TO_PB = {
    State.CREATING: pb.SANDBOX_STATE_CREATING,
    State.RUNNING: pb.SANDBOX_STATE_RUNNING,
    State.PAUSED: pb.SANDBOX_STATE_PAUSED,
    State.TERMINATED: pb.SANDBOX_STATE_TERMINATED,
    State.ERROR: pb.SANDBOX_STATE_ERROR,
}
PB_TO_STATE = {v: k for k, v in STATE_TO_PB.items()}


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def info(rec: SandboxRecord) -> pb.SandboxInfo:
    end_at = rec.end_at
    if rec.state is State.PAUSED:
        # The clock is stopped: show when it would end if resumed now.
        import time

        end_at = time.time() + rec.paused_remaining
    return pb.SandboxInfo(
        sandbox_id=rec.sandbox_id,
        template_id=rec.template_id,
        metadata=rec.metadata,
        state=STATE_TO_PB[rec.state],
        started_at=ts(rec.started_at),
        end_at=ts(end_at),
        cpu_count=rec.vcpus,
        memory_mb=rec.memory_mb,
        disk_mb=rec.disk_mb,
        access_token=rec.access_token,
        traffic_token=rec.traffic_token,
        allow_internet_access=rec.allow_internet_access,
        network=pb.NetworkPolicy(
            allow_out=rec.allow_out,
            deny_out=rec.deny_out,
            allow_public_traffic=rec.allow_public_traffic,
        ),
        volume_id=rec.volume_id,
        volume_mount_path=rec.volume_mount_path,
        secure=rec.secure,
        guest_ip=str(rec.network.get("guest_ip", "")),
        error=rec.error,
    )


def metric(s: Sample) -> pb.SandboxMetric:
    return pb.SandboxMetric(
        timestamp=ts(s.timestamp),
        cpu_count=s.cpu_count,
        cpu_used_pct=s.cpu_used_pct,
        mem_used=s.mem_used,
        mem_total=s.mem_total,
        disk_used=s.disk_used,
        disk_total=s.disk_total,
    )


def event(ev: Event) -> pb.SandboxEvent:
    return pb.SandboxEvent(
        time=ts(ev.time),
        sandbox_id=ev.sandbox_id,
        type=ev.type.value,  # type: ignore[arg-type]
        reason=ev.reason.value,  # type: ignore[arg-type]
        template_id=ev.template_id,
        message=ev.message,
    )


class SandboxService(sandbox_pb2_grpc.SandboxServiceServicer):
    def __init__(self, mgr: SandboxManager, ops: Operations | None = None) -> None:
        self.mgr = mgr
        # Create/Kill/Pause/Resume run here: a cancel cannot cut their cleanup short.
        self.ops = ops if ops is not None else Operations()

    async def Create(self, request: pb.CreateRequest, context: Ctx) -> pb.SandboxInfo:
        net = request.network
        rec = await self.ops.run(
            self.mgr.create(
                CreateOptions(
                    template=request.template,
                    timeout_seconds=request.timeout_seconds
                    if request.HasField("timeout_seconds")
                    else None,
                    metadata=dict(request.metadata),
                    envs=dict(request.envs),
                    allow_internet_access=(
                        request.allow_internet_access
                        if request.HasField("allow_internet_access")
                        else True
                    ),
                    allow_out=list(net.allow_out),
                    deny_out=list(net.deny_out),
                    allow_public_traffic=(
                        net.allow_public_traffic if net.HasField("allow_public_traffic") else True
                    ),
                    secure=request.secure if request.HasField("secure") else True,
                    volume_id=request.volume_id,
                    volume_mount_path=request.volume_mount_path,
                    vcpus=request.vcpus,
                    memory_mb=request.memory_mb,
                    disk_mb=request.disk_mb,
                )
            )
        )
        return info(rec)

    async def Get(self, request: pb.GetRequest, context: Ctx) -> pb.SandboxInfo:
        return info(self.mgr.get(request.sandbox_id))

    async def List(self, request: pb.ListRequest, context: Ctx) -> pb.ListResponse:
        unknown = [s for s in request.states if s not in PB_TO_STATE]
        if unknown:
            known = ", ".join(str(k) for k in sorted(PB_TO_STATE))
            raise InvalidArgument("states", f"unknown state value {unknown[0]}; one of {known}")
        states = [PB_TO_STATE[s] for s in request.states]
        recs, nxt = self.mgr.list_page(
            dict(request.metadata), states, request.page_size, request.page_token
        )
        return pb.ListResponse(sandboxes=[info(r) for r in recs], next_page_token=nxt)

    async def SetTimeout(self, request: pb.SetTimeoutRequest, context: Ctx) -> pb.SandboxInfo:
        return info(await self.mgr.set_timeout(request.sandbox_id, request.timeout_seconds))

    async def Kill(self, request: pb.KillRequest, context: Ctx) -> pb.KillResponse:
        await self.ops.run(self.mgr.kill(request.sandbox_id))
        return pb.KillResponse()

    async def Pause(self, request: pb.PauseRequest, context: Ctx) -> pb.SandboxInfo:
        return info(await self.ops.run(self.mgr.pause(request.sandbox_id)))

    async def Resume(self, request: pb.ResumeRequest, context: Ctx) -> pb.SandboxInfo:
        t = request.timeout_seconds if request.HasField("timeout_seconds") else None
        return info(await self.ops.run(self.mgr.resume(request.sandbox_id, t)))

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: Ctx
    ) -> pb.GetMetricsResponse:
        start = request.start.ToNanoseconds() / 1e9 if request.HasField("start") else None
        end = request.end.ToNanoseconds() / 1e9 if request.HasField("end") else None
        return pb.GetMetricsResponse(
            metrics=[metric(s) for s in self.mgr.metrics(request.sandbox_id, start, end)]
        )

    async def GetHost(self, request: pb.GetHostRequest, context: Ctx) -> pb.GetHostResponse:
        host, url = self.mgr.host(request.sandbox_id, request.port)
        return pb.GetHostResponse(host=host, url=url)

    async def SetNetwork(self, request: pb.SetNetworkRequest, context: Ctx) -> pb.SandboxInfo:
        has_net = request.HasField("network")
        net = request.network
        rec = await self.mgr.set_network(
            request.sandbox_id,
            request.allow_internet_access if request.HasField("allow_internet_access") else None,
            list(net.allow_out) if has_net else None,
            list(net.deny_out) if has_net else None,
            net.allow_public_traffic if has_net and net.HasField("allow_public_traffic") else None,
        )
        return info(rec)

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Ctx
    ) -> AsyncIterator[pb.SandboxEvent]:
        async with self.mgr.bus.subscribe(request.sandbox_id) as sub:
            async for ev in sub:
                yield event(ev)

    async def GetConsoleLog(
        self, request: pb.GetConsoleLogRequest, context: Ctx
    ) -> pb.GetConsoleLogResponse:
        return pb.GetConsoleLogResponse(
            data=self.mgr.console_log(request.sandbox_id, request.tail_bytes)
        )

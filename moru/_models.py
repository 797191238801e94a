"""The SDK's result and info types: plain frozen dataclasses built from protos.

Units follow the spec: seconds, MB for memory_mb, bytes for metrics, and
timezone-aware UTC datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from google.protobuf.timestamp_pb2 import Timestamp

from moru_proto.guest.v1 import filesystem_pb2 as fs_pb
from moru_proto.guest.v1 import process_pb2 as proc_pb
from moru_proto.host.v1 import sandbox_pb2 as sb_pb
from moru_proto.host.v1 import template_pb2 as tpl_pb
from moru_proto.host.v1 import volume_pb2 as vol_pb

SandboxState = Literal["creating", "running", "paused", "terminated", "error", "unknown"]
FileType = Literal["file", "dir", "symlink", "other"]

_STATES: dict[int, SandboxState] = {
    sb_pb.SANDBOX_STATE_CREATING: "creating",
    sb_pb.SANDBOX_STATE_RUNNING: "running",
    sb_pb.SANDBOX_STATE_PAUSED: "paused",
    sb_pb.SANDBOX_STATE_TERMINATED: "terminated",
    sb_pb.SANDBOX_STATE_ERROR: "error",
}
STATE_VALUES: dict[str, int] = {v: k for k, v in _STATES.items()}

_FILE_TYPES: dict[int, FileType] = {
    fs_pb.FILE_TYPE_FILE: "file",
    fs_pb.FILE_TYPE_DIRECTORY: "dir",
    fs_pb.FILE_TYPE_SYMLINK: "symlink",
}

_EVENT_TYPES = {
    fs_pb.EVENT_TYPE_CREATE: "create",
    fs_pb.EVENT_TYPE_WRITE: "write",
    fs_pb.EVENT_TYPE_REMOVE: "remove",
    fs_pb.EVENT_TYPE_RENAME: "rename",
    fs_pb.EVENT_TYPE_CHMOD: "chmod",
}


def to_datetime(ts: Timestamp) -> datetime:
    """A protobuf Timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)


@dataclass(frozen=True)
class NetworkPolicy:
    """Egress policy: allow/deny lists of CIDRs, IPs or domain names."""

    allow_out: list[str] = field(default_factory=list)
    deny_out: list[str] = field(default_factory=list)
    allow_public_traffic: bool = True


@dataclass(frozen=True)
class SandboxInfo:
    """What hostd knows about a sandbox (`Sandbox.get_info()`, `Sandbox.list()`)."""

    sandbox_id: str
    template_id: str
    metadata: dict[str, str]
    state: SandboxState
    started_at: datetime
    end_at: datetime
    cpu_count: int
    memory_mb: int
    disk_mb: int
    allow_internet_access: bool
    secure: bool
    network: NetworkPolicy | None
    volume_id: str | None
    volume_mount_path: str | None
    guest_ip: str | None
    # Why the sandbox is in state "error" (hostd found it dead and could not repair it).
    error: str | None = None

    @classmethod
    def from_proto(cls, m: sb_pb.SandboxInfo) -> SandboxInfo:
        net = None
        if m.HasField("network"):
            n = m.network
            net = NetworkPolicy(
                list(n.allow_out),
                list(n.deny_out),
                n.allow_public_traffic if n.HasField("allow_public_traffic") else True,
            )
        return cls(
            sandbox_id=m.sandbox_id,
            template_id=m.template_id,
            metadata=dict(m.metadata),
            state=_STATES.get(m.state, "unknown"),
            started_at=to_datetime(m.started_at),
            end_at=to_datetime(m.end_at),
            cpu_count=m.cpu_count,
            memory_mb=m.memory_mb,
            disk_mb=m.disk_mb,
            allow_internet_access=m.allow_internet_access,
            secure=m.secure,
            network=net,
            volume_id=m.volume_id or None,
            volume_mount_path=m.volume_mount_path or None,
            guest_ip=m.guest_ip or None,
            error=m.error or None,
        )


@dataclass(frozen=True)
class SandboxMetrics:
    """One sample of a sandbox's resource use; memory and disk in bytes."""

    timestamp: datetime
    cpu_count: int
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    disk_used: int
    disk_total: int

    @classmethod
    def from_proto(cls, m: sb_pb.SandboxMetric) -> SandboxMetrics:
        return cls(
            to_datetime(m.timestamp),
            m.cpu_count,
            m.cpu_used_pct,
            m.mem_used,
            m.mem_total,
            m.disk_used,
            m.disk_total,
        )


@dataclass(frozen=True)
class TemplateInfo:
    """A template built on the node (`moru template list`)."""

    template_id: str
    content_hash: str
    kernel_version: str
    vcpus: int
    memory_mb: int
    disk_mb: int
    rootfs_bytes: int
    built_at: datetime

    @classmethod
    def from_proto(cls, m: tpl_pb.TemplateInfo) -> TemplateInfo:
        return cls(
            m.template_id,
            m.content_hash,
            m.kernel_version,
            m.vcpus,
            m.memory_mb,
            m.disk_mb,
            m.rootfs_bytes,
            to_datetime(m.built_at),
        )


@dataclass(frozen=True)
class CommandResult:
    """A finished command. `error` says why it did not exit normally, if so."""

    stdout: str
    stderr: str
    exit_code: int
    error: str | None = None


@dataclass(frozen=True)
class ProcessInfo:
    """A process running in the sandbox (`commands.list()`)."""

    pid: int
    tag: str | None
    cmd: str
    args: list[str]
    envs: dict[str, str]
    cwd: str | None

    @classmethod
    def from_proto(cls, m: proc_pb.ProcessInfo) -> ProcessInfo:
        c = m.config
        if c.shell:
            cmd, args = "/bin/bash", ["-l", "-c", c.shell]
        else:
            cmd, args = (c.argv[0] if c.argv else ""), list(c.argv[1:])
        return cls(m.pid, m.tag or None, cmd, args, dict(c.env), c.cwd or None)


@dataclass(frozen=True)
class EntryInfo:
    """A file or directory in the sandbox."""

    name: str
    path: str
    type: FileType
    size: int
    mode: int
    owner: str
    group: str
    modified_time: datetime
    symlink_target: str | None

    @classmethod
    def from_proto(cls, m: fs_pb.EntryInfo) -> EntryInfo:
        return cls(
            m.name,
            m.path,
            _FILE_TYPES.get(m.type, "other"),
            m.size,
            m.mode,
            m.owner,
            m.group,
            to_datetime(m.modified_time),
            m.symlink_target or None,
        )


@dataclass(frozen=True)
class FilesystemEvent:
    """A change under a watched directory; `type` is create/write/remove/rename/chmod."""

    type: str
    path: str
    name: str

    @classmethod
    def from_proto(cls, m: fs_pb.FilesystemEvent) -> FilesystemEvent:
        return cls(_EVENT_TYPES.get(m.type, "unknown"), m.path, m.name)


@dataclass(frozen=True)
class PtySize:
    """A terminal's size in character cells (`sandbox.pty.create(PtySize(24, 80))`)."""

    rows: int
    cols: int


@dataclass(frozen=True)
class VolumeInfo:
    """A persistent disk on the node (`Volume.create()`); pass `volume_id` and a
    `volume_mount_path` to Sandbox.create to mount it."""

    volume_id: str
    name: str
    size_mb: int
    created_at: datetime
    attached_to: str | None  # the sandbox that has it mounted, None when free
    used_bytes: int  # what the sparse disk file really takes on the node

    @classmethod
    def from_proto(cls, m: vol_pb.VolumeInfo) -> VolumeInfo:
        return cls(
            m.volume_id,
            m.name,
            m.size_mb,
            to_datetime(m.created_at),
            m.attached_to or None,
            m.used_bytes,
        )

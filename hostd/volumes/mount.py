"""Mounting a sandbox's volume inside the guest, through guestd, right after Init.

Doing it from hostd (rather than from the guest init reading the kernel
command line) works with any image that runs guestd. The volume is the
first extra disk of the VM, so /dev/vdb; the mount is `sync`-free ext4 with
`noatime`, and the guest flushes it on shutdown or when the VM is paused to
disk (the snapshot keeps the page cache).
"""

from __future__ import annotations

import shlex

import grpc

from hostd.errors import MoruError
from moru_proto.guest.v1 import process_pb2, process_pb2_grpc

TOKEN_HEADER = "x-moru-access-token"
DEFAULT_DEVICE = "/dev/vdb"


class VolumeMountError(MoruError):
    """guestd could not mount the volume; the message carries the guest's stderr."""


def mount_script(mount_path: str, device: str = DEFAULT_DEVICE) -> str:
    """The guest shell command: wait briefly for the disk, then mount it at mount_path."""
    d, p = shlex.quote(device), shlex.quote(mount_path)
    return (
        f"i=0; while [ ! -b {d} ] && [ $i -lt 200 ]; do i=$((i+1)); sleep 0.01; done; "
        f"mkdir -p {p} && mount -t ext4 -o noatime {d} {p}"
    )


async def run_in_guest(
    channel: grpc.aio.Channel,
    script: str,
    *,
    access_token: str = "",
    timeout: float = 30.0,  # noqa: ASYNC109
) -> tuple[int, str]:
    """Exit code (-1 when killed) and output of `/bin/sh -c script` run by guestd."""
    stub = process_pb2_grpc.ProcessStub(channel)
    md = ((TOKEN_HEADER, access_token),) if access_token else ()
    req = process_pb2.StartRequest(config=process_pb2.ProcessConfig(argv=["/bin/sh", "-c", script]))
    out = bytearray()
    code = -1
    async for ev in stub.Start(req, metadata=md, timeout=timeout):
        kind = ev.WhichOneof("event")
        if kind == "data":
            out += ev.data.stdout or ev.data.stderr
        elif kind == "end":
            code = ev.end.exit_code if ev.end.exited else -1
    return code, out.decode(errors="replace")


async def mount_in_guest(
    channel: grpc.aio.Channel,
    mount_path: str,
    *,
    access_token: str = "",
    device: str = DEFAULT_DEVICE,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> None:
    """Mounts the volume through guestd; raises VolumeMountError on failure."""
    code, out = await run_in_guest(
        channel, mount_script(mount_path, device), access_token=access_token, timeout=timeout
    )
    if code != 0:
        raise VolumeMountError(
            f"mounting the volume at {mount_path} failed (exit {code}): {out.strip()[-500:]}"
        )

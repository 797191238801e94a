"""A sandbox as hostd holds it (record + live handles), and Create's inputs.

Leaf of the lifecycle modules: the manager, create, pause to disk and
re-attach all use these types, none of them is imported here.
"""

from __future__ import annotations

import asyncio
import secrets
import string
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hostd.guest import Sample
from hostd.network.policy import EgressPolicy
from hostd.resources import Resources
from hostd.rundir import RunDir
from hostd.store import SandboxRecord
from moru_proto.guest.v1 import guest_pb2

ID_ALPHABET = string.ascii_lowercase + string.digits
PIDS_MAX = 1024


def new_sandbox_id() -> str:
    return "sbx_" + "".join(secrets.choice(ID_ALPHABET) for _ in range(20))


@dataclass
class CreateOptions:
    """Create's inputs after the transport layer; 0/None mean "default"."""

    template: str = ""
    timeout_seconds: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    envs: dict[str, str] = field(default_factory=dict)
    allow_internet_access: bool = True
    allow_out: list[str] = field(default_factory=list)
    deny_out: list[str] = field(default_factory=list)
    allow_public_traffic: bool = True
    secure: bool = True
    volume_id: str = ""
    volume_mount_path: str = ""
    vcpus: int = 0
    memory_mb: int = 0
    disk_mb: int = 0


@dataclass
class Sandbox:
    """A sandbox hostd knows about: its durable record plus live handles."""

    rec: SandboxRecord
    res: Resources = field(default_factory=Resources)
    metrics: deque[Sample] = field(default_factory=deque)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    gone: bool = False
    # What Create is doing right now (named in its deadline error).
    stage: str = ""
    # How Create started the VM: "warm_pool", "ready_snapshot" or "cold_boot".
    create_path: str = ""
    # A warm pool member (hostd.pool_members): runs at the lowest CPU weight
    # until claimed, so preparing one never takes CPU from the node's sandboxes.
    background: bool = False
    # The end signal: set (with a short reason) on kill, expiry, VM death,
    # state error and pause; hostd.passthrough ends every open guest call on it.
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end_reason: str = ""

    def end(self, reason: str) -> None:
        """Ends every open guest call; `reason` is short ("killed", "paused", "error: why")."""
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()

    def reopen(self) -> None:
        """After a resume: calls from now on watch a fresh end signal."""
        self.ended = asyncio.Event()
        self.end_reason = ""

    @property
    def id(self) -> str:
        return self.rec.sandbox_id

    @property
    def files(self) -> RunDir:
        return RunDir(self.rec.run_dir)


def egress_policy(rec: SandboxRecord) -> EgressPolicy:
    return EgressPolicy(
        allow_internet_access=rec.allow_internet_access,
        allow_out=list(rec.allow_out),
        deny_out=list(rec.deny_out),
    )


def net_config(net: Any) -> guest_pb2.NetworkConfig:
    """What `moru.net=` (SandboxNetwork.kernel_args) gives a booting guest, for Init."""
    return guest_pb2.NetworkConfig(
        address=f"{net.guest_ip}/{net.prefix_len}", gateway=net.gateway, dns=net.dns, mac=net.mac
    )


def net_dict(net: Any) -> dict[str, Any]:
    """The network's own serialisation (what NetworkManager.attach takes back)."""
    to_dict = getattr(net, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else {}

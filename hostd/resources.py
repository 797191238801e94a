"""A sandbox's host resources and the node's capacity accounting.

`Resources.stack` is the cleanup stack Create filled (cgroup, network, VM,
relay, channel, store row...); releasing a sandbox is closing it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from hostd.config import Config
from hostd.errors import ResourceExhausted
from hostd.guest import open_channel
from hostd.rundir import RunDir
from hostd.store import SandboxRecord
from hostd.vmm.base import NetAttachment, Vm, VmSpec
from hostd.vsock import VsockRelay


def host_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


class Capacity:
    """Node limits: number of sandboxes and the sum of their guest memory."""

    def __init__(self, config: Config) -> None:
        self.max_sandboxes = config.max_sandboxes
        self.memory_budget_mb = config.memory_budget_mb or int(host_memory_mb() * 0.8)
        self._used: dict[str, int] = {}

    @property
    def count(self) -> int:
        return len(self._used)

    @property
    def memory_used_mb(self) -> int:
        return sum(self._used.values())

    def reserve(self, sandbox_id: str, memory_mb: int) -> None:
        """Atomic in asyncio (no await inside), so parallel creates never overbook."""
        if len(self._used) >= self.max_sandboxes:
            raise ResourceExhausted(
                f"node is full: {len(self._used)} of max_sandboxes={self.max_sandboxes} in use"
            )
        if self.memory_used_mb + memory_mb > self.memory_budget_mb:
            raise ResourceExhausted(
                f"node memory budget exhausted: {self.memory_used_mb} MB of"
                f" {self.memory_budget_mb} MB used, {memory_mb} MB asked"
            )
        self._used[sandbox_id] = memory_mb

    def add(self, sandbox_id: str, memory_mb: int) -> None:
        """Accounts for a re-attached sandbox even if it no longer fits the limits."""
        self._used[sandbox_id] = memory_mb

    def release(self, sandbox_id: str) -> None:
        self._used.pop(sandbox_id, None)

    def resize(self, sandbox_id: str, memory_mb: int) -> None:
        """Changes a sandbox's memory (0 while paused to disk); ResourceExhausted if over budget."""
        others = self.memory_used_mb - self._used.get(sandbox_id, 0)
        if memory_mb and others + memory_mb > self.memory_budget_mb:
            raise ResourceExhausted(
                f"node memory budget exhausted: {others} MB of {self.memory_budget_mb} MB"
                f" used, {memory_mb} MB asked"
            )
        self._used[sandbox_id] = memory_mb


def vm_spec(rec: SandboxRecord, cgroup_procs_files: Any) -> VmSpec:
    net = rec.network
    attach = (
        NetAttachment(netns=str(net["netns"]), tap=str(net["tap"]), mac=str(net["mac"]))
        if net.get("netns")
        else None
    )
    return VmSpec(
        sandbox_id=rec.sandbox_id,
        kernel=Path(rec.kernel),
        initramfs=Path(rec.initramfs),
        rootfs=Path(rec.rootfs),
        run_dir=Path(rec.run_dir),
        vcpus=rec.vcpus,
        memory_mb=rec.memory_mb,
        disk_mb=rec.disk_mb,
        kernel_cmdline=rec.kernel_cmdline,
        net=attach,
        accel=rec.accel,
        cgroup_procs_files=tuple(Path(p) for p in cgroup_procs_files),
    )


@dataclass
class Resources:
    vm: Vm | None = None
    cgroup: Any = None
    relay: Any = None
    channel: grpc.aio.Channel | None = None
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    async def connect(self, vm: Vm, rec: SandboxRecord, stack: contextlib.AsyncExitStack) -> None:
        """Starts the vsock relay and opens the gRPC channel to guestd through it."""
        path = RunDir(rec.run_dir).relay_sock
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket from a hostd that died
        self.relay = VsockRelay(path, vm.vsock_uds, rec.guestd_port)
        await self.relay.start()
        stack.push_async_callback(self.relay.close)
        self.channel = open_channel(self.relay.target)
        stack.push_async_callback(self.channel.close, None)

    async def release(self) -> None:
        await self.stack.aclose()

    async def detach(self) -> None:
        """Drops hostd-side handles only (daemon shutdown); the VM keeps running."""
        if self.channel is not None:
            await self.channel.close(None)
        if self.relay is not None:
            await self.relay.close()
        self.stack.pop_all()

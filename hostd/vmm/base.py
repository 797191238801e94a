"""The VMM driver interface: what hostd needs from a virtual machine monitor.

QEMU microvm (`hostd/vmm/qemu.py`) implements it today; Firecracker on KVM
hosts can implement the same interface later. hostd never touches VMM
processes or sockets except through a `Vm`.

A VM's processes (the VMM and its vsock device) run in their own session so
they outlive a hostd restart; `attach` finds them again from `run_dir`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class NetAttachment:
    """A tap device inside a network namespace that the VMM should use."""

    netns: str  # name under /run/netns
    tap: str
    mac: str


@dataclass(frozen=True)
class VmSpec:
    sandbox_id: str
    kernel: Path
    initramfs: Path
    # Read-only base image; the VM writes to a copy-on-write overlay in run_dir.
    rootfs: Path
    # Per-sandbox directory owned by the VM: overlay disk, sockets, console
    # log, pid files. Removed by `destroy`.
    run_dir: Path
    vcpus: int
    memory_mb: int
    disk_mb: int
    kernel_cmdline: str
    guest_cid: int = 3
    net: NetAttachment | None = None
    # Extra raw disks (e.g. volumes), attached after the root disk in order:
    # /dev/vdb, /dev/vdc, ...
    extra_disks: tuple[Path, ...] = ()
    # "auto" picks KVM only where it is usable, else TCG.
    accel: str = "auto"
    # Absolute cgroup paths (one per controller hierarchy, or one on v2) the
    # VM's processes are moved into right after they start.
    cgroup_procs_files: tuple[Path, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)


class VmError(RuntimeError):
    """The VMM failed to start or to do what was asked; the message says why."""


class Vm(abc.ABC):
    """One running virtual machine."""

    spec: VmSpec

    @property
    @abc.abstractmethod
    def pids(self) -> list[int]:
        """The host processes of this VM (VMM first)."""

    @property
    @abc.abstractmethod
    def vsock_uds(self) -> Path:
        """Hybrid-vsock unix socket: connect, send `CONNECT <port>\\n`, read `OK ...`."""

    @property
    @abc.abstractmethod
    def console_log(self) -> Path:
        """The guest serial console, appended to as the guest writes."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Starts the VMM; returns once the VMM runs (not when the guest is ready)."""

    @abc.abstractmethod
    def is_alive(self) -> bool:
        """Whether the VMM process still runs."""

    def vsock_device_dead(self) -> bool:
        """Whether the vsock device is known to be dead for good (never answers again)."""
        return False

    def vsock_backend_alive(self) -> bool:
        """Whether the vsock device's backend process runs (True for a driver without one)."""
        return True

    async def restart_vsock_backend(self) -> None:
        """A fresh vsock backend, the device plugged in again; VmError where it cannot be."""
        raise VmError(f"{type(self).__name__} cannot restart its vsock backend")

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stops the vCPUs in place; memory stays allocated."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Continues vCPUs stopped by `pause`."""

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Kills every process of the VM, waits for them and removes run_dir.

        Safe to call more than once and on a VM that never started.
        """

    def console_tail(self, nbytes: int = 4096) -> str:
        try:
            with self.console_log.open("rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - nbytes))
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


class Vmm(abc.ABC):
    """A VMM backend: creates VMs and re-attaches to ones left running."""

    name: str

    @abc.abstractmethod
    def create(self, spec: VmSpec) -> Vm:
        """A VM for spec, not yet started."""

    @abc.abstractmethod
    async def attach(self, spec: VmSpec) -> Vm:
        """The already-running VM of spec (after a hostd restart).

        Raises VmError when its processes are gone; the caller then destroys it.
        """

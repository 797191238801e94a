"""The VMM driver interface: what hostd needs from a virtual machine monitor.

QEMU microvm (`hostd/vmm/qemu/`) implements it today; Firecracker on KVM
hosts can implement the same interface later. hostd never touches VMM
processes or sockets except through a `Vm`, and never asks which driver a
VM comes from: what a driver can do beyond the basics is a capability here
(`can_save`, `save`, `give_back`, `Vmm.restore`, the vsock health methods),
as Firecracker keeps `persist` beside `builder`.

A VM's processes (the VMM and its vsock device) run in their own session so
they outlive a hostd restart; `attach` finds them again from `run_dir`.

A snapshot (pause to disk, ready snapshot) is a file of device state plus
the files `hostd.rundir.snapshot_meta` / `snapshot_ram` name beside it.
"""

from __future__ import annotations

import abc
import asyncio
import json
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
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


class AttachError(VmError):
    """attach found the VM dead or half dead; `.vm` holds what still runs, to destroy."""

    def __init__(self, message: str, vm: Vm) -> None:
        super().__init__(message)
        self.vm = vm


class SnapshotError(VmError):
    """A snapshot could not be taken or restored; the message says why."""


class SnapshotNotFound(SnapshotError):
    """No snapshot at the path (never taken, or deleted)."""


class SnapshotCorrupt(SnapshotError):
    """The snapshot file is truncated, damaged or does not match the VM spec."""


class NotEnoughDisk(SnapshotError):
    """The disk holding the snapshot has less free space than the guest's memory."""


SNAPSHOT_FORMAT = 2  # 1: RAM inside the state stream; 2: RAM in a file beside it


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    size_bytes: int  # on disk: state + RAM image (its allocated blocks)
    memory_mb: int
    vcpus: int
    created_at: float
    unplug_seconds: float
    save_seconds: float  # whole save, unplug and kill included
    format: int = SNAPSHOT_FORMAT
    state_bytes: int = 0  # format 2: the device-state file's length, as written

    def to_json(self) -> str:
        d = asdict(self)
        d["path"] = str(self.path)
        return json.dumps(d, sort_keys=True)


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

    @property
    def restore_steps(self) -> dict[str, float]:
        """Seconds per step of the restore that started this VM, in order (empty: booted)."""
        return {}

    # --- vsock health ----------------------------------------------------
    def vsock_device_dead(self) -> bool:
        """Whether the vsock device's worker is gone for good (it never answers again)."""
        return False

    def vsock_backend_alive(self) -> bool:
        """Whether the vsock device's host process (vhost-device-vsock) runs."""
        return self.is_alive()

    async def restart_vsock_backend(self) -> None:
        """A fresh vsock backend process, plugged in anew; VmError where the driver cannot."""
        raise VmError(f"VM {self.spec.sandbox_id}: this driver cannot restart its vsock device")

    # --- persistence capabilities ---------------------------------------
    @property
    def can_save(self) -> bool:
        """Whether `save` can work on this VM now (driver and device set allow it)."""
        return False

    @property
    def guest_eject_script(self) -> str:
        """A shell line the guest runs just before `save(guest_ejected=True)` (speeds it up)."""
        return ""

    async def save(self, dest: Path, *, guest_ejected: bool = False) -> SnapshotInfo:
        """Pause to disk: state to `dest` (and beside it), then the processes end.

        Raises NotEnoughDisk before touching the VM, SnapshotError with the VM
        given back running when saving fails. Nothing half-written is left.
        """
        raise SnapshotError(f"VM {self.spec.sandbox_id}: this driver cannot save VMs")

    async def give_back(self) -> None:
        """Undoes an interrupted pause: the VM runs again, with its vsock device."""
        raise VmError(f"VM {self.spec.sandbox_id}: this driver cannot pause to disk")

    async def stop(self) -> None:
        """Ends the VM's processes but keeps run_dir (its disk and any snapshot)."""
        raise VmError(f"VM {self.spec.sandbox_id}: this driver cannot stop without destroying")

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
    # Whether `restore` works (its VMs can be saved): ready snapshots need it.
    can_restore: bool = False

    @abc.abstractmethod
    def create(self, spec: VmSpec) -> Vm:
        """A VM for spec, not yet started."""

    @abc.abstractmethod
    async def attach(self, spec: VmSpec) -> Vm:
        """The already-running VM of spec (after a hostd restart).

        Raises AttachError (what still runs in `.vm`, to destroy) when its
        processes are gone.
        """

    async def stage_restore(
        self, spec: VmSpec, snapshot: Path, started: asyncio.Event | None = None
    ) -> None:
        """Puts in place ahead what `restore(spec, snapshot, staged=True)` reads (e.g. the
        guest RAM image), so the caller can do other work (the network) meanwhile.

        `started` is set as soon as `restore` may start the VMM (the files it
        opens exist), possibly long before this returns: `restore(...,
        staging=<this call>)` then awaits the rest after the VMM process runs.
        Only spec's run_dir, memory and cgroups count here. On failure or
        cancel nothing staged is left; after success `restore` or removing
        the run dir (`RunDir.remove`) releases it. Drivers with nothing to
        stage do nothing.
        """
        if started is not None:
            started.set()

    async def restore(
        self,
        spec: VmSpec,
        snapshot: Path,
        *,
        timeout: float = 600.0,  # noqa: ASYNC109
        staged: bool = False,
        staging: Awaitable[object] | None = None,
    ) -> Vm:
        """The VM saved at `snapshot`, running, with a fresh vsock device.

        spec.run_dir must hold the disk overlay the VM was saved with;
        `staged`: `stage_restore` ran for it, or runs still as `staging` (its
        `started` set), awaited once the VMM process runs. Raises SnapshotNotFound,
        SnapshotCorrupt or SnapshotError; on failure no process is left and
        run_dir is kept.
        """
        raise SnapshotError(f"the {self.name} driver cannot restore snapshots")

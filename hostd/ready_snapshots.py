"""Ready snapshots: a booted guest, saved while its guestd waits for Init, per template shape.

Create restores one (`ReadySnapshots.restore`) instead of booting
when the request has exactly the shape it was made with; Init then gives the
clone its identity (id, hostname, env, token, clock, entropy, network).

A snapshot is only valid for one *shape*: the template build (its content
hash and the files it names), the base kernel command line, vCPUs, memory,
disk size, whether the VM has a network device, the accelerator and
guestd's port. Its directory name carries a hash of all of that, so a
rebuilt template (new content hash) or a changed default never matches an
old snapshot; those are removed by the background loop.

Layout, under `<state_dir>/ready/`::

    <template>-<key>/         complete: mem.snap(.json, .ram), ovl.qcow2, ready.json
    .tmp-<template>-<key>-<r>/   being made (the maker VM's run dir inside)

A snapshot is made in a `.tmp-` directory and renamed into place only once
every file is written and synced, so a half-made one is never used; `.tmp-`
leftovers of a crash are removed at start (their VM's cgroup and network are
orphans that `Reattacher.remove_orphans` kills and removes first).

Disk: one snapshot per listed template (the defaults' shape), each about the
memory the booted guest touched (~200-300 MiB for a 256-1024 MiB guest)
plus a small overlay; a replaced one is deleted as soon as it is stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hostd.config import Config
from hostd.errors import ResourceExhausted
from hostd.guest import open_channel
from hostd.network.policy import EgressPolicy
from hostd.readiness import VmExited, wait_guestd
from hostd.resources import Capacity
from hostd.rundir import RunDir, partial
from hostd.vmm.base import SnapshotCorrupt, SnapshotInfo, Vm, Vmm, VmSpec
from hostd.vmm.snapfile import fsync_path, read_info
from hostd.vsock import VsockRelay
from images.manifest import TemplateManifest, TemplateNotFound
from moru_proto.guest.v1 import process_pb2, process_pb2_grpc

log = logging.getLogger("hostd.ready")

FORMAT = 2  # 2: RAM in its own file (a restore copies it instead of streaming it)
META = "ready.json"
SNAPSHOT = "mem.snap"  # + mem.snap.json, mem.snap.ram (hostd.rundir names them)
OVERLAY = "ovl.qcow2"
TMP_PREFIX = ".tmp-"
# Cgroup/network names of maker VMs (orphans after a crash are removed as any).
MAKER_PREFIX = "sbx_ready"
MAKER_RUN_DIR = "vm"  # inside the .tmp- directory
PIDS_MAX = 1024


@dataclass(frozen=True)
class Shape:
    """Everything a restored VM must have in common with the snapshot's VM."""

    template: str
    content_hash: str
    kernel: str
    initramfs: str
    rootfs: str
    cmdline: str
    vcpus: int
    memory_mb: int
    disk_mb: int
    net: bool
    accel: str
    guestd_port: int

    @property
    def key(self) -> str:
        text = json.dumps({**asdict(self), "format": FORMAT}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def dirname(self) -> str:
        return f"{self.template}-{self.key}"


def shape_of(
    manifest: TemplateManifest, vcpus: int, memory_mb: int, disk_mb: int, net: bool, accel: str
) -> Shape:
    return Shape(
        template=manifest.name,
        content_hash=manifest.content_hash,
        kernel=manifest.kernel,
        initramfs=manifest.initramfs,
        rootfs=manifest.rootfs,
        cmdline=manifest.kernel_cmdline,
        vcpus=vcpus,
        memory_mb=memory_mb,
        disk_mb=disk_mb,
        net=net,
        accel=accel,
        guestd_port=manifest.guestd_port,
    )


def initramfs_has_virtio_pci(path: Path) -> bool | None:
    """Whether an uncompressed newc initramfs carries virtio_pci.ko (None: cannot tell)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(b"070701"):
        return None
    return b"virtio_pci.ko" in data


class ReadySnapshots:
    """Finds, makes and prunes ready snapshots; `run()` keeps them current."""

    def __init__(
        self,
        config: Config,
        vmm: Vmm,
        cgroups: Any,
        network: Any | None,
        load_template: Callable[[str], TemplateManifest],
        capacity: Capacity | None = None,
    ) -> None:
        self.config = config
        # The node's accounting: the maker VM counts like a sandbox while it runs.
        self.capacity = capacity or Capacity(config)
        self.root = config.state_path / "ready"
        names = config.ready_snapshot_templates.split(",")
        self.templates = [t.strip() for t in names if t.strip()]
        self.vmm = vmm
        self.cgroups = cgroups
        self.network = network
        self._load_template = load_template
        self._in_use: dict[str, int] = {}
        # Shape dirnames whose making failed, and when to try again.
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    # -- lookups ----------------------------------------------------------

    def shape(self, manifest: TemplateManifest, vcpus: int, memory_mb: int, disk_mb: int) -> Shape:
        return shape_of(
            manifest, vcpus, memory_mb, disk_mb, self.network is not None, self.config.accel
        )

    def find(self, shape: Shape) -> Path | None:
        """The complete snapshot for shape, or None."""
        d = self.root / shape.dirname
        return d if (d / META).is_file() else None

    @contextlib.contextmanager
    def using(self, path: Path) -> Any:
        """Marks a snapshot in use (a restore reads it), so pruning leaves it alone."""
        self._in_use[path.name] = self._in_use.get(path.name, 0) + 1
        try:
            yield path
        finally:
            self._in_use[path.name] -= 1
            if not self._in_use[path.name]:
                del self._in_use[path.name]

    def snapshots(self) -> list[dict[str, Any]]:
        """The complete snapshots and what they were made for (for operators and tests)."""
        out = []
        if self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                with contextlib.suppress(OSError, ValueError):
                    out.append({"path": str(d), **json.loads((d / META).read_text())})
        return out

    # -- housekeeping -----------------------------------------------------

    def remove_partial(self) -> None:
        """At start: removes snapshots being made when hostd went away."""
        if not self.root.is_dir():
            return
        for d in self.root.iterdir():
            if d.name.startswith(TMP_PREFIX):
                log.warning("removing a ready snapshot that was not finished: %s", d)
                RunDir(d / MAKER_RUN_DIR).remove()  # the maker VM's RAM file is outside it
                shutil.rmtree(d, ignore_errors=True)

    def prune(self, keep: set[str]) -> list[str]:
        """Removes complete snapshots not named in keep (stale builds, dropped templates)."""
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        for d in self.root.iterdir():
            if d.name.startswith(TMP_PREFIX) or d.name in keep or d.name in self._in_use:
                continue
            # Renamed first: find() never sees a half-deleted dir.
            self.discard(d, "stale (template rebuilt, or no longer listed)")
            removed.append(d.name)
        return removed

    def discard(self, path: Path, why: str) -> None:
        """Removes a snapshot found damaged (a restore failed on it); `run()` makes a new one."""
        log.warning("discarding ready snapshot %s: %s", path.name, why)
        gone = self.root / f"{TMP_PREFIX}gone-{path.name}-{secrets.token_hex(3)}"
        with contextlib.suppress(OSError):
            path.rename(gone)
            shutil.rmtree(gone, ignore_errors=True)

    # -- background -------------------------------------------------------

    async def run(self) -> None:
        """Makes the listed templates' snapshots, re-makes them after rebuilds; until cancelled."""
        while True:
            try:
                await self.refresh()
            except Exception:  # never take hostd's other background loops down with it
                log.exception("refreshing ready snapshots failed")
            wait = self.config.ready_snapshot_check_seconds
            if self._retry_at:  # a failed make is retried on its own schedule
                wait = min(wait, max(1.0, min(self._retry_at.values()) - time.monotonic()))
            await asyncio.sleep(wait)

    async def refresh(self) -> list[Path]:
        """One pass: every listed template's default-shape snapshot exists, nothing stale."""
        wanted: list[tuple[Shape, TemplateManifest]] = []
        for name in self.templates:
            try:
                m = self._load_template(name)
            except TemplateNotFound as e:
                log.warning("no ready snapshot for %s: %s", name, e)
                continue
            d = m.defaults
            wanted.append((self.shape(m, d.vcpus, d.memory_mb, d.disk_mb), m))
        keep = {s.dirname for s, _ in wanted}
        self.prune(keep)
        for gone in set(self._retry_at) - keep:  # a retry of a stale shape is moot
            self._retry_at.pop(gone, None)
            self._failures.pop(gone, None)
        made = []
        for shape, m in wanted:
            path = self.find(shape)
            if path is None and time.monotonic() >= self._retry_at.get(shape.dirname, 0.0):
                path = await self._try_make(shape, m)
            if path is not None:
                made.append(path)
        return made

    async def _try_make(self, shape: Shape, manifest: TemplateManifest) -> Path | None:
        try:
            return await self.make(shape, manifest)
        except ResourceExhausted as e:  # sandboxes come first: try again at the next check
            self._retry_at[shape.dirname] = (
                time.monotonic() + self.config.ready_snapshot_check_seconds)
            log.info("ready snapshot of %s waits for room: %s", shape.template, e)
            return None
        except Exception as e:
            n = self._failures.get(shape.dirname, 0) + 1
            self._failures[shape.dirname] = n
            wait = min(1800.0, 60.0 * 2 ** (n - 1))
            self._retry_at[shape.dirname] = time.monotonic() + wait
            log.warning(
                "making the ready snapshot of %s failed (attempt %d, next in %.0f s): %s",
                shape.template, n, wait, e,
            )  # fmt: skip
            return None

    # -- making -----------------------------------------------------------

    async def make(self, shape: Shape, manifest: TemplateManifest) -> Path:
        """Boots the template with shape, waits for guestd, saves it; returns the snapshot dir."""
        if initramfs_has_virtio_pci(Path(shape.initramfs)) is False:
            raise RuntimeError(
                f"template {shape.template}'s initramfs has no virtio_pci module, which a ready "
                "snapshot's hot-plugged vsock device needs: rebuild the images"
            )
        t0 = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        tag = secrets.token_hex(4)
        tmp = self.root / f"{TMP_PREFIX}{shape.dirname}-{tag}"
        sid = f"{MAKER_PREFIX}{tag}"
        async with contextlib.AsyncExitStack() as stack:
            self.capacity.reserve(sid, shape.memory_mb)
            stack.callback(self.capacity.release, sid)
            stack.callback(shutil.rmtree, tmp, True)
            tmp.mkdir()
            cg = self.cgroups.create(sid, shape.vcpus, shape.memory_mb << 20, PIDS_MAX)
            stack.push_async_callback(cg.remove)
            attach = None
            if shape.net:
                assert self.network is not None
                # A device like every sandbox's; no address until a clone's Init, no egress.
                net = await self.network.setup(sid, EgressPolicy(allow_internet_access=False))
                stack.push_async_callback(self.network.teardown, sid)
                attach = net.attachment()
            spec = VmSpec(
                sandbox_id=sid,
                kernel=Path(shape.kernel),
                initramfs=Path(shape.initramfs),
                rootfs=Path(shape.rootfs),
                run_dir=tmp / MAKER_RUN_DIR,
                vcpus=shape.vcpus,
                memory_mb=shape.memory_mb,
                disk_mb=shape.disk_mb,
                kernel_cmdline=shape.cmdline,
                net=attach,
                accel=shape.accel,
                cgroup_procs_files=tuple(cg.procs_files),
            )
            vm = self.vmm.create(spec)
            stack.push_async_callback(vm.destroy)
            await vm.start()
            await self._wait_guestd(vm, shape)
            booted = time.monotonic() - t0
            if not vm.can_save:
                raise RuntimeError(f"the {self.vmm.name} driver cannot save this VM")
            # The guest powers its vsock slot off itself: QMP device_del waits for
            # pciehp's 5 s attention delay, which a loaded guest can stretch past 20 s.
            ejected = bool(vm.guest_eject_script)
            if ejected:
                await _run_in_guest(vm, shape.guestd_port, tmp / "g.sock",
                                    vm.guest_eject_script)  # fmt: skip
            out = tmp / "snap"
            info = await save_ready(vm, out, guest_ejected=ejected)
            meta = {
                "format": FORMAT,
                "shape": asdict(shape),
                "created_at": time.time(),
                "boot_seconds": round(booted, 2),
                "save_seconds": round(info.save_seconds, 2),
                "snapshot_bytes": info.size_bytes,
            }
            (out / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
            await asyncio.to_thread(_fsync_tree, out)
            final = self.root / shape.dirname
            try:
                os.rename(out, final)
            except OSError:
                if self.find(shape) is None:
                    raise
                # Another pass made it meanwhile: keep that one.
            await asyncio.to_thread(fsync_path, self.root)
        self._failures.pop(shape.dirname, None)
        self._retry_at.pop(shape.dirname, None)
        log.info(
            "ready snapshot of %s made in %.1f s (boot %.1f s, %d MiB): %s",
            shape.template, time.monotonic() - t0, booted, info.size_bytes >> 20, final.name,
        )  # fmt: skip
        return final

    async def stage(self, spec: VmSpec, ready: Path, started: asyncio.Event | None = None) -> None:
        """What a restore from `ready` reads, put in spec's run dir ahead (see `stage_ready`)."""
        await stage_ready(self.vmm, spec, ready, started)

    async def restore(self, spec: VmSpec, ready: Path, *, staged: bool = False,
                      staging: Awaitable[object] | None = None) -> Vm:  # fmt: skip
        """A new VM from the ready snapshot in `ready` (see `restore_ready`)."""
        return await restore_ready(self.vmm, spec, ready, staged=staged, staging=staging)

    async def _wait_guestd(self, vm: Vm, shape: Shape) -> None:
        """guestd's line on the console, then its vsock port (hostd.readiness, as Create)."""
        limit = self.config.ready_snapshot_boot_seconds
        try:
            await wait_guestd(vm, shape.guestd_port, time.monotonic() + limit, grace=limit)
        except VmExited as e:
            raise RuntimeError(f"{e}:\n{vm.console_tail(2048)}") from None
        except TimeoutError:
            raise TimeoutError(
                f"guestd did not start within {limit:.0f} s:\n{vm.console_tail(2048)}"
            ) from None


async def save_ready(vm: Vm, dest: Path, *, guest_ejected: bool = False) -> SnapshotInfo:
    """Saves a booted VM whose guestd waits for Init as a template's ready snapshot.

    dest gets the snapshot (`mem.snap` and its companions) and the VM's disk
    overlay; the VM's processes are gone afterwards and its run_dir is left
    to the caller to remove.
    """
    await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
    info = await vm.save(dest / SNAPSHOT, guest_ejected=guest_ejected)
    tmp = partial(dest / OVERLAY)
    await asyncio.to_thread(shutil.copyfile, RunDir(vm.spec.run_dir).overlay, tmp)
    os.replace(tmp, dest / OVERLAY)
    return info


async def stage_ready(
    vmm: Vmm, spec: VmSpec, ready: Path, started: asyncio.Event | None = None
) -> None:
    """The disk overlay and the guest RAM image of `ready` copied into spec's run dir
    (the RAM inside its cgroups), so that `restore_ready(..., staged=True)` starts the VMM
    at once; meanwhile the caller sets up the network. `started`: set once the VMM may
    start while the RAM is still copied (`Vmm.stage_restore`; pass this call as
    `restore_ready(..., staging=)`). On failure or cancel the copies are removed; after
    success `restore_ready` or `RunDir.remove` releases them."""
    snap = ready / SNAPSHOT
    read_info(snap)
    await _copy_overlay(spec, ready)
    await vmm.stage_restore(spec, snap, started)


async def restore_ready(vmm: Vmm, spec: VmSpec, ready: Path, *, staged: bool = False,
                        staging: Awaitable[object] | None = None) -> Vm:  # fmt: skip
    """A new VM (spec.run_dir is its own) started from the ready snapshot in `ready`.

    The snapshot's files are only read, so many sandboxes can start from it
    at once; each gets a copy of the snapshot's overlay (small: the
    template's rootfs stays the shared backing file), unless `staged`
    (`stage_ready` copied it and the RAM). The caller then sends
    Guest.Init with the sandbox's identity, env, fresh entropy and the wall
    clock. spec.kernel_cmdline does not reach the guest (it booted long ago).
    """
    snap = ready / SNAPSHOT
    read_info(snap)
    if not staged:
        await _copy_overlay(spec, ready)
    return await vmm.restore(spec, snap, staged=staged, staging=staging)


async def _copy_overlay(spec: VmSpec, ready: Path) -> None:
    """The snapshot's disk overlay, copied into spec's run dir (made if missing)."""
    overlay = ready / OVERLAY
    if not overlay.is_file():
        raise SnapshotCorrupt(f"ready snapshot {ready} has no disk overlay")
    await asyncio.to_thread(spec.run_dir.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(shutil.copyfile, overlay, RunDir(spec.run_dir).overlay)


async def _run_in_guest(vm: Vm, port: int, relay_path: Path, script: str) -> None:
    """Runs `/bin/sh -c script` through guestd (not initialized yet: no token)."""
    relay = VsockRelay(relay_path, vm.vsock_uds, port)
    await relay.start()
    try:
        ch = open_channel(relay.target)
        try:
            stub = process_pb2_grpc.ProcessStub(ch)
            req = process_pb2.StartRequest(
                config=process_pb2.ProcessConfig(argv=["/bin/sh", "-c", script])
            )
            code = None
            async for ev in stub.Start(req, timeout=120):
                if ev.WhichOneof("event") == "end":
                    code = ev.end.exit_code if ev.end.exited else -1
            if code != 0:
                raise RuntimeError(f"{script!r} in the guest ended with {code}")
        finally:
            await ch.close(None)
    finally:
        await relay.close()


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        fsync_path(f)
    fsync_path(path)


__all__ = ["ReadySnapshots", "Shape", "restore_ready", "save_ready", "shape_of", "stage_ready"]

"""Pause to disk and restore for QEMU microvm VMs (QEMU 7.2, TCG or KVM).

QEMU 7.2 refuses to migrate while a vhost-user vsock device is attached
("vhost-user backend lacks VHOST_USER_PROTOCOL_F_LOG_SHMFD"), and a
virtio-mmio device cannot be unplugged. So a VM that can be paused to disk
runs microvm with a PCIe bus (`pcie=on`) and its vsock device as
`vhost-user-vsock-pci` behind a `pcie-root-port`, which allows hot-unplug
(`PciQemuVm`; the guest needs the virtio_pci modules and `pcie_ports=native`
because microvm's ACPI tables have no _OSC granting native hotplug).

save(vm, path):
  1. unplug the vsock device: fastest when the guest powers its slot off
     itself (`EJECT_SCRIPT`, run through guestd: QEMU then drops the device at
     once); otherwise QMP device_del, which Linux' pciehp honours after its
     5 s attention-button delay;
  2. `stop`, `migrate` to `<path>.tmp` (RAM + device state; the disks are
     flushed by QEMU when migration completes), fsync, rename, write
     `<path>.json`;
  3. kill QEMU and vhost-device-vsock: the guest's memory is freed. The
     run_dir (overlay disk, console log) stays.
restore(vmm, spec, path):
  start a fresh vhost-device-vsock and QEMU with the same devices minus vsock
  and `-incoming`, wait for the migration to load, `cont`, and plug a fresh
  vsock device back in; the guest's pciehp probes it and guest listeners
  (guestd) accept again. Connections open at save time are reset, as with
  Firecracker snapshots. The guest clock is behind by the time spent paused:
  the caller re-sends Guest.Init (wall_clock) after restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shlex
import shutil
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hostd.vmm.base import VmError, VmSpec
from hostd.vmm.qemu import (
    SPEC,
    VHU_SOCK,
    VMM_ERR,
    AttachError,
    QemuVm,
    QemuVmm,
    _read_tail,
    spec_to_json,
)
from hostd.vmm.qmp import QmpClient, QmpError
from hostd.vmm.zeropages import release_guest_zero_pages

log = logging.getLogger("hostd.vmm.snapshot")

ROOT_PORT = "moru_rp0"
VSOCK_DEV = "moru_vsock0"
VSOCK_CHARDEV = "vs"
PCI_SLOT = 1
# After QEMU reports the re-plugged device started: time for vhost-device-vsock
# to take the ring set-up messages QEMU just sent, before anyone dials.
VHOST_SETTLE = 0.3
# Run in the guest (e.g. through guestd) just before save: powers the vsock
# slot off after a short delay, so the command's own reply gets out first.
EJECT_SCRIPT = f"(sleep 0.2; echo 0 > /sys/bus/pci/slots/{PCI_SLOT}/power) >/dev/null 2>&1 &"
PCI_KERNEL_ARGS = ("pcie_ports=native",)
QEMU_MAGIC = b"QEVM"
# Disk beyond guest RAM that a snapshot may need (device state, headroom).
DISK_MARGIN = 64 << 20
FORMAT = 1


class SnapshotError(VmError):
    """A snapshot could not be taken or restored; the message says why."""


class SnapshotNotFound(SnapshotError):
    """No snapshot at the path (never taken, or deleted)."""


class SnapshotCorrupt(SnapshotError):
    """The snapshot file is truncated, damaged or does not match the VM spec."""


class NotEnoughDisk(SnapshotError):
    """The disk holding the snapshot has less free space than the guest's memory."""


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    size_bytes: int
    memory_mb: int
    vcpus: int
    created_at: float
    unplug_seconds: float
    save_seconds: float  # whole save, unplug and kill included

    def to_json(self) -> str:
        d = asdict(self)
        d["path"] = str(self.path)
        d["format"] = FORMAT
        return json.dumps(d, sort_keys=True)


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def pci_argv(argv: list[str], *, incoming: Path | None = None) -> list[str]:
    """QemuVm's command line turned into the PCIe-vsock one (or the restore one).

    Idempotent, so qemu.py may apply it itself (spec.extra["vsock_transport"]).

        With `incoming`, the vsock chardev and device are left out (they are
        added over QMP once the state is loaded) and QEMU waits for the stream.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        val = argv[i + 1] if i + 1 < len(argv) else ""
        if a == "-machine" and val.startswith("microvm"):
            out += [a, val if "pcie=on" in val else f"{val},pcie=on,acpi=on"]
        elif a == "-append":
            extra = [k for k in PCI_KERNEL_ARGS if k not in val.split()]
            out += [a, " ".join([val, *extra])]
        elif a == "-chardev" and val.startswith(f"socket,id={VSOCK_CHARDEV},"):
            if incoming is None:
                out += [a, val]
        elif a == "-device" and val.startswith("vhost-user-vsock-pci"):
            # Already transformed (idempotent): keep unless restoring.
            if incoming is None:
                out += [a, val]
        elif a == "-device" and val.startswith("vhost-user-vsock-device"):
            out += [
                "-device",
                f"pcie-root-port,id={ROOT_PORT},bus=pcie.0,chassis=1,slot={PCI_SLOT}",
            ]
            if incoming is None:
                dev = f"vhost-user-vsock-pci,chardev={VSOCK_CHARDEV},id={VSOCK_DEV},bus={ROOT_PORT}"
                out += ["-device", dev]
        else:
            out.append(a)
            i += 1
            continue
        i += 2
    if incoming is not None:
        out += ["-incoming", f"exec:cat {shlex.quote(str(incoming))}"]
    return out


class PciQemuVm(QemuVm):
    """A QemuVm whose vsock device sits on a hot-pluggable PCIe port, so it can be saved."""

    def __init__(self, vmm: QemuVmm, spec: VmSpec, incoming: Path | None = None) -> None:
        super().__init__(vmm, spec)
        self.incoming = incoming

    def qemu_argv(self) -> list[str]:
        return pci_argv(super().qemu_argv(), incoming=self.incoming)

    async def restart_vsock_backend(self) -> None:
        await replace_vsock_backend(self)


class PciQemuVmm(QemuVmm):
    """QemuVmm making PciQemuVm VMs (what spec.extra["vsock_transport"] == "pci" would select)."""

    def create(self, spec: VmSpec) -> PciQemuVm:
        return PciQemuVm(self, spec)

    async def attach(self, spec: VmSpec) -> PciQemuVm:
        vm = PciQemuVm(self, spec)
        try:
            vm._adopt()
        except VmError as e:
            raise AttachError(str(e), vm) from None
        return vm


# --- save --------------------------------------------------------------------
async def _qmp(vm: QemuVm) -> QmpClient:
    try:
        return await QmpClient.connect(vm.qmp_sock)
    except QmpError as e:
        raise SnapshotError(f"VM {vm.spec.sandbox_id}: {e}") from e


async def _has_device(c: QmpClient, dev: str) -> bool:
    props = await c.execute("qom-list", {"path": "/machine/peripheral"})
    return any(p.get("name") == dev for p in props)


async def _wait_gone(c: QmpClient, dev: str, timeout: float) -> bool:  # noqa: ASYNC109
    end = time.monotonic() + timeout
    while await _has_device(c, dev):
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.02)
    return True


async def unplug_vsock(
    vm: QemuVm,
    *,
    guest_ejected: bool,
    timeout: float = 20.0,  # noqa: ASYNC109
    eject_wait: float = 15.0,
) -> None:
    """Removes the vsock device; quick if the guest ran EJECT_SCRIPT, else ~5 s (pciehp)."""
    c = await _qmp(vm)
    async with c:
        if not await _has_device(c, VSOCK_DEV):
            if guest_ejected:
                return
            raise SnapshotError(
                f"VM {vm.spec.sandbox_id} has no PCI vsock device {VSOCK_DEV!r}: "
                "it was not started for pause to disk (PciQemuVm)"
            )
        # A device_del while the guest is already powering the slot off would
        # leave the guest's pciehp mid-way (and ignoring the re-plug after
        # restore): give a loaded guest time before falling back to it.
        if guest_ejected and await _wait_gone(c, VSOCK_DEV, eject_wait):
            return
        with contextlib.suppress(QmpError):  # already being removed
            await c.execute("device_del", {"id": VSOCK_DEV})
        if not await _wait_gone(c, VSOCK_DEV, timeout):
            raise SnapshotError(
                f"VM {vm.spec.sandbox_id}: the guest did not release its vsock device "
                f"within {timeout:.0f}s (does the guest kernel have pciehp and virtio_pci?)"
            )


async def _replug_vsock(c: QmpClient, vm: QemuVm) -> str:
    """Plugs a vsock device in over a fresh vhost-user connection; returns the chardev id.

    On a QEMU that had the device (a failed save, a pause a dead hostd left),
    the old chardev's connection is useless ("vhost_get_features failed") and
    may still be held by the unplugged device, so it is removed, or left and
    a new id used.
    """
    chardev = VSOCK_CHARDEV
    try:
        await c.execute("chardev-remove", {"id": VSOCK_CHARDEV})
    except QmpError as e:
        if "not found" not in str(e):
            chardev = f"{VSOCK_CHARDEV}{secrets.token_hex(3)}"
    await c.execute(
        "chardev-add",
        {
            "id": chardev,
            "backend": {
                "type": "socket",
                "data": {
                    "addr": {"type": "unix", "data": {"path": str(vm.spec.run_dir / VHU_SOCK)}},
                    "server": False,
                },
            },
        },
    )
    await c.execute(
        "device_add",
        {"driver": "vhost-user-vsock-pci", "chardev": chardev, "id": VSOCK_DEV, "bus": ROOT_PORT},
    )
    return chardev


async def _migrate(c: QmpClient, uri: str, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
    # The default bandwidth cap (32 MiB/s) would make saving RAM slow for nothing.
    await c.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
    await c.execute("migrate", {"uri": uri})
    end = time.monotonic() + timeout
    while True:
        st: dict[str, Any] = await c.execute("query-migrate")
        if st.get("status") in ("completed", "failed", "cancelled"):
            return st
        if time.monotonic() > end:
            with contextlib.suppress(QmpError):
                await c.execute("migrate_cancel")
            return {"status": "failed", "error-desc": f"timed out after {timeout:.0f}s"}
        await asyncio.sleep(0.02)


def _bars_assigned(pci: list[dict[str, Any]], dev: str) -> bool | None:
    """Whether the guest gave dev's BARs addresses (it probed it); None: no such device."""
    for bus in pci:
        for d in bus.get("devices", []):
            for sub in [d, *d.get("pci_bridge", {}).get("devices", [])]:
                if sub.get("qdev_id") == dev:
                    regions = sub.get("regions", [])
                    return bool(regions) and all(0 < r["address"] < 1 << 63 for r in regions)
    return None


async def _ensure_probed(
    c: QmpClient, vm: QemuVm, wait: float, attempts: int = 3, chardev: str = VSOCK_CHARDEV
) -> None:
    """Waits for the guest to probe and start the re-plugged vsock device; re-plugs it if
    it missed it.

    Rarely (seen under heavy host load) the guest's pciehp misses the
    hot-add after a restore; unplugging the never-enabled device is
    immediate and a second hot-add is noticed. Returns only once the guest
    driver has started the device (QEMU set up the backend's rings): a dial
    before that ends vhost-device-vsock 0.3's worker for good
    (QemuVm.vsock_device_dead), and the callers dial right after.
    """
    for attempt in range(attempts):
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if _bars_assigned(await c.execute("query-pci"), VSOCK_DEV) and await _vhost_started(c):
                await asyncio.sleep(VHOST_SETTLE)
                return
            await asyncio.sleep(0.05)
        if attempt + 1 == attempts:
            break
        with contextlib.suppress(QmpError):
            await c.execute("device_del", {"id": VSOCK_DEV})
        if not await _wait_gone(c, VSOCK_DEV, 15.0):
            break
        await c.execute(
            "device_add",
            {"driver": "vhost-user-vsock-pci", "chardev": chardev, "id": VSOCK_DEV,
             "bus": ROOT_PORT},
        )  # fmt: skip
    raise SnapshotError(
        f"VM {vm.spec.sandbox_id}: the restored guest did not take the vsock device back "
        f"(after {attempts} hot-adds); its processes were ended: retry restore from the snapshot"
    )


async def _vhost_started(c: QmpClient) -> bool:
    """Whether the guest driver has started the vsock device (DRIVER_OK, backend rings set)."""
    try:
        st = await c.execute(
            "x-query-virtio-status", {"path": f"/machine/peripheral/{VSOCK_DEV}/virtio-backend"}
        )
    except QmpError:  # a QEMU without the query (< 7.2): the BARs are all there is to see
        return True
    return bool(st.get("vhost-started"))


def _has_magic(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == QEMU_MAGIC


def fsync_path(path: Path) -> None:
    """fsync of a file or directory by path (a directory: its entries are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _kill(vm: QemuVm) -> None:
    """Kills the VM's processes and waits for them, keeping run_dir (unlike destroy)."""
    procs = [p for p in (vm._vmm_proc, vm._vsk_proc) if p is not None]
    for p in procs:
        p.kill()
    for p in procs:
        if not await p.wait(10.0):
            raise SnapshotError(f"VM {vm.spec.sandbox_id}: {p.name} did not exit after SIGKILL")
    vm._vmm_proc = vm._vsk_proc = None


def check_disk(spec: VmSpec, path: Path) -> None:
    """Raises NotEnoughDisk when path's disk cannot hold a snapshot of spec's guest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    need = (spec.memory_mb << 20) + DISK_MARGIN
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise NotEnoughDisk(
            f"not enough disk for a snapshot of {spec.sandbox_id}: {path.parent} has "
            f"{free >> 20} MiB free, a {spec.memory_mb} MiB guest needs up to {need >> 20} MiB"
        )


def has_pci_vsock(vm: QemuVm) -> bool:
    """Whether vm's QEMU runs with the hot-pluggable vsock port (so it can be saved)."""
    p = vm._vmm_proc
    if p is None or not p.alive():
        return False
    try:
        argv = Path(f"/proc/{p.pid}/cmdline").read_bytes()
    except OSError:
        return False
    return f"id={ROOT_PORT},".encode() in argv


async def give_back(vm: QemuVm, eject_wait: float = 15.0) -> None:
    """Running again, with its vsock, a VM whose guest ran EJECT_SCRIPT but that was not saved."""
    c = await _qmp(vm)
    async with c:
        with contextlib.suppress(QmpError):  # a save a dead hostd left running
            await c.execute("migrate_cancel")
        with contextlib.suppress(QmpError):
            await c.execute("cont")
        # The guest powers the slot off a moment after the script ran.
        if await _wait_gone(c, VSOCK_DEV, eject_wait):
            # A fresh vhost-device-vsock: the old one may still serve the
            # connection of the unplugged device and never answer a new one.
            await restart_vsock_backend(vm)
            chardev = await _replug_vsock(c, vm)
            await _ensure_probed(c, vm, 30.0, chardev=chardev)
        else:
            # Present: never unplugged (the guest did not eject), or plugged back
            # by a hostd that died before the guest took it: make sure it has.
            await _ensure_probed(c, vm, 30.0, chardev=await _device_chardev(c))


async def _device_chardev(c: QmpClient) -> str:
    """The chardev id the vsock device was plugged in with (a give-back may have used a new one)."""
    try:
        got = await c.execute(
            "qom-get", {"path": f"/machine/peripheral/{VSOCK_DEV}", "property": "chardev"}
        )
    except QmpError:
        return VSOCK_CHARDEV
    return got if isinstance(got, str) and got else VSOCK_CHARDEV


def qemu_alive(vm: QemuVm) -> bool:
    """Whether vm's QEMU runs (its vhost-device-vsock may not)."""
    return vm._vmm_proc is not None and vm._vmm_proc.alive()


async def restart_vsock_backend(vm: QemuVm) -> None:
    """A fresh vhost-device-vsock for vm (the old one killed if it still runs)."""
    if vm._vsk_proc is not None:
        vm._vsk_proc.kill()
        if not await vm._vsk_proc.wait(10.0):
            raise SnapshotError(f"VM {vm.spec.sandbox_id}: vhost-device-vsock did not exit")
    await _spawn_vsock_backend(vm)


async def replace_vsock_backend(vm: QemuVm) -> None:
    """A running VM's vsock device on a fresh vhost-device-vsock: unplug, restart, plug in.

    For a backend that died (or lost its worker thread). The guest cannot
    eject the device itself (guestd is unreachable), so the unplug waits for
    pciehp (~5 s). Connections through the old device are gone; guestd's
    listener accepts again once the guest has probed the new device.
    """
    if not has_pci_vsock(vm):
        raise SnapshotError(f"VM {vm.spec.sandbox_id}: no hot-pluggable vsock device")
    await unplug_vsock(vm, guest_ejected=False)
    await restart_vsock_backend(vm)
    c = await _qmp(vm)
    async with c:
        chardev = await _replug_vsock(c, vm)
        await _ensure_probed(c, vm, 30.0, chardev=chardev)


async def _spawn_vsock_backend(vm: QemuVm) -> None:
    """Starts vhost-device-vsock for vm on fresh sockets; returns once both exist."""
    s = vm.spec
    for sock in (VHU_SOCK, vm.vsock_uds.name):
        (s.run_dir / sock).unlink(missing_ok=True)
    vm._vsk_proc = vm._spawn("vhost-device-vsock", vm.vsock_argv(), "vsk.err", "vsk.pid")
    await vm._wait_for(
        lambda: (s.run_dir / VHU_SOCK).exists() and vm.vsock_uds.exists(),
        vm._vsk_proc,
        "vhost-device-vsock sockets",
    )


async def stop(vm: QemuVm) -> None:
    """Kills the VM's processes, keeping its run_dir (and any snapshot in it)."""
    await _kill(vm)


async def save(
    vm: QemuVm,
    path: Path,
    *,
    guest_ejected: bool = False,
    timeout: float = 600.0,  # noqa: ASYNC109
) -> SnapshotInfo:
    """Saves the running VM's memory and devices to `path` and ends its processes.

    `guest_ejected`: the caller ran EJECT_SCRIPT in the guest just before
    (saves ~5 s). Raises NotEnoughDisk before touching the VM when the disk
    is short, SnapshotError (VM left running as it was) when saving fails.
    Nothing half-written is left at `path`.
    """
    t0 = time.monotonic()
    s = vm.spec
    check_disk(s, path)
    tmp = path.with_name(path.name + ".tmp")
    await unplug_vsock(vm, guest_ejected=guest_ejected)
    t_unplug = time.monotonic() - t0
    c = await _qmp(vm)
    async with c:
        try:
            await c.execute("stop")
            st = await _migrate(c, f"exec:cat > {shlex.quote(str(tmp))}", timeout)
            if st.get("status") != "completed":
                raise SnapshotError(
                    f"saving {s.sandbox_id} failed: {st.get('error-desc') or st.get('status')}"
                )
            await asyncio.to_thread(fsync_path, tmp)
            if not await asyncio.to_thread(_has_magic, tmp):
                raise SnapshotError(f"saving {s.sandbox_id}: QEMU wrote no valid stream to {tmp}")
        except BaseException:
            tmp.unlink(missing_ok=True)
            # Give the VM back as it was: running, with its vsock device (over a
            # fresh backend, see give_back).
            with contextlib.suppress(QmpError, OSError, VmError):
                await c.execute("cont")
                await restart_vsock_backend(vm)
                chardev = await _replug_vsock(c, vm)
                await _ensure_probed(c, vm, 30.0, chardev=chardev)
            raise
    size = (await asyncio.to_thread(os.stat, tmp)).st_size
    os.replace(tmp, path)
    info = SnapshotInfo(
        path=path,
        size_bytes=size,
        memory_mb=s.memory_mb,
        vcpus=s.vcpus,
        created_at=time.time(),
        unplug_seconds=t_unplug,
        save_seconds=time.monotonic() - t0,
    )
    # Complete (file + metadata) before the VM ends, so a caller that dies in
    # between finds either a running VM or a restorable snapshot.
    mtmp = meta_path(path).with_suffix(".tmp")
    mtmp.write_text(info.to_json())
    os.replace(mtmp, meta_path(path))
    await asyncio.to_thread(fsync_path, path.parent)
    # The snapshot stands from here: a cancel does not cut ending the VM short
    # (the caller then finds the VM gone and the snapshot complete).
    await _despite_cancel(_kill(vm))
    return dataclasses.replace(info, save_seconds=time.monotonic() - t0)


async def _despite_cancel(coro: Coroutine[Any, Any, None]) -> None:
    """Runs coro to its end even if the caller is cancelled (then re-raises the cancel)."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and task.cancelled():
                raise
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


# --- restore -----------------------------------------------------------------
def read_info(path: Path) -> SnapshotInfo:
    """The snapshot's metadata after basic integrity checks (exists, size, magic)."""
    if not path.is_file():
        raise SnapshotNotFound(f"no snapshot at {path}")
    try:
        d = json.loads(meta_path(path).read_text())
        if d.pop("format", None) != FORMAT:
            raise ValueError("unknown format")
        info = SnapshotInfo(**{**d, "path": Path(d["path"])})
    except FileNotFoundError:
        raise SnapshotCorrupt(f"snapshot {path} has no metadata ({meta_path(path).name})") from None
    except (ValueError, TypeError, KeyError) as e:
        raise SnapshotCorrupt(f"snapshot metadata {meta_path(path)} is unreadable: {e}") from e
    size = path.stat().st_size
    if size != info.size_bytes:
        raise SnapshotCorrupt(f"snapshot {path} is {size} bytes, {info.size_bytes} were written")
    if not _has_magic(path):
        raise SnapshotCorrupt(f"snapshot {path} is not a QEMU state stream")
    return info


async def restore(
    vmm: QemuVmm,
    spec: VmSpec,
    path: Path,
    *,
    timeout: float = 600.0,  # noqa: ASYNC109
    probe_wait: float = 30.0,
) -> PciQemuVm:
    """Starts the VM saved at `path` (same spec) and returns it running with a fresh vsock.

    The run_dir (overlay disk) must be the one the VM was saved with. Raises
    SnapshotNotFound, SnapshotCorrupt (bad file or spec mismatch; the VM's
    files are kept, its new processes killed) or SnapshotError.
    """
    info = read_info(path)
    if (info.memory_mb, info.vcpus) != (spec.memory_mb, spec.vcpus):
        raise SnapshotCorrupt(
            f"snapshot {path} is of a {info.vcpus}-vCPU {info.memory_mb} MiB VM, "
            f"the spec asks for {spec.vcpus} vCPUs and {spec.memory_mb} MiB"
        )
    vm = PciQemuVm(vmm, spec, incoming=path)
    try:
        await _start_incoming(vm, timeout)
        await _release_zero_pages(vm)
        c = await _qmp(vm)
        async with c:
            await c.execute("cont")
            chardev = await _replug_vsock(c, vm)
            await _ensure_probed(c, vm, probe_wait, chardev=chardev)
    except BaseException as e:
        err = _read_tail(spec.run_dir / VMM_ERR)
        with contextlib.suppress(SnapshotError):
            await _kill(vm)
        if isinstance(e, SnapshotError | asyncio.CancelledError):
            raise
        if isinstance(e, VmError | QmpError):
            raise SnapshotCorrupt(
                f"restoring {spec.sandbox_id} from {path} failed: {e}\n{err}"
            ) from e
        raise
    vm.incoming = None  # a later re-exec (e.g. by an operator) would boot normally
    return vm


async def _release_zero_pages(vm: QemuVm) -> None:
    """The loaded guest's all-zero pages back to the host, before it runs (zeropages.py)."""
    pid = vm._vmm_proc.pid if vm._vmm_proc is not None else None
    if pid is None:
        return
    t0 = time.monotonic()
    try:
        released = await asyncio.to_thread(release_guest_zero_pages, pid)
    except OSError as e:  # only memory left resident; the restore itself is fine
        log.warning("%s: zero pages not released: %s", vm.spec.sandbox_id, e)
        return
    log.info("%s: released %d MiB of zero guest pages in %.2f s",
             vm.spec.sandbox_id, released >> 20, time.monotonic() - t0)  # fmt: skip


async def _connect_retrying(vm: QemuVm, end: float) -> QmpClient:
    """QMP of a QEMU just started: the socket file exists a moment before it listens."""
    while True:
        try:
            return await QmpClient.connect(vm.qmp_sock)
        except QmpError as e:
            if not vm.is_alive():
                raise SnapshotCorrupt(
                    f"QEMU exited while loading snapshot: "
                    f"{_read_tail(vm.spec.run_dir / VMM_ERR).strip()}"
                ) from e
            if time.monotonic() > end:
                raise SnapshotError(f"VM {vm.spec.sandbox_id}: {e}") from e
            await asyncio.sleep(0.02)


async def _start_incoming(vm: PciQemuVm, timeout: float) -> None:  # noqa: ASYNC109
    s = vm.spec
    if not (s.run_dir / "ovl.qcow2").is_file():
        raise SnapshotCorrupt(f"the VM's disk overlay in {s.run_dir} is gone; cannot restore")
    vm._check_spec()
    # What `load_spec` (a later pause to disk, an operator) reads back.
    (s.run_dir / SPEC).write_text(spec_to_json(s))
    vm.qmp_sock.unlink(missing_ok=True)
    await _spawn_vsock_backend(vm)
    vm._vmm_proc = vm._spawn("qemu", vm.qemu_argv(), VMM_ERR, "vmm.pid")
    await vm._wait_for(vm.qmp_sock.exists, vm._vmm_proc, "the QMP socket")
    end = time.monotonic() + timeout
    c = await _connect_retrying(vm, end)
    async with c:
        while True:
            if not vm.is_alive():
                raise SnapshotCorrupt(
                    f"QEMU exited while loading snapshot {vm.incoming}: "
                    f"{_read_tail(s.run_dir / VMM_ERR).strip()}"
                )
            try:
                mig = await c.execute("query-migrate")
                status = await c.execute("query-status")
            except QmpError as e:
                raise SnapshotCorrupt(f"QEMU failed loading snapshot {vm.incoming}: {e}") from e
            if mig.get("status") == "failed":
                raise SnapshotCorrupt(f"loading snapshot {vm.incoming} failed: {mig}")
            if status.get("status") == "paused" and mig.get("status") == "completed":
                return
            if time.monotonic() > end:
                raise SnapshotError(f"loading snapshot {vm.incoming} took over {timeout:.0f}s")
            await asyncio.sleep(0.02)


# --- create from a ready snapshot ---------------------------------------------
READY_SNAPSHOT = "mem.snap"
READY_OVERLAY = "ovl.qcow2"


async def save_ready(vm: QemuVm, dest: Path, *, guest_ejected: bool = False) -> SnapshotInfo:
    """Saves a booted VM whose guestd waits for Init as a template's ready snapshot.

    dest gets `mem.snap` (+ .json) and the VM's disk overlay; the VM is gone
    afterwards and its run_dir is left to the caller to remove.
    """
    info = await save(vm, dest / READY_SNAPSHOT, guest_ejected=guest_ejected)
    tmp = dest / (READY_OVERLAY + ".tmp")
    await asyncio.to_thread(shutil.copyfile, vm.spec.run_dir / READY_OVERLAY, tmp)
    os.replace(tmp, dest / READY_OVERLAY)
    return info


async def restore_ready(
    vmm: QemuVmm,
    spec: VmSpec,
    ready: Path,
    *,
    timeout: float = 600.0,  # noqa: ASYNC109
) -> PciQemuVm:
    """A new VM (spec.run_dir is its own) started from the ready snapshot in `ready`.

    The snapshot file is only read, so many sandboxes can start from it at
    once; each gets a copy of the snapshot's overlay (small: the template's
    rootfs stays the shared backing file). The caller then sends Guest.Init
    with the sandbox's identity, env, fresh entropy and the wall clock.
    spec.kernel_cmdline does not reach the guest (it booted long ago).
    """
    snap = ready / READY_SNAPSHOT
    read_info(snap)
    overlay = ready / READY_OVERLAY
    if not overlay.is_file():
        raise SnapshotCorrupt(f"ready snapshot {ready} has no disk overlay")
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(shutil.copyfile, overlay, spec.run_dir / READY_OVERLAY)
    return await restore(vmm, spec, snap, timeout=timeout)

"""The QEMU driver hostd runs: microvm with a PCIe bus, so a VM can be saved and restored.

The vsock device sits behind a `pcie-root-port` as `vhost-user-vsock-pci`,
which can be hot-unplugged (`hostd.vmm.qemu.hotplug`); the guest needs the
virtio_pci modules and `pcie_ports=native` because microvm's ACPI tables
have no _OSC granting native hotplug.

Guest RAM is a file in /dev/shm (`RunDir.ram`, `memory-backend-file`,
share=on: vhost-user maps it too), and migration runs with the capability
`x-ignore-shared`, so QEMU's state stream carries only device state and the
RAM is copied as a file (sparse: zero pages stay holes), never streamed
through QEMU (docs/persistence.md, "Restore without streaming RAM").

save(dest):
  1. unplug the vsock device: fastest when the guest powers its slot off
     itself (`guest_eject_script`, run through guestd: QEMU then drops the
     device at once); otherwise QMP device_del, which Linux' pciehp honours
     after its 5 s attention-button delay;
  2. `stop`, `migrate` the device state to `<dest>.tmp`, copy the RAM file
     to `<dest>.ram` (fsynced, renamed), then `<dest>.json`;
  3. kill QEMU and vhost-device-vsock and delete the RAM file: the guest's
     memory is freed. The run_dir (overlay disk, console log) stays.
restore(spec, snapshot):
  copy `<snapshot>.ram` to the new VM's RAM file (inside its cgroup, so the
  memory is charged to the sandbox), start a fresh vhost-device-vsock and
  QEMU with the same devices minus vsock and `-incoming defer`, load the
  device state (`migrate-incoming`), `cont`, and plug a fresh vsock device
  back in; the guest's pciehp probes it and guest listeners (guestd) accept
  again. Connections open at save time are reset, as with Firecracker
  snapshots. The guest clock is behind by the time spent paused: the caller
  re-sends Guest.Init (wall_clock) after restore. A format-1 snapshot (RAM
  inside the stream, older hostd) is loaded the old way, zero pages released.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shlex
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import hostd.vmm.qemu.hotplug as hotplug
import hostd.vmm.qemu.ramcopy as ramcopy
from hostd.rundir import partial, snapshot_ram
from hostd.vmm.base import (
    SnapshotCorrupt,
    SnapshotError,
    SnapshotInfo,
    VmError,
    VmSpec,
)
from hostd.vmm.qemu.hotplug import EJECT_SCRIPT, ROOT_PORT, VSOCK_CHARDEV, VSOCK_DEV
from hostd.vmm.qemu.process import join_cgroups, read_tail, run_both
from hostd.vmm.qemu.vm import QemuVm, QemuVmm
from hostd.vmm.qmp import QmpClient, QmpError
from hostd.vmm.snapfile import (
    check_disk,
    despite_cancel,
    fsync_path,
    has_magic,
    read_info,
    write_info,
)
from hostd.vmm.specfile import write_spec
from hostd.vmm.zeropages import release_zero_pages

log = logging.getLogger("hostd.vmm.qemu.pci")

PCI_KERNEL_ARGS = ("pcie_ports=native",)
GIVE_BACK_PROBE_WAIT = 30.0


def pci_argv(argv: list[str], *, incoming: bool = False) -> list[str]:
    """QemuVm's command line turned into the PCIe-vsock one (or the restore one).

    Idempotent. With `incoming`, the vsock chardev and device are left out
    (they are added over QMP once the state is loaded) and QEMU waits for
    `migrate-incoming` (`-incoming defer`).
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
            if not incoming:
                out += [a, val]
        elif a == "-device" and val.startswith("vhost-user-vsock-pci"):
            # Already transformed (idempotent): keep unless restoring.
            if not incoming:
                out += [a, val]
        elif a == "-device" and val.startswith("vhost-user-vsock-device"):
            out += [
                "-device",
                f"pcie-root-port,id={ROOT_PORT},bus=pcie.0,chassis=1,slot={hotplug.PCI_SLOT}",
            ]
            if not incoming:
                dev = f"vhost-user-vsock-pci,chardev={VSOCK_CHARDEV},id={VSOCK_DEV},bus={ROOT_PORT}"
                out += ["-device", dev]
        else:
            out.append(a)
            i += 1
            continue
        i += 2
    if incoming:
        out += ["-incoming", "defer"]
    return out


class PciQemuVm(QemuVm):
    """A QemuVm whose vsock device sits on a hot-pluggable PCIe port, so it can be saved."""

    def __init__(self, vmm: QemuVmm, spec: VmSpec) -> None:
        super().__init__(vmm, spec)
        self.incoming = False  # started to load a snapshot
        self._restore_steps: dict[str, float] = {}

    @property
    def restore_steps(self) -> dict[str, float]:
        return dict(self._restore_steps)

    def memory_backend(self, size: str) -> str:
        """Guest RAM as a file in /dev/shm, shared (vhost-user maps it; x-ignore-shared)."""
        return f"memory-backend-file,id=mem,size={size},mem-path={self.files.ram},share=on"

    def qemu_argv(self) -> list[str]:
        return pci_argv(super().qemu_argv(), incoming=self.incoming)

    # --- capabilities ----------------------------------------------------
    @property
    def can_save(self) -> bool:
        """Whether QEMU runs with the hot-pluggable vsock port (so it can be saved)."""
        pid = self.vmm_pid
        if pid is None:
            return False
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return f"id={ROOT_PORT},".encode() in argv

    @property
    def guest_eject_script(self) -> str:
        return EJECT_SCRIPT

    async def _qmp_client(self) -> QmpClient:
        return await hotplug.connect(self.qmp_sock, self.spec.sandbox_id)

    async def restart_vsock_backend(self, probe_wait: float = GIVE_BACK_PROBE_WAIT) -> None:
        """A fresh vhost-device-vsock, and a fresh device plugged in over it.

        The old device is unplugged first if present (QMP device_del: about
        5 s, the guest's pciehp attention delay); returns once the guest has
        started the new one.
        """
        c = await self._qmp_client()
        async with c:
            if await hotplug.has_device(c):
                await hotplug.unplug(c, self.spec.sandbox_id, guest_ejected=False)
            await self._replug(c, probe_wait)

    async def give_back(self, eject_wait: float = 15.0) -> None:
        """Running again, with its vsock, a VM whose guest ran the eject script but that was
        not saved (or whose save a dead hostd left half done)."""
        c = await self._qmp_client()
        async with c:
            with contextlib.suppress(QmpError):  # a save a dead hostd left running
                await c.execute("migrate_cancel")
            with contextlib.suppress(QmpError):
                await c.execute("cont")
            # The guest powers the slot off a moment after the script ran.
            if await hotplug.wait_gone(c, VSOCK_DEV, eject_wait):
                await self._replug(c)
            elif not self.vsock_backend_alive():
                # Present over a backend that is gone: a fresh device on a fresh backend.
                await hotplug.unplug(c, self.spec.sandbox_id, guest_ejected=False)
                await self._replug(c)
            else:
                # Present: never unplugged (the guest did not eject), or plugged back
                # by a hostd that died before the guest took it: make sure it has.
                await hotplug.ensure_probed(c, self.spec.sandbox_id, GIVE_BACK_PROBE_WAIT,
                                            chardev=await hotplug.device_chardev(c))  # fmt: skip

    async def _replug(self, c: QmpClient, probe_wait: float = GIVE_BACK_PROBE_WAIT) -> None:
        # A fresh vhost-device-vsock: the old one may still serve the
        # connection of the unplugged device and never answer a new one.
        await self.stop_vsock_backend()
        await self.start_vsock_backend()
        chardev = await hotplug.replug(c, self.files.vhost_user_sock)
        await hotplug.ensure_probed(c, self.spec.sandbox_id, probe_wait, chardev=chardev,
                                    rings_ready=self.vsock_rings_ready)  # fmt: skip

    # --- save ------------------------------------------------------------
    async def save(
        self,
        dest: Path,
        *,
        guest_ejected: bool = False,
        timeout: float = 600.0,  # noqa: ASYNC109
    ) -> SnapshotInfo:
        """Saves devices to `dest`, RAM to `dest.ram`, and ends the VM's processes.

        `guest_ejected`: the caller ran `guest_eject_script` in the guest just
        before (saves ~5 s).
        """
        t0 = time.monotonic()
        s = self.spec
        check_disk(s, dest)
        tmp, ram, ram_tmp = partial(dest), snapshot_ram(dest), partial(snapshot_ram(dest))
        c = await self._qmp_client()
        async with c:
            await hotplug.unplug(c, s.sandbox_id, guest_ejected=guest_ejected)
            t_unplug = time.monotonic() - t0
            try:
                await c.execute("stop")
                await _ignore_shared(c)
                st = await _migrate(c, f"exec:cat > {shlex.quote(str(tmp))}", timeout)
                if st.get("status") != "completed":
                    raise SnapshotError(
                        f"saving {s.sandbox_id} failed: {st.get('error-desc') or st.get('status')}"
                    )
                if not await asyncio.to_thread(has_magic, tmp):
                    raise SnapshotError(
                        f"saving {s.sandbox_id}: QEMU wrote no valid stream to {tmp}"
                    )
                # The guest is stopped: the RAM file holds still while it is copied.
                await self._copy_ram(self.files.ram, ram_tmp)
                for f in (tmp, ram_tmp):
                    await asyncio.to_thread(fsync_path, f)
            except BaseException:
                for f in (tmp, ram_tmp):
                    f.unlink(missing_ok=True)
                # Give the VM back as it was: running, with its vsock device (over a
                # fresh backend, see give_back).
                with contextlib.suppress(QmpError, OSError, VmError):
                    await c.execute("cont")
                    await self._replug(c)
                raise
        size = await asyncio.to_thread(lambda: _allocated(tmp) + _allocated(ram_tmp))
        state_bytes = (await asyncio.to_thread(os.stat, tmp)).st_size
        os.replace(ram_tmp, ram)
        os.replace(tmp, dest)
        info = SnapshotInfo(
            path=dest, size_bytes=size, memory_mb=s.memory_mb, vcpus=s.vcpus,
            created_at=time.time(), unplug_seconds=t_unplug,
            save_seconds=time.monotonic() - t0, state_bytes=state_bytes,
        )  # fmt: skip
        # Complete (files + metadata) before the VM ends, so a caller that dies in
        # between finds either a running VM or a restorable snapshot.
        write_info(info)
        await asyncio.to_thread(fsync_path, dest.parent)
        # The snapshot stands from here: a cancel does not cut ending the VM short
        # (the caller then finds the VM gone and the snapshot complete).
        await despite_cancel(self.stop())
        return dataclasses.replace(info, save_seconds=time.monotonic() - t0)

    async def _copy_ram(self, src: Path, dst: Path) -> None:
        """A sparse copy (`cp` finds the zero blocks: RAM has no holes for them yet), run
        inside the VM's cgroups so the memory (and page cache) it allocates is charged to
        the sandbox, not to hostd."""
        proc = await asyncio.create_subprocess_exec(
            "cp", "--sparse=always", str(src), str(dst),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=join_cgroups(self.spec.cgroup_procs_files),
        )  # fmt: skip
        await ramcopy.finish(proc, src, dst, self.spec.sandbox_id)

    # --- restore ---------------------------------------------------------
    async def stage_ram(self, snapshot: Path, info: SnapshotInfo,
                        started: asyncio.Event | None = None) -> None:  # fmt: skip
        """Copies the snapshot's RAM image into this VM's RAM file (in its cgroups); on failure
        or cancel, no copy runs on and no RAM file is left. `started` is set once the file
        has its full size and is being filled in place (`ramcopy`): QEMU may start then."""
        f = self.files
        f.ram.unlink(missing_ok=True)
        if info.format < 2:  # RAM inside the stream
            if started is not None:
                started.set()
            return
        src = snapshot_ram(snapshot)
        try:
            await asyncio.to_thread(ramcopy.sized, f.ram, info.memory_mb << 20)
            if started is not None:  # QEMU may map it now; the helper starts meanwhile
                started.set()
            proc = await ramcopy.start_fill(src, f.ram, self.spec.cgroup_procs_files)
            await ramcopy.finish(proc, src, f.ram, self.spec.sandbox_id)
        except BaseException:
            f.ram.unlink(missing_ok=True)
            raise

    async def restore_from(self, snapshot: Path, info: SnapshotInfo, timeout: float,  # noqa: ASYNC109
                           probe_wait: float, staged: bool = False,
                           staging: Awaitable[object] | None = None) -> None:  # fmt: skip
        """Starts this (not yet started) VM from `snapshot`; on failure no process is left.
        `staged`: `stage_ram` ran (the RAM file is in place), or runs still as `staging`
        (its file sized and being filled)."""
        self.incoming = True
        try:
            await self._load(snapshot, info, timeout, staged, staging)
            t0 = time.monotonic()
            c = await self._qmp_client()
            async with c:
                await c.execute("cont")
                t1 = time.monotonic()
                chardev = await hotplug.replug(c, self.files.vhost_user_sock)
                t2 = time.monotonic()
                settle = await hotplug.ensure_probed(
                    c, self.spec.sandbox_id, probe_wait, chardev=chardev,
                    rings_ready=self.vsock_rings_ready,
                )  # fmt: skip
                t3 = time.monotonic()
            self._restore_steps.update({
                "cont": t1 - t0, "vsock device_add": t2 - t1,
                "guest probes vsock": t3 - t2 - settle, "vsock settle": settle,
            })  # fmt: skip
            log.info("%s: running, vsock device back in %.3f s", self.spec.sandbox_id,
                     time.monotonic() - t0)  # fmt: skip
        except BaseException as e:
            err = read_tail(self.files.vmm_err)
            with contextlib.suppress(VmError):
                await self.stop()
            if isinstance(e, SnapshotError | asyncio.CancelledError):
                raise
            if isinstance(e, VmError | QmpError):
                raise SnapshotCorrupt(
                    f"restoring {self.spec.sandbox_id} from {snapshot} failed: {e}\n{err}"
                ) from e
            raise
        finally:
            self.incoming = False  # a later re-exec (e.g. by an operator) would boot normally

    async def _load(self, snapshot: Path, info: SnapshotInfo, timeout: float,  # noqa: ASYNC109
                    staged: bool, staging: Awaitable[object] | None) -> None:  # fmt: skip
        """RAM file in place, processes started, device state loaded; the VM stays stopped.
        A RAM copy still running (`staging`) goes on while the processes start."""
        s, f = self.spec, self.files
        if not f.overlay.is_file():
            raise SnapshotCorrupt(f"the VM's disk overlay in {s.run_dir} is gone; cannot restore")
        self.check_spec()
        write_spec(s)  # what a later pause to disk or an operator reads back
        t0 = time.monotonic()
        if staging is None and (not staged or (info.format >= 2 and not f.ram.is_file())):
            await self.stage_ram(snapshot, info)
        t_ram = time.monotonic()
        # QEMU meets the vsock backend only at the re-plug (its chardev is added then).
        await run_both(self.start_vsock_backend(), self.start_qemu())
        t_qemu = time.monotonic()
        if staging is not None:
            await staging
        t_fill = time.monotonic()
        end = time.monotonic() + timeout
        try:
            c = await self._qmp_client()
            async with c:
                if info.format >= 2:
                    await _ignore_shared(c)
                await c.execute("migrate-incoming",
                                {"uri": f"exec:cat {shlex.quote(str(snapshot))}"})  # fmt: skip
                await self._wait_loaded(c, snapshot, end, timeout)
        except (SnapshotError, QmpError) as e:
            if isinstance(e, SnapshotCorrupt) or self.is_alive():
                raise
            raise SnapshotCorrupt(
                f"QEMU exited while loading snapshot {snapshot}: {read_tail(f.vmm_err).strip()}"
            ) from e
        if info.format < 2:
            await self._release_zero_pages()
        self._restore_steps.update({
            "RAM copy": t_ram - t0, "QEMU + vsock backend start": t_qemu - t_ram,
            "RAM copy finishing": t_fill - t_qemu, "state load": time.monotonic() - t_fill,
        })  # fmt: skip
        log.info("%s: RAM file copied in %.3f s, QEMU and vsock backend up in %.3f s, "
                 "state loaded in %.3f s", s.sandbox_id, t_ram - t0 + t_fill - t_qemu,
                 t_qemu - t_ram, time.monotonic() - t_fill)  # fmt: skip

    async def _wait_loaded(self, c: QmpClient, snapshot: Path, end: float, timeout: float) -> None:  # noqa: ASYNC109
        while True:
            if not self.is_alive():
                raise SnapshotCorrupt(
                    f"QEMU exited while loading snapshot {snapshot}: "
                    f"{read_tail(self.files.vmm_err).strip()}"
                )
            try:
                mig = await c.execute("query-migrate")
                status = await c.execute("query-status")
            except QmpError as e:
                raise SnapshotCorrupt(f"QEMU failed loading snapshot {snapshot}: {e}") from e
            if mig.get("status") == "failed":
                raise SnapshotCorrupt(f"loading snapshot {snapshot} failed: {mig}")
            if status.get("status") == "paused" and mig.get("status") == "completed":
                return
            if time.monotonic() > end:
                raise SnapshotError(f"loading snapshot {snapshot} took over {timeout:.0f}s")
            await asyncio.sleep(0.01)

    async def _release_zero_pages(self) -> None:
        """After a full stream (format 1): QEMU read every page it was sent, allocating it;
        the all-zero ones go back to the host before the guest runs (zeropages.py)."""
        t0 = time.monotonic()
        try:
            released = await asyncio.to_thread(_punch_zero_pages, self.files.ram)
        except OSError as e:  # only memory left resident; the restore itself is fine
            log.warning("%s: zero pages not released: %s", self.spec.sandbox_id, e)
            return
        log.info("%s: released %d MiB of zero guest pages in %.2f s",
                 self.spec.sandbox_id, released >> 20, time.monotonic() - t0)  # fmt: skip


def _punch_zero_pages(path: Path) -> int:
    fd = os.open(path, os.O_RDWR)
    try:
        return release_zero_pages(fd)
    finally:
        os.close(fd)


def _allocated(path: Path) -> int:
    """Bytes path takes on its disk (a sparse RAM image: what the guest used)."""
    return os.stat(path).st_blocks * 512


async def _ignore_shared(c: QmpClient) -> None:
    """RAM in a shared file stays out of the migration stream (both ends must say so)."""
    cap = {"capability": "x-ignore-shared", "state": True}
    await c.execute("migrate-set-capabilities", {"capabilities": [cap]})


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


class PciQemuVmm(QemuVmm):
    """QemuVmm making PciQemuVm VMs, which can be saved and restored."""

    can_restore = True

    def create(self, spec: VmSpec) -> PciQemuVm:
        return PciQemuVm(self, spec)

    async def restore(
        self,
        spec: VmSpec,
        snapshot: Path,
        *,
        timeout: float = 600.0,  # noqa: ASYNC109
        probe_wait: float = 30.0,
        staged: bool = False,
        staging: Awaitable[object] | None = None,
    ) -> PciQemuVm:
        """Starts the VM saved at `snapshot` (same spec) and returns it running with a fresh
        vsock device. Raises SnapshotNotFound, SnapshotCorrupt (bad file or spec mismatch;
        the VM's files are kept, its new processes killed) or SnapshotError.
        """
        info = read_info(snapshot)
        if (info.memory_mb, info.vcpus) != (spec.memory_mb, spec.vcpus):
            raise SnapshotCorrupt(
                f"snapshot {snapshot} is of a {info.vcpus}-vCPU {info.memory_mb} MiB VM, "
                f"the spec asks for {spec.vcpus} vCPUs and {spec.memory_mb} MiB"
            )
        vm = self.create(spec)
        await vm.restore_from(snapshot, info, timeout, probe_wait, staged, staging)
        return vm

    async def stage_restore(self, spec: VmSpec, snapshot: Path,
                            started: asyncio.Event | None = None) -> None:  # fmt: skip
        """The snapshot's RAM image copied to spec's RAM file (in its cgroups), ahead;
        `started` set once QEMU may start (`stage_ram`)."""
        await self.create(spec).stage_ram(snapshot, read_info(snapshot), started)

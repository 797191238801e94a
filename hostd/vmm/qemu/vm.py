"""QEMU microvm driver: one QEMU process plus one vhost-device-vsock process per VM.

Everything a VM owns lives in its run_dir (`hostd.rundir.RunDir` names the
files). Both processes start in their own session, so a hostd crash leaves
them running, and join the sandbox's cgroups in a pre-exec hook, so no
instant of their life is outside the cgroup.

Pause is SIGSTOP of both processes, not QMP `stop`: vhost-device-vsock 0.3
does not survive QMP stop/cont with traffic in flight (see `QemuVm.pause`).
QMP serves the start check and `status`; destroy is SIGKILL (the overlay
is thrown away, so there is nothing to flush).

This is the virtio-mmio device set, which cannot be saved (a vhost-user
device blocks migration and mmio devices cannot be unplugged); hostd runs
the PCI variant (`hostd.vmm.qemu.pci`), which can.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hostd.rundir import RunDir
from hostd.vmm import accel as accel_mod
from hostd.vmm.base import AttachError, Vm, VmError, Vmm, VmSpec
from hostd.vmm.qemu.process import (
    POLL,
    Proc,
    epoll_watches,
    join_cgroups,
    read_tail,
    thread_names,
    thread_wchans,
)
from hostd.vmm.qmp import QmpError, qmp_command
from hostd.vmm.specfile import write_spec

# Name of vhost-user-backend's queue worker thread inside vhost-device-vsock.
VSOCK_WORKER_THREAD = "vring_worker"
# vhost-user-backend registers a virtqueue's kick eventfd in its worker's epoll
# with the queue's index as data, then marks the queue ready: rx (0) and tx (1).
VSOCK_RING_EVENTS = frozenset({0, 1})
# Where vhost-user-backend's request thread sleeps while it waits for QEMU's next message.
VHOST_USER_WAIT = "unix_stream_read_generic"


class QemuVm(Vm):
    def __init__(self, vmm: QemuVmm, spec: VmSpec) -> None:
        self.spec = spec
        self._vmm = vmm
        self.files = RunDir(spec.run_dir)
        self._vmm_proc: Proc | None = None
        self._vsk_proc: Proc | None = None
        self._vsk_worker_pid: int | None = None  # vsk pid whose worker thread was seen
        self._qmp_lock = asyncio.Lock()
        self.accel = accel_mod.resolve(spec.accel)

    # --- paths -----------------------------------------------------------
    @property
    def vsock_uds(self) -> Path:
        return self.files.vsock_uds

    @property
    def console_log(self) -> Path:
        return self.files.console_log

    @property
    def qmp_sock(self) -> Path:
        return self.files.qmp_sock

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in (self._vmm_proc, self._vsk_proc) if p is not None]

    def is_alive(self) -> bool:
        return self._vmm_proc is not None and self._vmm_proc.alive()

    def vsock_backend_alive(self) -> bool:
        return self._vsk_proc is not None and self._vsk_proc.alive()

    def vsock_device_dead(self) -> bool:
        """Whether vhost-device-vsock runs without its queue worker thread: a dead device.

        vhost-device-vsock 0.3 ends its only worker thread, without a word in
        its log, when a host connection (a dial of vsock_uds) reaches it while
        guest memory is mapped but a virtqueue is not ready: from the moment
        the guest driver starts the device until QEMU has set up the rings,
        and whenever QEMU stops the rings (QMP `stop`, a snapshot save). Its
        handler then fails on the not-ready queue (QueueNotReady ->
        IterateQueue), and vhost-user-backend ends the worker on any handler
        error. The process and its listening socket live on, so dials connect
        into the backlog and are never answered: the "silent" device. Nothing
        brings the worker back; the VM needs a fresh device or a fresh boot.

        Only a worker seen before counts as gone (seen at start, at attach or
        by an earlier call), so a build that names its thread otherwise is
        never taken for dead.
        """
        p = self._vsk_proc
        if p is None or not p.alive():
            return False
        names = thread_names(p.pid)
        if names is None:
            return False
        if VSOCK_WORKER_THREAD in names:
            self._vsk_worker_pid = p.pid
            return False
        return self._vsk_worker_pid == p.pid

    def vsock_rings_ready(self) -> bool | None:
        """Whether vhost-device-vsock has taken the rx and tx rings QEMU set up (their
        kick fds are in its worker's epoll) and every set-up message QEMU sent (ring
        enables after the kicks): its request thread sleeps waiting for the next one.
        None when that cannot be seen. Meaningful once QEMU says `vhost-started` (it has
        sent them all then).

        Only meaningful on a backend started fresh for the device now being
        started (hostd never reuses one across a re-plug): until then, a host
        dial ends its worker (`vsock_device_dead`).
        """
        p = self._vsk_proc
        if p is None or not p.alive():
            return None
        watches = epoll_watches(p.pid)
        if not watches:
            return None
        if not any(VSOCK_RING_EVENTS <= data for data in watches):
            return False
        wchans = thread_wchans(p.pid)
        if not wchans or all(w in ("", "0") for w in wchans):
            return None  # wchan hidden (or every thread running): cannot tell
        return VHOST_USER_WAIT in wchans

    # --- start -----------------------------------------------------------
    def memory_backend(self, size: str) -> str:
        """The `-object` of guest RAM: a shared memfd (vhost-user maps it too)."""
        return f"memory-backend-memfd,id=mem,size={size},share=on"

    def qemu_argv(self) -> list[str]:
        s = self.spec
        mem = f"{s.memory_mb}M"
        cmdline = s.kernel_cmdline
        for arg in accel_mod.kernel_args(self.accel):
            if arg.split("=", 1)[0] + "=" not in cmdline:
                cmdline = f"{cmdline} {arg}".strip()
        argv = [
            self._vmm.qemu,
            "-name", f"moru-{s.sandbox_id}",
            "-machine", "microvm,memory-backend=mem,x-option-roms=off,isa-serial=on",
            *accel_mod.qemu_args(self.accel),
            "-smp", str(s.vcpus),
            "-m", mem,
            "-object", self.memory_backend(mem),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", f"file,id=con,path={self.console_log},append=on",
            "-serial", "chardev:con",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            "-kernel", str(s.kernel),
            "-initrd", str(s.initramfs),
            "-append", cmdline,
            "-drive", f"id=root,file={self.files.overlay},format=qcow2,if=none,"
                      "cache=unsafe,discard=unmap,detect-zeroes=unmap",
            "-device", "virtio-blk-device,drive=root",
        ]  # fmt: skip
        for i, disk in enumerate(s.extra_disks):
            argv += [
                "-drive", f"id=d{i},file={disk},format=raw,if=none,cache=none,aio=threads",
                "-device", f"virtio-blk-device,drive=d{i}",
            ]  # fmt: skip
        argv += [
            "-chardev", f"socket,id=vs,path={self.files.vhost_user_sock}",
            "-device", "vhost-user-vsock-device,chardev=vs",
        ]  # fmt: skip
        if s.net is not None:
            argv += [
                "-netdev", f"tap,id=n0,ifname={s.net.tap},script=no,downscript=no",
                "-device", f"virtio-net-device,netdev=n0,mac={s.net.mac}",
            ]  # fmt: skip
            argv = ["ip", "netns", "exec", s.net.netns, *argv]
        return argv

    def vsock_argv(self) -> list[str]:
        return [
            self._vmm.vsock_device,
            "--guest-cid", str(self.spec.guest_cid),
            "--socket", str(self.files.vhost_user_sock),
            "--uds-path", str(self.vsock_uds),
        ]  # fmt: skip

    def _spawn(self, name: str, argv: list[str], err_file: Path, pid_file: Path) -> Proc:
        with err_file.open("ab") as err:
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    cwd=self.spec.run_dir,
                    start_new_session=True,
                    close_fds=True,
                    preexec_fn=join_cgroups(self.spec.cgroup_procs_files),
                )
            except (OSError, subprocess.SubprocessError) as e:
                raise VmError(f"cannot start {name} ({argv[0]}): {e}") from e
        pid_file.write_text(str(popen.pid))
        return Proc(name, popen.pid, str(self.spec.run_dir), popen)

    def failure(self, what: str) -> VmError:
        """A VmError naming what failed, with both processes' stderr and the console tail."""
        f = self.files
        return VmError(
            f"{what}\n--- {f.vmm_err.name} ---\n{read_tail(f.vmm_err)}"
            f"\n--- {f.vsock_err.name} ---\n{read_tail(f.vsock_err)}"
            f"\n--- console tail ---\n{self.console_tail(4096)}"
        )

    def check_spec(self) -> None:
        s = self.spec
        if not self.files.sockets_fit():
            raise VmError(f"run_dir {s.run_dir} is too long for unix sockets (108 bytes)")
        for label, path in (("kernel", s.kernel), ("initramfs", s.initramfs), ("rootfs", s.rootfs)):
            if not path.is_file():
                raise VmError(f"{label} {path} does not exist")
        for p in s.cgroup_procs_files:
            if not p.exists():
                raise VmError(f"cgroup file {p} does not exist")

    async def start(self) -> None:
        if self._vmm_proc is not None or self._vsk_proc is not None:
            raise VmError(f"VM {self.spec.sandbox_id} already started")
        try:
            await self._start()
        except BaseException as e:
            await self.destroy()
            if isinstance(e, VmError | asyncio.CancelledError):
                raise
            raise VmError(f"starting VM {self.spec.sandbox_id}: {e}") from e

    async def _start(self) -> None:
        s, f = self.spec, self.files
        s.run_dir.mkdir(parents=True, exist_ok=True)
        write_spec(s)
        self.check_spec()
        for stale in (f.qmp_sock, f.vmm_pid, f.vsock_pid, f.ram):
            stale.unlink(missing_ok=True)  # left by an earlier run: we wait for these
        await self._create_overlay()
        await self.start_vsock_backend()
        status = await self.start_qemu()
        if not status.get("running"):
            raise self.failure(f"QEMU is not running after start: {status}")

    async def start_vsock_backend(self) -> None:
        """Starts vhost-device-vsock on fresh sockets; returns once both exist."""
        f = self.files
        for sock in (f.vhost_user_sock, f.vsock_uds):
            sock.unlink(missing_ok=True)
        self._vsk_proc = self._spawn(
            "vhost-device-vsock", self.vsock_argv(), f.vsock_err, f.vsock_pid
        )
        await self._wait_for(
            lambda: f.vhost_user_sock.exists() and f.vsock_uds.exists(),
            self._vsk_proc,
            "vhost-device-vsock sockets",
        )
        self.vsock_device_dead()  # notes its worker thread (running before its sockets exist)

    async def start_qemu(self) -> dict[str, Any]:
        """Starts QEMU; returns its `query-status` once its monitor answers."""
        f = self.files
        f.qmp_sock.unlink(missing_ok=True)
        self._vmm_proc = self._spawn("qemu", self.qemu_argv(), f.vmm_err, f.vmm_pid)
        await self._wait_for(f.qmp_sock.exists, self._vmm_proc, "the QMP socket")
        # The socket file appears at bind(), a moment before QEMU listens.
        end = time.monotonic() + self._vmm.start_timeout
        while True:
            try:
                status: dict[str, Any] = await self._qmp("query-status")
                return status
            except QmpError as e:
                if not self._vmm_proc.alive():
                    raise self.failure("qemu exited before its monitor answered") from e
                if time.monotonic() > end:
                    raise self.failure(f"QEMU's monitor did not answer: {e}") from e
                await asyncio.sleep(POLL)

    async def _create_overlay(self) -> None:
        s = self.spec
        proc = await asyncio.create_subprocess_exec(
            self._vmm.qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw",
            "-b", str(s.rootfs), str(self.files.overlay), f"{s.disk_mb}M",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise VmError(f"qemu-img create failed: {out.decode(errors='replace').strip()}")

    async def _wait_for(self, cond: Callable[[], bool], proc: Proc, what: str) -> None:
        end = time.monotonic() + self._vmm.start_timeout
        while not cond():
            if not proc.alive():
                raise self.failure(f"{proc.name} exited while waiting for {what}")
            if time.monotonic() > end:
                raise self.failure(f"timed out waiting for {what}")
            await asyncio.sleep(POLL)

    async def _qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        async with self._qmp_lock:
            return await qmp_command(self.qmp_sock, command, arguments)

    async def wait_exit(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Waits until the VMM exits by itself (guest powered off); False on timeout."""
        if self._vmm_proc is None:
            return True
        return await self._vmm_proc.wait(timeout)

    # --- control ---------------------------------------------------------
    async def pause(self) -> None:
        """Stops the VM's processes (SIGSTOP): no CPU used, memory and sockets kept.

        Not QMP `stop`: with vhost-device-vsock 0.3 a QMP stop/cont cycle with
        traffic in flight leaves the vsock device dead (no connection works
        after `cont`; see `vsock_device_dead`). A stopped process keeps the
        device's state intact, and bytes sent meanwhile wait in the socket
        buffers.
        """
        if not self.is_alive():
            raise VmError(f"VM {self.spec.sandbox_id} is not running")
        for p in (self._vmm_proc, self._vsk_proc):
            if p is not None:
                p.signal(signal.SIGSTOP)
        end = time.monotonic() + 5.0
        while not all(p.stopped() for p in (self._vmm_proc, self._vsk_proc) if p is not None):
            if time.monotonic() > end:
                raise VmError(f"VM {self.spec.sandbox_id} did not stop")
            await asyncio.sleep(0.002)

    async def resume(self) -> None:
        if not self.is_alive():
            raise VmError(f"VM {self.spec.sandbox_id} is not running")
        for p in (self._vsk_proc, self._vmm_proc):
            if p is not None:
                p.signal(signal.SIGCONT)

    def is_paused(self) -> bool:
        return self._vmm_proc is not None and self._vmm_proc.stopped()

    async def status(self) -> str:
        """QEMU's run state: "running", "paused", "shutdown", ..."""
        if self.is_paused():
            return "paused"
        try:
            return str((await self._qmp("query-status"))["status"])
        except QmpError as e:
            raise VmError(f"querying VM {self.spec.sandbox_id}: {e}") from e

    async def stop(self) -> None:
        """Kills both processes and waits for them, and frees the guest RAM; run_dir (disk,
        snapshot) stays."""
        procs = [p for p in (self._vmm_proc, self._vsk_proc) if p is not None]
        for p in procs:
            p.kill()
        try:
            stuck = [p.name for p in procs if not await p.wait(10.0)]
        finally:
            # Even when a process is stuck or the wait is cancelled: the name goes now,
            # the memory once the last mapping does (a stuck QEMU's RAM file leaked here).
            self.files.ram.unlink(missing_ok=True)
        if stuck:
            raise VmError(
                f"VM {self.spec.sandbox_id}: {', '.join(stuck)} did not exit after SIGKILL"
            )
        self._vmm_proc = self._vsk_proc = None
        self.files.ram.unlink(missing_ok=True)

    async def stop_vsock_backend(self) -> None:
        if self._vsk_proc is not None:
            self._vsk_proc.kill()
            if not await self._vsk_proc.wait(10.0):
                raise VmError(f"VM {self.spec.sandbox_id}: vhost-device-vsock did not exit")

    async def destroy(self) -> None:
        try:
            await self.stop()
        finally:
            await asyncio.to_thread(self.files.remove)

    @property
    def vmm_pid(self) -> int | None:
        """QEMU's pid while it runs."""
        p = self._vmm_proc
        return p.pid if p is not None and p.alive() else None

    def _adopt(self) -> None:
        marker = str(self.spec.run_dir)
        found: dict[str, Proc] = {}
        for name, pid_file in (("qemu", self.files.vmm_pid), ("vhost-device-vsock",
                                                              self.files.vsock_pid)):
            try:
                pid = int(pid_file.read_text())
            except (OSError, ValueError):
                continue
            found[name] = Proc(name, pid, marker, None)
        # Keep whatever still runs so destroy() can kill it, then judge.
        self._vmm_proc = found.get("qemu")
        self._vsk_proc = found.get("vhost-device-vsock")
        dead = [n for n in ("qemu", "vhost-device-vsock") if n not in found or not found[n].alive()]
        self.vsock_device_dead()  # notes its worker thread if it still runs
        if dead:
            raise VmError(f"VM {self.spec.sandbox_id}: {', '.join(dead)} no longer running")


class QemuVmm(Vmm):
    """Creates QEMU microvm VMs and finds them again after a hostd restart."""

    name = "qemu"

    def __init__(
        self,
        qemu: str = "qemu-system-x86_64",
        vsock_device: str = "vhost-device-vsock",
        qemu_img: str = "qemu-img",
        start_timeout: float = 10.0,
    ) -> None:
        self.qemu = qemu
        self.vsock_device = vsock_device
        self.qemu_img = qemu_img
        self.start_timeout = start_timeout

    def create(self, spec: VmSpec) -> QemuVm:
        return QemuVm(self, spec)

    async def attach(self, spec: VmSpec) -> QemuVm:
        """The running VM of spec; raises AttachError (processes kept for destroy) otherwise."""
        vm = self.create(spec)
        try:
            vm._adopt()
        except VmError as e:
            raise AttachError(str(e), vm) from None
        return vm

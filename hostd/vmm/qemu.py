"""QEMU microvm driver: one QEMU process plus one vhost-device-vsock process per VM.

Everything a VM owns lives in its run_dir (short names: AF_UNIX paths are
limited to 108 bytes):

    ovl.qcow2    copy-on-write overlay over the template's raw rootfs
    vhu.sock     vhost-user control socket between QEMU and the vsock device
    v.sock       hybrid-vsock socket hostd dials (`CONNECT <port>\\n`)
    qmp.sock     QMP monitor
    console.log  guest serial console (appended)
    vmm.pid vsk.pid   pids, for `attach` after a hostd restart
    vmm.err vsk.err   the processes' stderr
    spec.json    the VmSpec, for operators and `load_spec`

Both processes start in their own session, so a hostd crash leaves them
running, and join the sandbox's cgroups in a pre-exec hook, so no instant of
their life is outside the cgroup.

Pause is SIGSTOP of both processes, not QMP `stop`: vhost-device-vsock 0.3
does not survive QMP stop/cont with traffic in flight (see `QemuVm.pause`).
QMP serves the start check and `status`; destroy is SIGKILL (the overlay
is thrown away, so there is nothing to flush).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hostd.vmm import accel as accel_mod
from hostd.vmm.base import NetAttachment, Vm, VmError, Vmm, VmSpec
from hostd.vmm.qmp import QmpError, qmp_command

OVERLAY = "ovl.qcow2"
VHU_SOCK = "vhu.sock"
VSOCK_UDS = "v.sock"
QMP_SOCK = "qmp.sock"
CONSOLE = "console.log"
VMM_PID = "vmm.pid"
VSK_PID = "vsk.pid"
VMM_ERR = "vmm.err"
VSK_ERR = "vsk.err"
SPEC = "spec.json"

_UNIX_PATH_MAX = 107
_POLL = 0.01
# Name of vhost-user-backend's queue worker thread inside vhost-device-vsock.
VSOCK_WORKER_THREAD = "vring_worker"


def spec_to_json(spec: VmSpec) -> str:
    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return json.dumps(conv(asdict(spec)), indent=2, sort_keys=True)


def spec_from_json(text: str) -> VmSpec:
    d = json.loads(text)
    for k in ("kernel", "initramfs", "rootfs", "run_dir"):
        d[k] = Path(d[k])
    d["extra_disks"] = tuple(Path(p) for p in d.get("extra_disks", ()))
    d["cgroup_procs_files"] = tuple(Path(p) for p in d.get("cgroup_procs_files", ()))
    if d.get("net"):
        d["net"] = NetAttachment(**d["net"])
    return VmSpec(**d)


def load_spec(run_dir: Path) -> VmSpec:
    """The spec a VM was started with (raises VmError when run_dir has none)."""
    try:
        return spec_from_json((run_dir / SPEC).read_text())
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise VmError(f"no usable {SPEC} in {run_dir}: {e}") from e


def _join_cgroups(procs_files: tuple[Path, ...]) -> Callable[[], None]:
    """A pre-exec hook that moves the child into every cgroup before it execs."""
    paths = [str(p) for p in procs_files]

    def hook() -> None:
        pid = str(os.getpid()).encode()
        for p in paths:
            fd = os.open(p, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    return hook


class _Proc:
    """A VM process: our child (popen set) or one found again after a restart."""

    def __init__(self, name: str, pid: int, marker: str, popen: subprocess.Popen[bytes] | None):
        self.name = name
        self.pid = pid
        self.marker = marker  # a string its command line must contain (the run_dir)
        self.popen = popen

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _is_our_process(self.pid, self.marker)

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stopped(self) -> bool:
        """Whether it is stopped by a signal (paused)."""
        return _proc_state(self.pid) in ("T", "t")

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Waits (polling: after a restart it is not our child) until it is gone."""
        end = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > end:
                return False
            await asyncio.sleep(_POLL)
        return True


def _proc_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat ("" when gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _is_our_process(pid: int, marker: str) -> bool:
    """Whether pid runs (not a zombie) with marker in its command line."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return _proc_state(pid) not in ("", "Z", "X") and marker.encode() in cmdline


def _thread_names(pid: int) -> list[str] | None:
    """The names (comm) of pid's threads; None when pid is gone."""
    names = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        with contextlib.suppress(OSError):
            names.append(Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip())
    return names


def _read_tail(path: Path, nbytes: int = 2048) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class QemuVm(Vm):
    def __init__(self, vmm: QemuVmm, spec: VmSpec) -> None:
        self.spec = spec
        self._vmm = vmm
        self._vmm_proc: _Proc | None = None
        self._vsk_proc: _Proc | None = None
        self._vsk_worker_pid: int | None = None  # vsk pid whose worker thread was seen
        self._qmp_lock = asyncio.Lock()
        self.accel = accel_mod.resolve(spec.accel)

    # --- paths -----------------------------------------------------------
    def _p(self, name: str) -> Path:
        return self.spec.run_dir / name

    @property
    def vsock_uds(self) -> Path:
        return self._p(VSOCK_UDS)

    @property
    def console_log(self) -> Path:
        return self._p(CONSOLE)

    @property
    def qmp_sock(self) -> Path:
        return self._p(QMP_SOCK)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in (self._vmm_proc, self._vsk_proc) if p is not None]

    def is_alive(self) -> bool:
        return self._vmm_proc is not None and self._vmm_proc.alive()

    def vsock_backend_alive(self) -> bool:
        return self._vsk_proc is not None and self._vsk_proc.alive()

    async def restart_vsock_backend(self) -> None:
        raise VmError(
            f"VM {self.spec.sandbox_id}: its vsock device cannot be plugged in again"
            " (started without the PCI vsock port)"
        )

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
        names = _thread_names(p.pid)
        if names is None:
            return False
        if VSOCK_WORKER_THREAD in names:
            self._vsk_worker_pid = p.pid
            return False
        return self._vsk_worker_pid == p.pid

    # --- start -----------------------------------------------------------
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
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", f"file,id=con,path={self.console_log},append=on",
            "-serial", "chardev:con",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            "-kernel", str(s.kernel),
            "-initrd", str(s.initramfs),
            "-append", cmdline,
            "-drive", f"id=root,file={self._p(OVERLAY)},format=qcow2,if=none,"
                      "cache=unsafe,discard=unmap,detect-zeroes=unmap",
            "-device", "virtio-blk-device,drive=root",
        ]  # fmt: skip
        for i, disk in enumerate(s.extra_disks):
            argv += [
                "-drive", f"id=d{i},file={disk},format=raw,if=none,cache=none,aio=threads",
                "-device", f"virtio-blk-device,drive=d{i}",
            ]  # fmt: skip
        argv += [
            "-chardev", f"socket,id=vs,path={self._p(VHU_SOCK)}",
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
            "--socket", str(self._p(VHU_SOCK)),
            "--uds-path", str(self.vsock_uds),
        ]  # fmt: skip

    def _spawn(self, name: str, argv: list[str], err_file: str, pid_file: str) -> _Proc:
        with self._p(err_file).open("ab") as err:
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    cwd=self.spec.run_dir,
                    start_new_session=True,
                    close_fds=True,
                    preexec_fn=_join_cgroups(self.spec.cgroup_procs_files),
                )
            except (OSError, subprocess.SubprocessError) as e:
                raise VmError(f"cannot start {name} ({argv[0]}): {e}") from e
        self._p(pid_file).write_text(str(popen.pid))
        return _Proc(name, popen.pid, str(self.spec.run_dir), popen)

    def _failure(self, what: str) -> VmError:
        return VmError(
            f"{what}\n--- {VMM_ERR} ---\n{_read_tail(self._p(VMM_ERR))}"
            f"\n--- {VSK_ERR} ---\n{_read_tail(self._p(VSK_ERR))}"
            f"\n--- console tail ---\n{self.console_tail(4096)}"
        )

    def _check_spec(self) -> None:
        s = self.spec
        for sock in (VHU_SOCK, VSOCK_UDS, QMP_SOCK):
            if len(str(s.run_dir / sock)) > _UNIX_PATH_MAX:
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
        s = self.spec
        s.run_dir.mkdir(parents=True, exist_ok=True)
        (s.run_dir / SPEC).write_text(spec_to_json(s))
        self._check_spec()
        for stale in (VHU_SOCK, VSOCK_UDS, QMP_SOCK, VMM_PID, VSK_PID):
            self._p(stale).unlink(missing_ok=True)  # left by an earlier run: we wait for these
        await self._create_overlay()
        self._vsk_proc = self._spawn("vhost-device-vsock", self.vsock_argv(), VSK_ERR, VSK_PID)
        await self._wait_for(
            lambda: self._p(VHU_SOCK).exists() and self.vsock_uds.exists(),
            self._vsk_proc,
            "vhost-device-vsock sockets",
        )
        self.vsock_device_dead()  # notes its worker thread (running before its sockets exist)
        self._vmm_proc = self._spawn("qemu", self.qemu_argv(), VMM_ERR, VMM_PID)
        await self._wait_for(self.qmp_sock.exists, self._vmm_proc, "the QMP socket")
        # The socket file appears at bind(), a moment before QEMU listens.
        end = time.monotonic() + self._vmm.start_timeout
        while True:
            try:
                status = await self._qmp("query-status")
                break
            except QmpError as e:
                if not self._vmm_proc.alive():
                    raise self._failure("qemu exited before its monitor answered") from e
                if time.monotonic() > end:
                    raise self._failure(f"QEMU's monitor did not answer: {e}") from e
                await asyncio.sleep(_POLL)
        if not status.get("running"):
            raise self._failure(f"QEMU is not running after start: {status}")

    async def _create_overlay(self) -> None:
        s = self.spec
        proc = await asyncio.create_subprocess_exec(
            self._vmm.qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw",
            "-b", str(s.rootfs), str(self._p(OVERLAY)), f"{s.disk_mb}M",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise VmError(f"qemu-img create failed: {out.decode(errors='replace').strip()}")

    async def _wait_for(self, cond: Callable[[], bool], proc: _Proc, what: str) -> None:
        end = time.monotonic() + self._vmm.start_timeout
        while not cond():
            if not proc.alive():
                raise self._failure(f"{proc.name} exited while waiting for {what}")
            if time.monotonic() > end:
                raise self._failure(f"timed out waiting for {what}")
            await asyncio.sleep(_POLL)

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

    async def destroy(self) -> None:
        procs = [p for p in (self._vmm_proc, self._vsk_proc) if p is not None]
        for p in procs:
            p.kill()
        stuck = [p.name for p in procs if not await p.wait(10.0)]
        if stuck:
            raise VmError(
                f"VM {self.spec.sandbox_id}: {', '.join(stuck)} did not exit after SIGKILL"
            )
        await asyncio.to_thread(shutil.rmtree, self.spec.run_dir, True)

    def _adopt(self) -> None:
        marker = str(self.spec.run_dir)
        found: dict[str, _Proc] = {}
        for name, pid_file in (("qemu", VMM_PID), ("vhost-device-vsock", VSK_PID)):
            try:
                pid = int(self._p(pid_file).read_text())
            except (OSError, ValueError):
                continue
            found[name] = _Proc(name, pid, marker, None)
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
        """The running VM of spec; raises VmError (processes kept for destroy) otherwise."""
        vm = QemuVm(self, spec)
        try:
            vm._adopt()
        except VmError as e:
            raise AttachError(str(e), vm) from None
        return vm


class AttachError(VmError):
    """attach found the VM dead or half dead; `.vm` can still be destroyed."""

    def __init__(self, message: str, vm: QemuVm) -> None:
        super().__init__(message)
        self.vm = vm

"""The files of one sandbox's run directory, named in one place.

Short names: AF_UNIX paths are limited to 108 bytes and the sockets live here.

    spec.json    the VmSpec, for operators and for restore / re-attach
    ovl.qcow2    copy-on-write overlay over the template's raw rootfs
    vhu.sock     vhost-user control socket between QEMU and the vsock device
    v.sock       hybrid-vsock socket hostd dials (`CONNECT <port>\\n`)
    qmp.sock     QMP monitor
    g.sock       hostd's vsock relay to guestd (gRPC dials this)
    console.log  guest serial console (appended)
    vmm.pid vsk.pid   pids of the VMM and its vsock device, for re-attach
    vmm.err vsk.err   their stderr
    mem.snap     pause to disk: device state (+ mem.snap.json, mem.snap.ram)
    pausing      present while a pause to disk is under way

Guest RAM of a running VM is a file in /dev/shm (`ram`), outside the run
directory: it must be memory, the run directory is on disk. Its name is
derived from the run directory, so `remove()` finds it.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

SHM_DIR = Path("/dev/shm")
UNIX_PATH_MAX = 107


def snapshot_meta(snapshot: Path) -> Path:
    """A snapshot's metadata file (written last: its presence means complete)."""
    return snapshot.with_name(snapshot.name + ".json")


def snapshot_ram(snapshot: Path) -> Path:
    """A snapshot's guest RAM image (sparse), beside its device state."""
    return snapshot.with_name(snapshot.name + ".ram")


def partial(path: Path) -> Path:
    """Where path is written before it is renamed into place."""
    return path.with_name(path.name + ".tmp")


class RunDir:
    """Every file of a sandbox's run directory (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def _f(self, name: str) -> Path:
        return self.path / name

    @property
    def spec(self) -> Path:
        return self._f("spec.json")

    @property
    def overlay(self) -> Path:
        return self._f("ovl.qcow2")

    @property
    def vhost_user_sock(self) -> Path:
        return self._f("vhu.sock")

    @property
    def vsock_uds(self) -> Path:
        return self._f("v.sock")

    @property
    def qmp_sock(self) -> Path:
        return self._f("qmp.sock")

    @property
    def relay_sock(self) -> Path:
        return self._f("g.sock")

    @property
    def console_log(self) -> Path:
        return self._f("console.log")

    @property
    def vmm_pid(self) -> Path:
        return self._f("vmm.pid")

    @property
    def vsock_pid(self) -> Path:
        return self._f("vsk.pid")

    @property
    def vmm_err(self) -> Path:
        return self._f("vmm.err")

    @property
    def vsock_err(self) -> Path:
        return self._f("vsk.err")

    @property
    def snapshot(self) -> Path:
        return self._f("mem.snap")

    @property
    def pausing(self) -> Path:
        return self._f("pausing")

    @property
    def ram(self) -> Path:
        """The running VM's guest RAM file in /dev/shm (unique per run directory path)."""
        tag = hashlib.sha256(str(self.path).encode()).hexdigest()[:12]
        return SHM_DIR / f"moru-{self.path.name}-{tag}.ram"

    def sockets(self) -> tuple[Path, ...]:
        return (self.vhost_user_sock, self.vsock_uds, self.qmp_sock, self.relay_sock)

    def sockets_fit(self) -> bool:
        """Whether every socket path fits AF_UNIX's limit."""
        return all(len(str(s)) <= UNIX_PATH_MAX for s in self.sockets())

    def snapshot_files(self) -> tuple[Path, ...]:
        """The snapshot and everything written beside it (complete or partial)."""
        s = self.snapshot
        return (s, snapshot_meta(s), snapshot_ram(s), partial(s), partial(snapshot_ram(s)),
                partial(snapshot_meta(s)))  # fmt: skip

    def remove_snapshot(self) -> None:
        for p in self.snapshot_files():
            p.unlink(missing_ok=True)

    def remove(self) -> None:
        """The directory and the RAM file outside it (blocking: call in a thread)."""
        self.ram.unlink(missing_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)

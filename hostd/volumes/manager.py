"""Volumes: persistent raw ext4 disks under the state dir that outlive sandboxes.

    <state_dir>/volumes/<volume_id>.ext4   sparse raw disk, ext4 made at Create
    <state_dir>/volumes/volumes.db         VolumeStore (SQLite)

A sandbox gets its volume as an extra virtio disk (VmSpec.extra_disks; the
first extra disk is /dev/vdb in the guest) and hostd mounts it through guestd
once Init answered (`hostd.volumes.mount`), so any image works. The
attachment is recorded in the store, which enforces one sandbox at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import re
import secrets
import shutil
import string
import time
from pathlib import Path

from hostd.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from hostd.volumes.store import NameTaken, VolumeRecord, VolumeStore

VOLUME_ID_RE = re.compile(r"^vol_[a-z0-9]{12}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIN_SIZE_MB = 16
DEFAULT_MAX_SIZE_MB = 1 << 20  # 1 TiB
# Guest paths a volume must not hide: the root and the API filesystems.
RESERVED_MOUNTS = ("/", "/proc", "/sys", "/dev", "/run", "/opt/moru")
_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_volume_id() -> str:
    return "vol_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))


def check_volume_id(value: str, field: str = "volume_id") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if not VOLUME_ID_RE.match(value):
        raise InvalidArgument(field, f"{value[:80]!r} is not a volume id (vol_ + 12 of a-z0-9)")
    return value


def check_mount_path(value: str, field: str = "volume_mount_path") -> str:
    """An absolute, normalized guest path that does not cover the system's own mounts."""
    if not value:
        raise InvalidArgument(field, "is required with volume_id")
    if len(value) > 1024 or any(c in value for c in "\0\n\r\t "):
        raise InvalidArgument(
            field, f"{value[:80]!r} has whitespace/control characters or is too long"
        )
    if not value.startswith("/"):
        raise InvalidArgument(field, f"{value[:80]!r} must be an absolute path")
    if posixpath.normpath(value) != value or value.startswith("//"):
        raise InvalidArgument(
            field, f"{value[:80]!r} is not normalized (use {posixpath.normpath(value)!r})"
        )
    for r in RESERVED_MOUNTS:
        if value == r or (r != "/" and value.startswith(r + "/")):
            raise InvalidArgument(field, f"{value!r} would hide the guest's {r}")
    return value


class VolumeManager:
    """Create/list/get/delete volumes and lend them to one sandbox at a time."""

    def __init__(
        self,
        state_dir: Path,
        *,
        max_size_mb: int = DEFAULT_MAX_SIZE_MB,
        mkfs: str = "mkfs.ext4",
    ) -> None:
        self.dir = state_dir / "volumes"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = VolumeStore(self.dir / "volumes.db")
        self.max_size_mb = max_size_mb
        self.mkfs = mkfs
        self._clean_partial()

    def close(self) -> None:
        self.store.close()

    def path(self, volume_id: str) -> Path:
        return self.dir / f"{volume_id}.ext4"

    def _clean_partial(self) -> None:
        """Removes disk files of Creates that a crash interrupted (no row, or *.tmp)."""
        known = {r.volume_id for r in self.store.all()}
        for p in self.dir.glob("vol_*.ext4*"):
            vid = p.name.split(".", 1)[0]
            if p.name.endswith(".tmp") or vid not in known:
                p.unlink(missing_ok=True)

    # --- API -------------------------------------------------------------
    async def create(self, name: str, size_mb: int) -> VolumeRecord:
        if not name:
            raise InvalidArgument("name", "is required")
        if not NAME_RE.match(name):
            raise InvalidArgument("name", f"{name[:80]!r}: use 1-64 of A-Za-z0-9._-")
        if not MIN_SIZE_MB <= size_mb <= self.max_size_mb:
            raise InvalidArgument(
                "size_mb", f"{size_mb} is outside {MIN_SIZE_MB}..{self.max_size_mb} MiB"
            )
        if any(r.name == name for r in self.store.all()):
            raise FailedPrecondition(f"name: a volume named {name!r} already exists")
        rec = VolumeRecord(new_volume_id(), name, size_mb, time.time())
        final = self.path(rec.volume_id)
        tmp = final.with_name(final.name + ".tmp")
        try:
            await self._mkfs(tmp, size_mb, rec.volume_id)
            os.replace(tmp, final)
            self.store.insert(rec)
        except NameTaken:
            final.unlink(missing_ok=True)
            raise FailedPrecondition(f"name: a volume named {name!r} already exists") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            raise
        return rec

    async def _mkfs(self, path: Path, size_mb: int, label: str) -> None:
        # A sparse file: the disk uses only what the guest writes.
        with path.open("wb") as f:
            try:
                f.truncate(size_mb << 20)
            except OSError as e:
                raise ResourceExhausted(f"cannot create a {size_mb} MiB volume: {e}") from e
        proc = await asyncio.create_subprocess_exec(
            self.mkfs, "-q", "-F", "-m", "0", "-L", label[-16:],
            "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            text = out.decode(errors="replace").strip()
            if "No space" in text:
                raise ResourceExhausted(f"not enough disk for a {size_mb} MiB volume: {text}")
            raise RuntimeError(f"mkfs.ext4 failed ({proc.returncode}): {text}")

    def list_volumes(self) -> list[VolumeRecord]:
        return self.store.all()

    def get(self, volume_id: str) -> VolumeRecord:
        check_volume_id(volume_id)
        rec = self.store.get(volume_id)
        if rec is None:
            raise NotFound(f"volume {volume_id!r} not found")
        return rec

    def used_bytes(self, volume_id: str) -> int:
        try:
            return self.path(volume_id).stat().st_blocks * 512
        except OSError:
            return 0

    async def delete(self, volume_id: str) -> None:
        rec = self.get(volume_id)
        if not self.store.delete_if_free(volume_id):
            holder = (self.store.get(volume_id) or rec).attached_to
            raise FailedPrecondition(
                f"volume {volume_id!r} is attached to sandbox {holder!r}; kill it first"
            )
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.path(volume_id).unlink)

    # --- sandboxes -------------------------------------------------------
    def attach(self, volume_id: str, sandbox_id: str, mount_path: str) -> Path:
        """Lends the volume to sandbox_id and returns its disk file for VmSpec.extra_disks.

        Raises INVALID_ARGUMENT for a bad id or mount path, NOT_FOUND for an
        unknown volume, FAILED_PRECONDITION when another sandbox holds it.
        """
        check_mount_path(mount_path)
        self.get(volume_id)
        if not self.store.attach(volume_id, sandbox_id):
            holder = (self.store.get(volume_id) or VolumeRecord("", "", 0, 0)).attached_to
            raise FailedPrecondition(
                f"volume_id: volume {volume_id!r} is attached to sandbox {holder!r};"
                " a volume is used by one sandbox at a time"
            )
        return self.path(volume_id)

    def detach(self, volume_id: str, sandbox_id: str) -> None:
        self.store.detach(volume_id, sandbox_id)

    def release(self, sandbox_id: str) -> list[str]:
        """Frees whatever sandbox_id holds (on Kill, expiry or a dead VM)."""
        return self.store.detach_sandbox(sandbox_id)

    def reconcile(self, live_sandbox_ids: set[str]) -> list[str]:
        """After a hostd restart: frees volumes held by sandboxes that no longer exist."""
        freed = []
        for rec in self.store.all():
            if rec.attached_to and rec.attached_to not in live_sandbox_ids:
                self.store.detach(rec.volume_id, rec.attached_to)
                freed.append(rec.volume_id)
        return freed

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.dir).free

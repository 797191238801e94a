"""The initramfs: busybox-static, the virtio/vsock modules and an /init that hands over.

Written as an uncompressed newc cpio by this module (no cpio tool, no
mknod): entries are sorted and stamped with mtime 0 so equal inputs give
byte-identical images, and uncompressed because under TCG decompressing
costs more than QEMU copying a few more megabytes into guest memory.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from images.kernel import Kernel, resolve_modules
from images.tools import static_busybox

GUEST_DIR = Path(__file__).resolve().parent / "guest"
INIT_SCRIPT = GUEST_DIR / "initramfs-init.sh"
# Applets /init calls by name; the rest run as `busybox <applet>`.
APPLETS = ("sh", "mount", "umount", "insmod", "switch_root", "sleep", "cat", "mkdir", "poweroff")
# Printed by the floor image's /init: the benchmark's "reached init" marker.
FLOOR_MARKER = "moru-floor: init reached"


class CpioWriter:
    """Accumulates newc entries; `data()` returns the archive."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, bytes, int]] = {}

    def dir(self, name: str, mode: int = 0o755) -> None:
        self._entries[name] = (stat.S_IFDIR | mode, b"", 0)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entries[name] = (stat.S_IFREG | mode, data, 0)

    def symlink(self, name: str, target: str) -> None:
        self._entries[name] = (stat.S_IFLNK | 0o777, target.encode(), 0)

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entries[name] = (stat.S_IFCHR | mode, b"", os.makedev(major, minor))

    def data(self) -> bytes:
        out = bytearray()
        names = sorted(self._entries)
        for ino, name in enumerate([*names, "TRAILER!!!"], start=1):
            if name == "TRAILER!!!":
                mode, body, rdev = 0, b"", 0
            else:
                mode, body, rdev = self._entries[name]
            nlink = 2 if stat.S_ISDIR(mode) else 1
            fields = (
                ino, mode, 0, 0, nlink, 0, len(body), 0, 0,
                os.major(rdev), os.minor(rdev), len(name) + 1, 0,
            )  # fmt: skip
            out += b"070701" + b"".join(b"%08X" % f for f in fields)
            out += name.encode() + b"\0"
            out += b"\0" * (-len(out) % 4)
            out += body
            out += b"\0" * (-len(out) % 4)
        out += b"\0" * (-len(out) % 512)
        return bytes(out)


def _base(busybox: Path) -> CpioWriter:
    cpio = CpioWriter()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "newroot", "proc", "sys"):
        cpio.dir(d)
    # The kernel opens /dev/console before /init runs; devtmpfs is not mounted yet.
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in APPLETS:
        cpio.symlink(f"bin/{applet}", "busybox")
    return cpio


def initramfs_inputs_digest(kernel: Kernel, busybox: Path | None = None) -> str:
    """Hash of everything the initramfs is made of, for its cache file name."""
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(INIT_SCRIPT.read_bytes())
    h.update((busybox or static_busybox()).read_bytes())
    h.update(f"{kernel.pkg.package}={kernel.pkg.version}".encode())
    # Which modules go in, and in what order.
    h.update("\0".join(resolve_modules(kernel.modules_dir)).encode())
    return h.hexdigest()


def build_initramfs(kernel: Kernel, dest: Path) -> list[str]:
    """Write the initramfs for `kernel` to dest; returns the module load order."""
    modules = resolve_modules(kernel.modules_dir)
    cpio = _base(static_busybox())
    names = []
    for rel in modules:
        name = rel.rsplit("/", 1)[-1]
        cpio.file(f"lib/modules/{name}", (kernel.modules_dir / rel).read_bytes())
        names.append(name)
    cpio.file("etc/moru-modules", ("\n".join(names) + "\n").encode())
    cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_bytes(cpio.data())
    tmp.rename(dest)
    return modules


def build_floor_initramfs(dest: Path) -> None:
    """A bare busybox initramfs whose /init prints FLOOR_MARKER and powers off.

    The boot benchmark's floor: the same kernel reaching a userspace init
    with nothing else to do.
    """
    cpio = _base(static_busybox())
    script = f"#!/bin/busybox sh\necho '{FLOOR_MARKER}'\nexec /bin/busybox poweroff -f\n"
    cpio.file("init", script.encode(), 0o755)
    dest.write_bytes(cpio.data())

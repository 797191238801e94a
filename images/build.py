"""Build a template (kernel, initramfs, rootfs, manifest), cached by the hash of its inputs.

Cache layout under images_dir():
  kernels/<release>/            the unpacked, depmod'ed kernel package
  initramfs/<release>-<h>.img   shared by every template on that kernel; unused ones pruned
  builds/<name>-<h>/rootfs.ext4 one directory per content hash, renamed into place
  templates/<name>/manifest.json  what hostd reads; replaced atomically
  stages/, apt-archives/, debs/ reusable intermediate results
A failed build leaves only a temporary directory, removed on the next run.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from images import initramfs as initramfs_mod
from images import rootfs
from images.errors import BuildError
from images.kernel import (
    Kernel,
    KernelPackage,
    current_kernel_package,
    ensure_kernel,
    resolve_kernel_package,
)
from images.manifest import (
    GUESTD_VSOCK_PORT,
    TemplateManifest,
    images_dir,
    manifest_path,
)
from images.recipe import Recipe, load_recipe
from images.tools import (
    check_free_space,
    check_tools,
    log,
    require_root,
    static_busybox,
)

# Bump to rebuild every template after a change the hashed sources do not show.
BUILD_VERSION = "1"
# pcie_ports=native: microvm's ACPI tables grant no native PCIe hotplug (_OSC),
# which pausing to disk needs to unplug and re-plug the vsock device.
# reboot=t: a reboot (busybox init on SIGTERM, or panic=-1 after a panic) is a
# triple fault, which QEMU turns into a reset and -no-reboot into an exit.
# Not reboot=k: microvm has no i8042, so the kernel fell through to a BIOS
# real-mode restart that jumped into the firmware without a reset: the VM hung.
BASE_CMDLINE = (
    "console=ttyS0 root=/dev/vda rw rootfstype=ext4 panic=-1 reboot=t quiet pcie_ports=native"
)
# Free space a build needs besides what is cached: an unpacked root and its image.
BUILD_FREE_BYTES = 3 << 30
# Builds kept per template: the newest and the one before, and any replaced less
# than an hour ago (a sandbox being created may have just read the old manifest).
KEEP_BUILDS = 2
KEEP_REPLACED_SECONDS = 3600
_CODE_FILES = ("build.py", "rootfs.py", "initramfs.py", "kernel.py", "recipe.py")


@dataclass(frozen=True)
class BuildResult:
    manifest: TemplateManifest
    cache_hit: bool
    seconds: float


def code_digest() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256(BUILD_VERSION.encode())
    for name in _CODE_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def content_hash(recipe: Recipe, kernel_pkg: KernelPackage, busybox_digest: str) -> str:
    """Hash of every input of a template build: equal hash, equal image."""
    h = hashlib.sha256()
    for part in (
        code_digest(),
        recipe.digest(),
        rootfs.tree_digest(rootfs.guestd_sources()),
        rootfs.guest_files_digest(),
        f"{kernel_pkg.package}={kernel_pkg.version}",
        busybox_digest,
        "\0".join(rootfs.guestd_requirements()),
    ):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One build at a time per cache: stages and kernels are shared between templates."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clean_stale_tmp(tmp_root: Path) -> None:
    if not tmp_root.is_dir():
        return
    for d in tmp_root.iterdir():
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid():
            continue
        shutil.rmtree(d, ignore_errors=True)


def _gc_builds(root: Path, name: str, keep: Path) -> None:
    """Drop builds beyond KEEP_BUILDS once their successor has been current long enough.

    Times are read before anything is removed: a build replaced by one this loop
    deletes must still be judged by when that successor appeared.
    """
    aged: list[tuple[float, Path]] = []
    for d in (root / "builds").glob(f"{name}-*"):
        if d == keep:
            continue
        try:
            if d.is_dir():
                aged.append((d.stat().st_mtime, d))
        except FileNotFoundError:
            continue  # removed by a concurrent clean-up
    aged.sort(key=lambda t: t[0], reverse=True)
    newest_first = [(keep.stat().st_mtime, keep), *aged]
    now = time.time()
    for i in range(KEEP_BUILDS, len(newest_first)):
        replaced_at = newest_first[i - 1][0]
        if now - replaced_at > KEEP_REPLACED_SECONDS:
            shutil.rmtree(newest_first[i][1], ignore_errors=True)


def _paths_in_use(paths: list[Path]) -> set[Path]:
    """Those of `paths` named on a running process's command line (a VMM's -initrd)."""
    used: set[Path] = set()
    wanted = {str(p).encode(): p for p in paths}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone, or not ours to read
        used.update(wanted[a] for a in args if a in wanted)
    return used


def _gc_initramfs(root: Path, keep: Path) -> None:
    """Drop initramfs images no template uses any more, as carefully as builds.

    Kept: any image a template manifest names, any a running process (a VMM's
    -initrd) names, the KEEP_BUILDS newest, and any whose successor appeared
    less than KEEP_REPLACED_SECONDS ago. Nothing is removed while a manifest
    cannot be read. hostd's records (a sandbox paused to disk, a ready
    snapshot) are not consulted: like an old build, an image gone for a day
    cannot be resumed from.
    """
    named = {keep}
    for path in (root / "templates").glob("*/manifest.json"):
        try:
            named.add(Path(TemplateManifest.from_json(path.read_text()).initramfs))
        except FileNotFoundError:
            continue  # replaced or removed meanwhile
        except (OSError, ValueError, TypeError, KeyError):
            return
    aged: list[tuple[float, Path]] = []
    for f in (root / "initramfs").glob("initramfs-*.img"):
        try:
            aged.append((f.stat().st_mtime, f))
        except FileNotFoundError:
            continue
    aged.sort(key=lambda t: t[0], reverse=True)
    now = time.time()
    doomed = [
        f
        for i, (_, f) in enumerate(aged)
        if i >= KEEP_BUILDS and f not in named and now - aged[i - 1][0] > KEEP_REPLACED_SECONDS
    ]
    for f in set(doomed) - _paths_in_use(doomed):
        log(f"removing unused initramfs {f.name}")
        f.unlink(missing_ok=True)


def _cached(root: Path, name: str, digest: str) -> TemplateManifest | None:
    path = manifest_path(name, root)
    if not path.is_file():
        return None
    try:
        m = TemplateManifest.from_json(path.read_text())
    except (ValueError, TypeError):
        return None
    if m.content_hash != digest:
        return None
    if not all(Path(p).is_file() for p in (m.kernel, m.initramfs, m.rootfs)):
        return None
    return m


class Builder:
    """Builds templates into one cache; resolves the kernel once per instance."""

    def __init__(
        self,
        root: Path | None = None,
        extra_dirs: tuple[Path, ...] = (),
        update_kernel: bool = False,
    ) -> None:
        self.root = (root or images_dir()).resolve()
        self.extra_dirs = extra_dirs
        self._kernel_pkg: KernelPackage | None = None
        self.update_kernel = update_kernel

    def kernel_package(self) -> KernelPackage:
        """The cache's current kernel; apt's candidate when there is none or when updating."""
        if self._kernel_pkg is None:
            if not self.update_kernel:
                self._kernel_pkg = current_kernel_package(self.root)
            if self._kernel_pkg is None:
                check_tools(("apt-cache",))
                self._kernel_pkg = resolve_kernel_package()
        return self._kernel_pkg

    def content_hash(self, recipe: Recipe) -> str:
        busybox = static_busybox()
        bb_digest = hashlib.sha256(busybox.read_bytes()).hexdigest()
        return content_hash(recipe, self.kernel_package(), bb_digest)

    def build(self, name_or_path: str, force: bool = False) -> BuildResult:
        t0 = time.monotonic()
        recipe = load_recipe(name_or_path, self.extra_dirs)
        digest = self.content_hash(recipe)
        if not force and (hit := _cached(self.root, recipe.name, digest)):
            return BuildResult(hit, True, time.monotonic() - t0)
        require_root()
        check_tools()
        check_free_space(self.root, BUILD_FREE_BYTES, f"building {recipe.name}")
        with _locked(self.root):
            if not force and (hit := _cached(self.root, recipe.name, digest)):
                return BuildResult(hit, True, time.monotonic() - t0)
            manifest = self._build_locked(recipe, digest)
        return BuildResult(manifest, False, time.monotonic() - t0)

    def _initramfs(self, kernel: Kernel) -> Path:
        d = self.root / "initramfs"
        d.mkdir(parents=True, exist_ok=True)
        digest = initramfs_mod.initramfs_inputs_digest(kernel)[:16]
        out = d / f"initramfs-{kernel.pkg.release}-{digest}.img"
        if not out.is_file():
            log(f"building initramfs for {kernel.pkg.release}")
            initramfs_mod.build_initramfs(kernel, out)
        return out

    def _build_locked(self, recipe: Recipe, digest: str) -> TemplateManifest:
        log(f"building template {recipe.name} ({digest[:16]})")
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        _clean_stale_tmp(tmp_root)
        kernel = ensure_kernel(self.root, self.kernel_package())
        initrd = self._initramfs(kernel)
        tar = rootfs.ensure_debootstrap(self.root, recipe)
        guestd_wheels = rootfs.ensure_wheels(self.root, rootfs.guestd_requirements())
        user_wheels = rootfs.ensure_wheels(self.root, list(recipe.pip)) if recipe.pip else None

        final = self.root / "builds" / f"{recipe.name}-{digest[:16]}"
        work = tmp_root / f"{recipe.name}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            disk_bytes = recipe.defaults.disk_mb << 20
            info = {
                "MORU_TEMPLATE": recipe.name,
                "MORU_CONTENT_HASH": digest,
                "MORU_ROOTFS_BYTES": str(disk_bytes),
                "MORU_GUESTD_PORT": str(GUESTD_VSOCK_PORT),
                "MORU_KERNEL": kernel.pkg.release,
            }
            log(f"assembling the {recipe.name} rootfs")
            rootfs.assemble(work / "root", recipe, tar, guestd_wheels, user_wheels, info)
            out_dir = work / "out"
            out_dir.mkdir()
            log(f"mkfs.ext4 -d ({recipe.defaults.disk_mb} MiB, sparse)")
            rootfs.make_ext4(
                work / "root",
                out_dir / "rootfs.ext4",
                recipe.defaults.disk_mb,
                f"moru-{recipe.name}",
            )
            shutil.rmtree(work / "root")
            if final.exists():
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            out_dir.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        image = final / "rootfs.ext4"
        manifest = TemplateManifest(
            name=recipe.name,
            content_hash=digest,
            kernel=str(kernel.vmlinuz),
            kernel_version=kernel.pkg.release,
            initramfs=str(initrd),
            rootfs=str(image),
            kernel_cmdline=BASE_CMDLINE,
            defaults=recipe.defaults,
            guestd_port=GUESTD_VSOCK_PORT,
            env=dict(recipe.env),
            built_at=time.time(),
            rootfs_bytes=image.stat().st_size,
            kernel_package=f"{kernel.pkg.package}={kernel.pkg.version}",
            description=recipe.description,
        )
        path = manifest_path(recipe.name, self.root)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".manifest.{os.getpid()}.tmp")
        tmp.write_text(manifest.to_json() + "\n")
        tmp.rename(path)
        _gc_builds(self.root, recipe.name, final)
        _gc_initramfs(self.root, initrd)
        log(f"built {recipe.name}: {image} ({image.stat().st_blocks * 512 >> 20} MiB used)")
        return manifest


def ensure_built(
    names: list[str], root: Path | None = None, force: bool = False
) -> list[BuildResult]:
    """Build (or find in the cache) each named template."""
    if not names:
        raise BuildError("name at least one template to build")
    builder = Builder(root)
    return [builder.build(n, force) for n in names]

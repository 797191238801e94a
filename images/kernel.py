"""The guest kernel: Debian's linux-image-cloud-amd64, fetched with apt and unpacked into the cache.

The cloud kernel builds ext4 in but virtio, virtio-mmio, virtio-blk,
virtio-net and vsock as modules, so we also resolve those modules (with
depmod's modules.dep) in the order the initramfs must load them.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from images.errors import BuildError
from images.tools import log, run, which

META_PACKAGE = "linux-image-cloud-amd64"

# Modules the initramfs loads, in the order asked; dependencies are added first.
REQUIRED_MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    # PCI transport: hostd puts the vsock device on a hot-pluggable PCIe port
    # so a sandbox can be paused to disk (hostd/vmm/qemu/pci.py).
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
)
# Loaded when the kernel has them. None today: each module costs boot time under
# TCG, and the kernel's jitter entropy initialises the RNG early enough.
OPTIONAL_MODULES: tuple[str, ...] = ()


@dataclass(frozen=True)
class KernelPackage:
    package: str  # e.g. linux-image-6.1.0-56-cloud-amd64
    version: str  # Debian package version, e.g. 6.1.192-2
    release: str  # uname -r, e.g. 6.1.0-56-cloud-amd64


@dataclass(frozen=True)
class Kernel:
    pkg: KernelPackage
    root: Path  # the extracted package, depmod'ed

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.pkg.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.pkg.release


def _apt_show(package: str) -> dict[str, str]:
    out = run(
        [which("apt-cache"), "show", "--no-all-versions", package],
        what=f"apt-cache show {package}",
        capture=True,
    )
    fields: dict[str, str] = {}
    for line in out.splitlines():
        if line and not line[0].isspace() and ":" in line:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    if "Version" not in fields:
        raise BuildError(f"apt knows no package {package}; run `apt-get update`")
    return fields


def resolve_kernel_package() -> KernelPackage:
    """The exact kernel package apt would install for linux-image-cloud-amd64 today."""
    meta = _apt_show(META_PACKAGE)
    target = ""
    for dep in meta.get("Depends", "").split(","):
        name = dep.strip().split(" ")[0]
        if name.startswith("linux-image-") and name != META_PACKAGE:
            target = name
            break
    if not target:
        raise BuildError(f"cannot find the kernel package {META_PACKAGE} depends on")
    real = _apt_show(target)
    return KernelPackage(target, real["Version"], target.removeprefix("linux-image-"))


def current_kernel_package(cache: Path) -> KernelPackage | None:
    """The kernel the cache was last built with (asking apt costs seconds, too slow for hits)."""
    try:
        package, _, version = (cache / "kernels" / "current").read_text().strip().partition("=")
    except FileNotFoundError:
        return None
    if not package.startswith("linux-image-") or not version:
        return None
    pkg = KernelPackage(package, version, package.removeprefix("linux-image-"))
    stamp = cache / "kernels" / pkg.release / ".package"
    return pkg if stamp.is_file() else None


def ensure_kernel(cache: Path, pkg: KernelPackage) -> Kernel:
    """Download and unpack `pkg` into cache/kernels/<release> unless it is already there."""
    dest = cache / "kernels" / pkg.release
    kernel = Kernel(pkg, dest)
    stamp = dest / ".package"
    current = cache / "kernels" / "current"
    if stamp.is_file() and stamp.read_text().strip() == f"{pkg.package}={pkg.version}":
        current.write_text(f"{pkg.package}={pkg.version}\n")
        return kernel
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    deb = debs / f"{pkg.package}_{pkg.version.replace(':', '%3a')}_amd64.deb"
    if not deb.is_file():
        log(f"downloading {pkg.package}={pkg.version}")
        with tempfile.TemporaryDirectory(dir=debs, prefix=".dl-") as tmp:
            # apt's sandbox user cannot write into root's cache; that is only a warning.
            run(
                [which("apt-get"), "download", "-q", f"{pkg.package}={pkg.version}"],
                what=f"apt-get download {pkg.package}",
                cwd=Path(tmp),
            )
            got = list(Path(tmp).glob("*.deb"))
            if len(got) != 1:
                raise BuildError(f"apt-get download {pkg.package} produced {got}")
            got[0].rename(deb)
    log(f"unpacking kernel {pkg.release}")
    (cache / "kernels").mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(dir=cache / "kernels", prefix=f".{pkg.release}-"))
    tmpdir.chmod(0o755)
    try:
        run([which("dpkg-deb"), "-x", deb, tmpdir], what="dpkg-deb -x")
        run([which("depmod"), "-b", tmpdir, pkg.release], what="depmod")
        (tmpdir / ".package").write_text(f"{pkg.package}={pkg.version}\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmpdir.rename(dest)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    current.write_text(f"{pkg.package}={pkg.version}\n")
    return kernel


def _modname(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.zst", ".ko.xz", ".ko.gz", ".ko"):
        base = base.removesuffix(suffix)
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep -> {module name: (relative path, [dependency paths])}."""
    out: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        out[_modname(path)] = (path.strip(), deps.split())
    return out


def resolve_modules(
    modules_dir: Path,
    required: tuple[str, ...] = REQUIRED_MODULES,
    optional: tuple[str, ...] = OPTIONAL_MODULES,
) -> list[str]:
    """Relative module paths to load, each after everything it depends on.

    Built-in modules are skipped; a required module the kernel lacks is an
    error, a missing optional one is left out.
    """
    deps = parse_modules_dep((modules_dir / "modules.dep").read_text())
    builtin_file = modules_dir / "modules.builtin"
    builtin = set()
    if builtin_file.is_file():
        builtin = {_modname(line) for line in builtin_file.read_text().split()}
    by_path = {path: name for name, (path, _) in deps.items()}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        path, dep_paths = deps[name]
        if path in order:
            return
        if name in visiting:
            raise BuildError(f"module dependency cycle at {name}")
        visiting.add(name)
        # modules.dep lists the deepest dependencies last; load them first.
        for dep in reversed(dep_paths):
            visit(by_path.get(dep, _modname(dep)))
        visiting.discard(name)
        order.append(path)

    for want in required + optional:
        name = want.replace("-", "_")
        if name in builtin:
            continue
        if name not in deps:
            if want in optional:
                continue
            raise BuildError(f"kernel module {want} not found in {modules_dir}/modules.dep")
        visit(name)
    return order

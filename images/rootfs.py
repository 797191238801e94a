"""Template root filesystems: mmdebstrap, guestd, wheels and the guest init, via mkfs.ext4 -d.

Two stages are cached by their inputs so a change to guestd or to a recipe's
files does not redo the slow parts: the mmdebstrap tarball (per package set
and run commands) and each `pip install --target` tree (per requirement set).
"""

from __future__ import annotations

import compileall
import hashlib
import importlib.metadata
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from images.errors import BuildError
from images.recipe import Recipe
from images.tools import log, run, which

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = Path(__file__).resolve().parent / "guest"
SUITE = "bookworm"
SUITES = (SUITE, f"{SUITE}-updates", f"{SUITE}-security")
GUEST_PYTHON = "3.11"
# What every template needs whatever its recipe says: guestd's interpreter, the
# init's busybox, resize2fs for growing the disk, and TLS roots.
ESSENTIAL_APT = ("python3", "busybox-static", "e2fsprogs", "ca-certificates")
# guestd's runtime distributions, pinned to the versions the host runs and tests.
GUESTD_DISTS = ("grpcio", "protobuf", "uvloop")
GUESTD_PACKAGES = ("guestd", "moru_proto")
# Bump when the mmdebstrap stage changes shape (hooks, dpkg options).
STAGE_VERSION = "1"
USER_NAME, USER_UID = "user", 1000
# Where things live in the guest.
G_LIB = "/opt/moru/lib"
G_SITE = "/opt/moru/site-packages"
G_USER_SITE = f"/usr/local/lib/python{GUEST_PYTHON}/dist-packages"
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)

# Links every /dev has that devtmpfs does not make (rc.sh copies them in).
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}

INITTAB = """\
# moru guest init (busybox init): SIGUSR2 powers off, SIGTERM reboots, orphans are reaped.
::sysinit:/opt/moru/init/rc.sh
::respawn:/opt/moru/init/guestd-loop.sh
::shutdown:/opt/moru/init/shutdown.sh
"""

LAUNCHER = f"""\
#!/usr/bin/python3 -IS
# moru guestd launcher: runs the bundled guestd with its own wheels on sys.path,
# without a PYTHONPATH that would leak them into the processes guestd starts
# (-I: ignore PYTHON* variables and user site; -S: skip site, a cost on every boot).
# No garbage collection while importing (5-8% of the import time, which is most
# of a TCG boot); the imported objects are then frozen out of later collections.
import gc
import sys

gc.disable()
sys.path[:0] = ["{G_LIB}", "{G_SITE}"]
from guestd.__main__ import main

gc.freeze()
gc.enable()
sys.exit(main())
"""


def apt_mirrors() -> list[str]:
    """`deb URI SUITE main` lines for bookworm, -updates and -security from apt's own config."""
    lines: list[str] = []
    d = Path("/etc/apt/sources.list.d")
    for f in sorted(d.glob("*.sources")) if d.is_dir() else []:
        for stanza in f.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line and not line.startswith("#") and ":" in line and not line[0].isspace():
                    k, _, v = line.partition(":")
                    fields[k.strip().lower()] = v.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    if suite in SUITES:
                        lines.append(f"deb {uri} {suite} main")
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] in SUITES:
                lines.append(f"deb {parts[1]} {parts[2]} main")
    lines = list(dict.fromkeys(lines))
    if not any(f" {SUITE} " in ln for ln in lines):
        raise BuildError(
            f"no Debian {SUITE} mirror in /etc/apt/sources.list(.d); add one to apt's configuration"
        )
    return lines


def tree_digest(paths: Iterable[Path], h: hashlib._Hash | None = None) -> str:
    """Hash of the source files under `paths` (ignoring bytecode caches)."""
    h = h or hashlib.sha256()
    for root in paths:
        for p in sorted(root.rglob("*")):
            if "__pycache__" in p.parts or p.suffix == ".pyc" or not p.is_file():
                continue
            h.update(str(p.relative_to(root.parent)).encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


def guestd_sources() -> list[Path]:
    out = []
    for pkg in GUESTD_PACKAGES:
        p = REPO / pkg
        if not p.is_dir():
            raise BuildError(f"guestd sources missing: no {p}")
        if not (p / "__init__.py").is_file():
            # Still build: the guest init then shows guestd failing and being restarted.
            log(f"warning: {p}/__init__.py is missing; guestd will not start in this image")
        out.append(p)
    return out


def guestd_requirements() -> list[str]:
    reqs = []
    for dist in GUESTD_DISTS:
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def guest_files_digest() -> str:
    h = hashlib.sha256(INITTAB.encode() + LAUNCHER.encode())
    for p in sorted(GUEST_DIR.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


# --- stage 1: mmdebstrap ---------------------------------------------------------------


def debootstrap_key(recipe: Recipe, mirrors: list[str]) -> str:
    h = hashlib.sha256(f"v{STAGE_VERSION}\0{SUITE}\0".encode())
    h.update("\n".join(mirrors).encode())
    h.update("\0".join(sorted({*ESSENTIAL_APT, *recipe.apt})).encode())
    h.update("\0".join(recipe.run).encode())
    return h.hexdigest()[:20]


def ensure_debootstrap(cache: Path, recipe: Recipe) -> Path:
    """A tarball of the template's Debian root (packages, user account, run commands)."""
    mirrors = apt_mirrors()
    stages = cache / "stages"
    stages.mkdir(parents=True, exist_ok=True)
    out = stages / f"debootstrap-{debootstrap_key(recipe, mirrors)}.tar"
    if out.is_file():
        return out
    archives = cache / "apt-archives"
    archives.mkdir(parents=True, exist_ok=True)
    packages = ",".join(sorted({*ESSENTIAL_APT, *recipe.apt}))
    log(f"mmdebstrap {SUITE} for {recipe.name} ({len(packages.split(','))} packages)")
    user = (
        f'chroot "$1" useradd --create-home --uid {USER_UID} --user-group '
        f"--shell /bin/bash {USER_NAME}"
    )
    cmd: list[str] = [
        which("mmdebstrap"),
        "--variant=minbase",
        "--mode=root",
        "--format=tar",
        f"--include={packages}",
        "--skip=essential/unlink",
        # Reuse downloaded .debs across builds: templates share most packages.
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
        f"--setup-hook=sync-in {shlex.quote(str(archives))} /var/cache/apt/archives/",
        *(f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES),
        f"--customize-hook={user}",
        *(f'--customize-hook=chroot "$1" /bin/sh -c {shlex.quote(c)}' for c in recipe.run),
        f"--customize-hook=sync-out /var/cache/apt/archives {shlex.quote(str(archives))}",
    ]
    tmp = stages / f".{out.name}.{os.getpid()}.tmp"
    try:
        run([*cmd, SUITE, tmp, *mirrors], what=f"mmdebstrap for {recipe.name}")
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# --- stage 2: wheels ---------------------------------------------------------------------


def _platforms() -> list[str]:
    # The guest's glibc is 2.36: accept manylinux wheels up to it.
    tags = ["manylinux2014_x86_64"]
    tags += [f"manylinux_2_{minor}_x86_64" for minor in range(17, 37)]
    return tags


def ensure_wheels(cache: Path, requirements: list[str]) -> Path:
    """`pip install --target` of binary wheels for the guest's CPython, cached per requirements."""
    plat = _platforms()
    key = hashlib.sha256("\0".join([GUEST_PYTHON, *plat, *requirements]).encode()).hexdigest()
    out = cache / "stages" / f"pip-{key[:20]}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"pip install --target for python {GUEST_PYTHON}: {' '.join(requirements)}")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    tmp.chmod(0o755)
    try:
        cmd = [
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "--no-warn-script-location", "--no-compile", "--target", str(tmp),
            "--only-binary=:all:", "--python-version", GUEST_PYTHON, "--implementation", "cp",
            "--abi", f"cp{GUEST_PYTHON.replace('.', '')}", "--abi", "abi3", "--abi", "none",
            *(f"--platform={p}" for p in plat), *requirements,
        ]  # fmt: skip
        try:
            run(cmd, what="pip install (binary wheels for the guest)")
        except BuildError as e:
            raise BuildError(
                f"{e}\nhint: guest pip packages must be available as manylinux wheels for "
                f"CPython {GUEST_PYTHON}; install source-only packages with a `run` command instead"
            ) from None
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- assembly ----------------------------------------------------------------------------


def _copy_tree(src: Path, dest: Path) -> None:
    shutil.copytree(
        src, dest, symlinks=True, dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )  # fmt: skip


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _env_lines(env: dict[str, str], export: bool) -> str:
    prefix = "export " if export else ""
    quote = shlex.quote if export else (lambda v: v)
    return "".join(f"{prefix}{k}={quote(v)}\n" for k, v in sorted(env.items()))


def _install_user_wheels(tree: Path, root: Path) -> None:
    """Recipe pip packages go where the guest's python3 finds them; scripts to /usr/local/bin."""
    site = root / G_USER_SITE.lstrip("/")
    _copy_tree(tree, site)
    bindir = site / "bin"
    if bindir.is_dir():
        dest = root / "usr/local/bin"
        dest.mkdir(parents=True, exist_ok=True)
        for script in bindir.iterdir():
            data = script.read_bytes()
            if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
                data = b"#!/usr/bin/python3\n" + data.split(b"\n", 1)[1]
            (dest / script.name).write_bytes(data)
            (dest / script.name).chmod(0o755)
        shutil.rmtree(bindir)


def assemble(
    root: Path,
    recipe: Recipe,
    debootstrap_tar: Path,
    guestd_wheels: Path,
    user_wheels: Path | None,
    image_info: dict[str, str],
) -> None:
    """Unpack the Debian root into `root` and add guestd, wheels, recipe files and the init."""
    root.mkdir(parents=True)
    run([which("tar"), "-xpf", debootstrap_tar, "-C", root, "--numeric-owner"], what="tar -x")
    if not (root / f"usr/bin/python{GUEST_PYTHON}").exists():
        raise BuildError(f"the rootfs has no python{GUEST_PYTHON}; guestd needs it")
    for src in guestd_sources():
        _copy_tree(src, root / G_LIB.lstrip("/") / src.name)
    _copy_tree(guestd_wheels, root / G_SITE.lstrip("/"))
    shutil.rmtree(root / G_SITE.lstrip("/") / "bin", ignore_errors=True)
    if user_wheels is not None:
        _install_user_wheels(user_wheels, root)
    for f in recipe.files:
        dest = root / f.dest.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.src.is_dir():
            shutil.copytree(f.src, dest, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(f.src, dest)
        if f.mode is not None:
            dest.chmod(f.mode)
    # The guest init: busybox init with our inittab and scripts.
    init_dir = root / "opt/moru/init"
    init_dir.mkdir(parents=True, exist_ok=True)
    for script in ("rc.sh", "guestd-loop.sh", "shutdown.sh"):
        shutil.copy2(GUEST_DIR / script, init_dir / script)
        (init_dir / script).chmod(0o755)
    # What rc.sh copies onto the devtmpfs in one `cp -a`, and mounts in one `mount -a`.
    dev = init_dir / "dev"
    for d in ("pts", "shm"):
        (dev / d).mkdir(parents=True, exist_ok=True)
    for name, target in DEV_LINKS.items():
        (dev / name).unlink(missing_ok=True)
        (dev / name).symlink_to(target)
    (root / "etc/fstab").unlink(missing_ok=True)
    _write(root / "etc/fstab", (GUEST_DIR / "fstab").read_text())
    bindir = root / "opt/moru/bin"
    bindir.mkdir(parents=True, exist_ok=True)
    (bindir / "init").symlink_to("/bin/busybox")
    _write(bindir / "guestd", LAUNCHER, 0o755)
    local_guestd = root / "usr/local/bin/guestd"
    local_guestd.unlink(missing_ok=True)
    local_guestd.symlink_to("/opt/moru/bin/guestd")
    _write(root / "etc/inittab", INITTAB)
    _write(root / "etc/moru/image", _env_lines(image_info, export=False))
    _write(root / "etc/moru/env", _env_lines(recipe.env, export=True))
    _write(root / "etc/profile.d/moru.sh", _env_lines(recipe.env, export=True))
    _write(root / "etc/environment", _env_lines(recipe.env, export=False))
    _write(root / "etc/hostname", "moru\n")
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    _write(resolv, "# written by the moru guest init from moru.net=\n")
    # Bytecode now, so the guest does not compile guestd and grpc on every boot
    # (the rootfs under a sandbox is a throwaway copy). Same magic across 3.11.x.
    if sys.version_info[:2] == tuple(int(x) for x in GUEST_PYTHON.split(".")):
        for guest_dir in (G_LIB, G_SITE, G_USER_SITE):
            host_dir = root / guest_dir.lstrip("/")
            if host_dir.is_dir():
                compileall.compile_dir(host_dir, ddir=guest_dir, quiet=1, workers=2)


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def make_ext4(root: Path, dest: Path, size_mb: int, label: str) -> None:
    """A sparse ext4 image of size_mb holding `root`, made without a loop mount."""
    used = tree_bytes(root)
    if used * 1.15 + (64 << 20) > size_mb << 20:
        raise BuildError(
            f"the rootfs holds {used >> 20} MiB, too much for defaults.disk_mb = {size_mb}; "
            "raise disk_mb in the recipe"
        )
    with open(dest, "wb") as f:
        f.truncate(size_mb << 20)
    cmd = [
        which("mkfs.ext4"), "-q", "-F", "-L", label[:16], "-d", str(root), "-m", "0",
        "-E", "root_owner=0:0,nodiscard", str(dest), f"{size_mb}M",
    ]  # fmt: skip
    run(cmd, what="mkfs.ext4 -d")

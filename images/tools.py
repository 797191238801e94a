"""Host tools the builder shells out to, checked up front so a missing one is a clear error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from images.errors import BuildError

# tool -> Debian package that provides it.
TOOLS: dict[str, str] = {
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "depmod": "kmod",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
    "apt-cache": "apt",
    "tar": "tar",
    "busybox": "busybox-static",
}
# busybox-static's binary; the dynamic `busybox` package would not run in the initramfs.
BUSYBOX_CANDIDATES = ("/usr/bin/busybox", "/bin/busybox")


def search_path() -> str:
    """$PATH plus the sbin directories (root's tools live there; sudo may drop them)."""
    return os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def which(tool: str, path: str | None = None) -> str:
    """Absolute path of `tool`, or a BuildError naming the package to install."""
    found = shutil.which(tool, path=search_path() if path is None else path)
    if found is None:
        pkg = TOOLS.get(tool, tool)
        raise BuildError(f"`{tool}` not found: install it with `apt-get install {pkg}`")
    return found


def check_tools(tools: Sequence[str] = tuple(TOOLS), path: str | None = None) -> None:
    """Fail early, naming every missing tool and its package at once."""
    missing = []
    for tool in tools:
        try:
            which(tool, path)
        except BuildError:
            missing.append(tool)
    if missing:
        pkgs = " ".join(sorted({TOOLS.get(t, t) for t in missing}))
        raise BuildError(
            f"missing build tools: {', '.join(missing)}; install them with `apt-get install {pkgs}`"
        )


def static_busybox() -> Path:
    """The host's statically linked busybox (from busybox-static)."""
    for cand in BUSYBOX_CANDIDATES:
        p = Path(cand)
        if p.is_file() and not has_interpreter(p):
            return p
    raise BuildError(
        "no statically linked busybox found: install it with `apt-get install busybox-static`"
    )


def has_interpreter(path: Path) -> bool:
    """True when an ELF file asks for a dynamic loader (PT_INTERP), i.e. is not static."""
    data = path.read_bytes()[:65536]
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit ELF only
        return True
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
            return True
    return False


def check_free_space(path: Path, need_bytes: int, what: str) -> None:
    """Refuse to start a build that would fill the disk halfway through."""
    path.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if free < need_bytes:
        raise BuildError(
            f"not enough free disk space for {what}: {free >> 20} MiB free in {path}, "
            f"need {need_bytes >> 20} MiB; free some space or set MORU_IMAGES_DIR elsewhere"
        )


def require_root() -> None:
    if os.geteuid() != 0:
        raise BuildError("building images needs root (mmdebstrap, file ownership in the rootfs)")


def log(msg: str) -> None:
    print(f"[moru-images] {msg}", file=sys.stderr, flush=True)


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    what: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    capture: bool = False,
) -> str:
    """Run a command; on failure raise a BuildError with its tail of output."""
    argv = [os.fspath(c) for c in cmd]
    proc = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if not capture else subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        out = (proc.stdout or "") + (proc.stderr or "")
        tail = "\n".join(out.strip().splitlines()[-25:])
        raise BuildError(f"{what} failed (exit {proc.returncode}): {argv[0]} ...\n{tail}")
    return proc.stdout or ""

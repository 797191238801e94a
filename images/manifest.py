"""The manifest of a built template: the one contract between image builds and hostd.

`moru-images build NAME` writes `<images_dir>/templates/NAME/manifest.json`;
hostd only ever reads it through `load_manifest`, so the layout of the cache
can change without hostd noticing.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

DEFAULT_IMAGES_DIR = Path("/var/lib/moru/images")
# vsock port guestd listens on inside every guest.
GUESTD_VSOCK_PORT = 50051


def images_dir() -> Path:
    """The image cache: $MORU_IMAGES_DIR, else /var/lib/moru/images."""
    return Path(os.environ.get("MORU_IMAGES_DIR", str(DEFAULT_IMAGES_DIR)))


class TemplateNotFound(LookupError):
    """No built template of that name in the image cache."""


@dataclass(frozen=True)
class TemplateDefaults:
    vcpus: int = 2
    memory_mb: int = 512
    disk_mb: int = 2048


@dataclass(frozen=True)
class TemplateManifest:
    name: str
    # Hash of everything the build read (recipe, guestd sources, kernel
    # version, build scripts): equal hash, equal image.
    content_hash: str
    kernel: str  # absolute path of the vmlinuz
    kernel_version: str  # e.g. "6.1.0-37-cloud-amd64"
    initramfs: str  # absolute path
    rootfs: str  # absolute path of the raw ext4 image (read-only base)
    # Kernel command line; the VMM appends per-sandbox parameters
    # (moru.net=..., moru.hostname=...) to it.
    kernel_cmdline: str
    defaults: TemplateDefaults = field(default_factory=TemplateDefaults)
    guestd_port: int = GUESTD_VSOCK_PORT
    # Environment the image gives every process (lowest precedence).
    env: dict[str, str] = field(default_factory=dict)
    built_at: float = 0.0  # unix seconds
    rootfs_bytes: int = 0
    # The exact Debian kernel package, e.g. "linux-image-6.1.0-56-cloud-amd64=6.1.192-2".
    kernel_package: str = ""
    description: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TemplateManifest:
        data = json.loads(text)
        data["defaults"] = TemplateDefaults(**data.get("defaults", {}))
        # Ignore fields a newer builder added, so an older hostd still reads the manifest.
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def manifest_path(name: str, root: Path | None = None) -> Path:
    return (root or images_dir()) / "templates" / name / "manifest.json"


def load_manifest(name: str, root: Path | None = None) -> TemplateManifest:
    path = manifest_path(name, root)
    try:
        return TemplateManifest.from_json(path.read_text())
    except FileNotFoundError:
        raise TemplateNotFound(
            f"template {name!r} is not built (no {path}); build it with `moru-images build {name}`"
        ) from None


def list_manifests(root: Path | None = None) -> list[TemplateManifest]:
    base = (root or images_dir()) / "templates"
    if not base.is_dir():
        return []
    out = []
    for d in sorted(base.iterdir()):
        if (d / "manifest.json").is_file():
            out.append(load_manifest(d.name, root))
    return out

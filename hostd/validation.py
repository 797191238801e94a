"""Input checks for the host API; every failure names the offending field."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from hostd.errors import InvalidArgument

SANDBOX_ID_RE = re.compile(r"^sbx_[a-z0-9]{20}$")
TEMPLATE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_ENV_BYTES = 128 * 1024
MAX_METADATA_KEY = 256
MAX_NETWORK_RULES = 256


def sandbox_id(value: str, field: str = "sandbox_id") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if not SANDBOX_ID_RE.match(value):
        raise InvalidArgument(field, f"{value[:80]!r} is not a sandbox id (sbx_ + 20 of a-z0-9)")
    return value


def template(value: str) -> str:
    name = value or "base"
    if not TEMPLATE_RE.match(name):
        raise InvalidArgument("template", f"{name[:80]!r} is not a template name")
    return name


def timeout(value: int, max_seconds: int, field: str = "timeout_seconds") -> int:
    if value <= 0:
        raise InvalidArgument(field, f"must be at least 1 second, got {value}")
    if value > max_seconds:
        raise InvalidArgument(field, f"{value} s is above this node's maximum of {max_seconds} s")
    return value


def metadata(value: Mapping[str, str], max_entries: int, max_bytes: int) -> dict[str, str]:
    if len(value) > max_entries:
        raise InvalidArgument("metadata", f"{len(value)} entries; at most {max_entries}")
    total = 0
    for k, v in value.items():
        if not k:
            raise InvalidArgument("metadata", "keys must not be empty")
        if len(k) > MAX_METADATA_KEY:
            raise InvalidArgument(f"metadata[{k[:40]!r}...]", f"key longer than {MAX_METADATA_KEY}")
        total += len(k.encode()) + len(v.encode())
    if total > max_bytes:
        raise InvalidArgument("metadata", f"{total} bytes in total; at most {max_bytes}")
    return dict(value)


def envs(value: Mapping[str, str]) -> dict[str, str]:
    total = 0
    for k, v in value.items():
        if not ENV_KEY_RE.match(k):
            raise InvalidArgument(f"envs[{k[:40]!r}]", "not a valid environment variable name")
        if "\0" in v:
            raise InvalidArgument(f"envs[{k!r}]", "value contains a NUL byte")
        total += len(k) + len(v.encode())
    if total > MAX_ENV_BYTES:
        raise InvalidArgument("envs", f"{total} bytes in total; at most {MAX_ENV_BYTES}")
    return dict(value)


def network_rules(value: Sequence[str], field: str) -> list[str]:
    """IPv4 addresses, CIDRs or domain names (optionally `*.` wildcards), as given."""
    from hostd.network.policy import parse_entry

    if len(value) > MAX_NETWORK_RULES:
        raise InvalidArgument(field, f"{len(value)} entries; at most {MAX_NETWORK_RULES}")
    for i, entry in enumerate(value):
        try:
            parse_entry(entry)
        except ValueError as e:
            raise InvalidArgument(f"{field}[{i}]", str(e)) from None
    return [e.strip() for e in value]


def resources(vcpus: int, memory_mb: int, disk_mb: int) -> None:
    """Ranges only; defaults (0) are filled from the template before this."""
    ncpu = os.cpu_count() or 1
    if not 1 <= vcpus <= max(ncpu, 1) * 4:
        raise InvalidArgument("vcpus", f"{vcpus} is outside 1..{ncpu * 4}")
    if not 128 <= memory_mb <= 1 << 20:
        raise InvalidArgument("memory_mb", f"{memory_mb} is outside 128..{1 << 20}")
    if not 256 <= disk_mb <= 1 << 21:
        raise InvalidArgument("disk_mb", f"{disk_mb} is outside 256..{1 << 21}")


def volume(volume_id: str, mount_path: str) -> None:
    if mount_path and not volume_id:
        raise InvalidArgument("volume_mount_path", "given without volume_id")
    if volume_id:
        from hostd.volumes.manager import check_mount_path, check_volume_id

        check_volume_id(volume_id)
        check_mount_path(mount_path)


def port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise InvalidArgument("port", f"{value} is outside 1..65535")
    return value

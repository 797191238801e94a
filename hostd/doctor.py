"""`moru-hostd doctor`: can this machine run sandboxes? Each check says what to install."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hostd.config import Config


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    # A missing optional piece warns; a missing required one fails.
    required: bool = True


def _kvm() -> Check:
    from hostd.vmm.accel import kvm_usable

    if kvm_usable():
        return Check("kvm", True, "/dev/kvm backed by kvm_intel/kvm_amd: VMs use KVM", False)
    why = "no /dev/kvm" if not Path("/dev/kvm").exists() else "/dev/kvm without kvm_intel/kvm_amd"
    return Check("kvm", False, f"{why}: VMs run under TCG (slower, works)", False)


def _binary(name: str, package: str) -> Check:
    path = shutil.which(name)
    if path:
        return Check(name, True, path)
    return Check(name, False, f"not found: apt-get install {package}")


def _cgroups() -> Check:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        ctrls = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
        need = {"cpu", "memory", "pids"}
        missing = need - set(ctrls)
        if missing:
            return Check("cgroups", False, f"v2 without controllers {sorted(missing)}")
        return Check("cgroups", True, "v2 (cpu, memory, pids)")
    v1 = [c for c in ("cpu", "memory", "pids", "freezer") if Path(f"/sys/fs/cgroup/{c}").is_dir()]
    if len(v1) == 4:
        return Check("cgroups", True, "v1 (cpu, memory, pids, freezer)")
    return Check("cgroups", False, f"v1 controllers found: {v1}; need cpu, memory, pids, freezer")


def _images(config: Config) -> Check:
    from images.manifest import list_manifests

    try:
        names = [m.name for m in list_manifests(config.images_path)]
    except (OSError, ValueError) as e:
        return Check("images", False, f"{config.images_path}: {e}")
    if not names:
        return Check(
            "images", False, f"no templates in {config.images_path}: run `moru-images build base`"
        )
    return Check("images", True, f"{', '.join(names)} in {config.images_path}")


def _nft() -> Check:
    nft = shutil.which("nft")
    if not nft:
        return Check("nftables", False, "nft not found: apt-get install nftables", False)
    r = subprocess.run([nft, "list", "tables"], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        return Check("nftables", False, f"nft does not work: {r.stderr.strip()}", False)
    return Check("nftables", True, nft, False)


def _warm_pool(config: Config) -> Check:
    """What the warm pool will keep and whether it fits the node's limits."""
    from hostd.resources import host_memory_mb
    from images.manifest import TemplateNotFound, load_manifest

    entries = [e for e in config.warm_pool_entries() if e.count > 0]
    if not entries:
        return Check("warm_pool", True, "off (warm_pool = {base = 2} keeps 2 ready)", False)
    parts, members, memory = [], 0, 0
    for e in entries:
        try:
            d = load_manifest(e.template, config.images_path).defaults
        except (TemplateNotFound, OSError, ValueError):
            return Check("warm_pool", False, f"template {e.template!r} is not built", False)
        mem = e.memory_mb or d.memory_mb
        members += e.count
        memory += e.count * mem
        disk = e.disk_mb or d.disk_mb
        vcpus = e.vcpus or d.vcpus
        parts.append(f"{e.template} x{e.count} ({vcpus} vCPU, {mem} MB, {disk} MB disk)")
    budget = config.memory_budget_mb or int(host_memory_mb() * 0.8)
    detail = f"{', '.join(parts)}: {members} of max_sandboxes={config.max_sandboxes}, {memory} MB"
    detail += f" of {budget} MB"
    if members + 1 > config.max_sandboxes or memory >= budget:
        return Check("warm_pool", False, detail + "; the pool will keep fewer (room for a sandbox"
                     " is always left)", False)  # fmt: skip
    return Check("warm_pool", True, detail, False)


def run_checks(config: Config) -> list[Check]:
    return [
        Check("root", os.geteuid() == 0, "hostd needs root (cgroups, tap devices, netns)"),
        _kvm(),
        _binary("qemu-system-x86_64", "qemu-system-x86"),
        _binary(
            "vhost-device-vsock",
            "vhost-device-vsock (from Debian unstable; see scripts/install.sh)",
        ),
        _cgroups(),
        _nft(),
        _binary("dnsmasq", "dnsmasq-base")
        if config.network.enabled
        else Check("dnsmasq", True, "networking off", False),
        _images(config),
        _warm_pool(config),
    ]


def report(checks: list[Check]) -> tuple[str, bool]:
    lines = []
    ok = True
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        ok = ok and (c.ok or not c.required)
        lines.append(f"[{mark}] {c.name:<20} {c.detail}")
    return "\n".join(lines), ok

"""A VmSpec as JSON in the run directory (`RunDir.spec`): for re-attach, restore, operators."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hostd.rundir import RunDir
from hostd.vmm.base import NetAttachment, VmError, VmSpec


def spec_to_json(spec: VmSpec) -> str:
    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return json.dumps(conv(asdict(spec)), indent=2, sort_keys=True)


def spec_from_json(text: str) -> VmSpec:
    d = json.loads(text)
    for k in ("kernel", "initramfs", "rootfs", "run_dir"):
        d[k] = Path(d[k])
    d["extra_disks"] = tuple(Path(p) for p in d.get("extra_disks", ()))
    d["cgroup_procs_files"] = tuple(Path(p) for p in d.get("cgroup_procs_files", ()))
    if d.get("net"):
        d["net"] = NetAttachment(**d["net"])
    return VmSpec(**d)


def write_spec(spec: VmSpec) -> None:
    RunDir(spec.run_dir).spec.write_text(spec_to_json(spec))


def load_spec(run_dir: Path) -> VmSpec:
    """The spec a VM was started with (raises VmError when run_dir has none)."""
    path = RunDir(run_dir).spec
    try:
        return spec_from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise VmError(f"no usable {path.name} in {run_dir}: {e}") from e

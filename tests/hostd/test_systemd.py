"""The shipped unit file passes `systemd-analyze verify` and keeps VMs across restarts."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "moru-hostd.service"


def test_unit_verifies(tmp_path: Path) -> None:
    # verify checks ExecStart exists; point it at a stand-in in a copy of the unit
    # when the venv is not installed at /opt/moru (it is on CI and dev machines).
    unit = UNIT
    if not Path("/opt/moru/venv/bin/moru-hostd").exists():
        d = Path(tempfile.mkdtemp(dir=tmp_path))
        exe = shutil.which("true")
        assert exe
        unit = d / "moru-hostd.service"
        unit.write_text(UNIT.read_text().replace("/opt/moru/venv/bin/moru-hostd", exe))
    r = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "moru-hostd.service" in ln]
    assert r.returncode == 0 and not lines, r.stdout + r.stderr


def test_unit_settings() -> None:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text())
    svc = cp["Service"]
    assert svc["Type"] == "notify"
    assert svc["Delegate"] == "yes"
    assert svc["KillMode"] == "process"
    assert svc["Restart"] == "on-failure"
    assert svc["StateDirectory"] == "moru"
    assert svc["RuntimeDirectory"] == "moru"
    assert svc["RuntimeDirectoryPreserve"] == "yes"
    assert svc["ExecStart"].split()[:2] == ["/opt/moru/venv/bin/moru-hostd", "serve"]

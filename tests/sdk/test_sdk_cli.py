"""The `moru` CLI against the session's real hostd (found via MORU_HOSTD)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from hostd_framework import Hostd

from moru import Sandbox
from moru.cli import table

pytestmark = pytest.mark.vm

MORU = "/opt/moru/venv/bin/moru"


def moru(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([MORU, *args], capture_output=True, text=True, timeout=300, env=os.environ)
    if check:
        assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return p


def test_table_aligns_columns() -> None:
    assert table(["A", "BB"], [("xxx", 1), ("y", 22)]) == "A    BB\nxxx  1\ny    22"


def test_template_list(hostd: Hostd) -> None:
    out = json.loads(moru("template", "list", "--json").stdout)
    assert "base" in [t["template_id"] for t in out]
    assert moru("template", "list").stdout.startswith("TEMPLATE")


def test_sandbox_lifecycle_through_the_cli(hostd: Hostd, tmp_path: Path) -> None:
    created = json.loads(moru("sandbox", "create", "-m", "via=cli", "--json").stdout)
    sid = created["sandbox_id"]
    try:
        assert created["state"] == "running" and created["metadata"] == {"via": "cli"}
        listed = json.loads(moru("sandbox", "list", "-m", "via=cli", "--json").stdout)
        assert [s["sandbox_id"] for s in listed] == [sid]
        assert sid in moru("sandbox", "list").stdout
        assert "running" in moru("sandbox", "info", sid).stdout

        p = moru(
            "sandbox", "exec", sid, "--", "sh", "-c", "echo out; echo err >&2; exit 3", check=False
        )
        assert (p.returncode, p.stdout, p.stderr) == (3, "out\n", "err\n")
        r: dict[str, Any] = json.loads(
            moru("sandbox", "exec", "--json", sid, "--", "echo", "hi").stdout
        )
        assert r["stdout"] == "hi\n" and r["exit_code"] == 0

        info = json.loads(moru("sandbox", "timeout", sid, "1000", "--json").stdout)
        assert info["sandbox_id"] == sid
        assert json.loads(moru("sandbox", "metrics", sid, "--json").stdout) is not None

        blob = tmp_path / "up.bin"
        blob.write_bytes(os.urandom(3 << 20))
        moru("sandbox", "upload", sid, str(blob), "/tmp/up.bin")
        moru("sandbox", "download", sid, "/tmp/up.bin", str(tmp_path / "down.bin"))
        assert (tmp_path / "down.bin").read_bytes() == blob.read_bytes()

        assert json.loads(moru("sandbox", "pause", sid, "--json").stdout)["state"] == "paused"
        t0 = time.monotonic()
        r = moru("sandbox", "resume", sid, "--progress")
        assert r.stdout.strip() == f"{sid}: running"
        # The spinner line (stderr) shows once a call takes more than half a second.
        assert f"resuming {sid}" in r.stderr or time.monotonic() - t0 < 0.5, r.stderr
        assert moru("sandbox", "exec", sid, "--", "cat", "/tmp/up.bin").returncode == 0
    finally:
        k = json.loads(moru("sandbox", "kill", sid, "--json", check=False).stdout or "[]")
    assert k == [{"sandbox_id": sid, "killed": True}]
    p = moru("sandbox", "info", sid, check=False)
    assert p.returncode == 1 and "NotFoundException" in p.stderr
    assert not Sandbox.kill(sid)

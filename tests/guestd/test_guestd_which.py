"""guestd's own `which` (spawn.which) finds what shutil.which finds for bare names."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from guestd.process.spawn import which


def test_which_matches_shutil_which(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tool").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "tool").chmod(0o755)
    (tmp_path / "bin" / "plain").write_text("not executable")
    (tmp_path / "dir" / "tool").mkdir(parents=True)  # a directory is not a command
    path = os.pathsep.join([str(tmp_path / "dir"), "", str(tmp_path / "bin"), "/usr/bin",
                            "/bin"])  # fmt: skip
    for name in ("tool", "plain", "sh", "ls", "no-such-command-here"):
        assert which(name, path) == shutil.which(name, path=path), name
    assert which("tool", path) == str(tmp_path / "bin" / "tool")
    assert which("plain", path) is None

"""The committed moru_proto/ package is exactly what scripts/gen_proto.py makes from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {
        p.relative_to(tmp_path): p.read_bytes()
        for p in (tmp_path / "moru_proto").rglob("*")
        if p.is_file()
    }
    committed = {
        p.relative_to(ROOT): p.read_bytes()
        for p in (ROOT / "moru_proto").rglob("*")
        if p.is_file() and p.suffix in {".py", ".pyi"}
    }
    assert set(fresh) == set(committed), "files differ: run `python scripts/gen_proto.py`"
    stale = sorted(str(p) for p in fresh if fresh[p] != committed[p])
    assert not stale, f"stale generated code {stale}: run `python scripts/gen_proto.py`"

#!/usr/bin/env python3
"""Regenerates moru_proto/ from proto/: python messages, gRPC stubs and .pyi types.

Usage: python scripts/gen_proto.py [OUT_DIR]   (default: the repo root)
tests/test_proto_fresh.py regenerates into a temporary dir and fails when the
committed code differs, so edit proto/ and run this, never the output.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    files = sorted(PROTO_DIR.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(f) for f in files],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Every directory of the generated tree is a package.
    generated: list[Path] = []
    pkg_root = out / "moru_proto"
    dirs = {pkg_root}
    for p in pkg_root.rglob("*.py"):
        dirs.update(d for d in p.parents if d.is_relative_to(pkg_root))
    for d in sorted(dirs):
        init = d / "__init__.py"
        if not init.exists():
            init.write_text("")
    for p in sorted((out / "moru_proto").rglob("*")):
        if p.is_file() and p.suffix in {".py", ".pyi"}:
            generated.append(p)
    return generated


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(target):
        print(path.relative_to(target))

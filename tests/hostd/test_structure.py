"""The shape of the daemons' code: no import cycle in hostd or guestd, and no
code outside hostd/vmm asking which driver a VM comes from (a missing interface method)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

HOSTD = Path(__file__).resolve().parents[2] / "hostd"
DRIVER_CLASSES = re.compile(r"\b(Qemu|PciQemu)Vmm?\b")


def _modules(root: Path = HOSTD) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package's modules `name` imports at any level (TYPE_CHECKING, functions too)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # `from pkg import mod` imports the submodule, not the package's __init__
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
            targets = subs or [base]
        else:
            continue
        found.update(t for t in targets if t in mods and t != name)
    return found


@pytest.mark.parametrize("package", ["hostd", "guestd"])
def test_daemon_has_no_import_cycle(package: str) -> None:
    mods = _modules(HOSTD.parent / package)
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    # A package's __init__ re-exporting its modules is not a cycle with them.
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = [*stack[stack.index(t):], t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_only_the_driver_package_names_driver_classes_in_checks() -> None:
    bad = []
    for p in HOSTD.rglob("*.py"):
        if p.is_relative_to(HOSTD / "vmm"):
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if ("isinstance(" in line or "cast(" in line) and DRIVER_CLASSES.search(line):
                bad.append(f"{p.relative_to(HOSTD.parent)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


MAX_MODULE_LINES = 500


@pytest.mark.parametrize("package", ["hostd", "guestd"])
def test_no_hand_written_module_is_over_the_size_mark(package: str) -> None:
    """A module past ~500 lines holds more than one concept: split it by what it is."""
    root = HOSTD.parent / package
    big = [
        f"{p.relative_to(root.parent)}: {n} lines"
        for p in sorted(root.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not big, "\n".join(big)


def test_hostd_uses_asyncio_timeout_not_wait_for() -> None:
    """Python 3.11's asyncio.wait_for returns the inner result when the caller is
    cancelled as that result arrives, dropping the cancel (fixed in 3.12): a
    cancelled Create could run on past a QMP reply. asyncio.timeout keeps it."""
    bad = [
        f"{p.relative_to(HOSTD.parent)}:{n}"
        for p in sorted(HOSTD.rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "asyncio.wait_for(" in line
    ]
    assert not bad, "\n".join(bad)

"""Per-step timings of one Create, logged as one line (benchmarks/bench_create.py reads it).

The line is `<sid>: create steps (<path>): <step> <ms> ms, ..., total <ms> ms`;
steps that run in parallel with others are named with a `||` suffix and are
left out of the total's sum (the total is wall time).
"""

from __future__ import annotations

import time

PREFIX = "create steps"


class StepClock:
    """Wall-clock marks of the steps of one Create, in the order they end."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self._last = self.t0
        self.steps: list[tuple[str, float]] = []

    def mark(self, step: str) -> None:
        """Ends `step` now (it began at the previous mark)."""
        now = time.monotonic()
        self.steps.append((step, now - self._last))
        self._last = now

    def add(self, steps: dict[str, float]) -> None:
        """Steps timed elsewhere (e.g. inside the VM driver's restore), in their order."""
        self.steps.extend(steps.items())

    def line(self, sandbox_id: str, path: str) -> str:
        parts = ", ".join(f"{name} {sec * 1000:.0f} ms" for name, sec in self.steps)
        total = (time.monotonic() - self.t0) * 1000
        return f"{sandbox_id}: {PREFIX} ({path}): {parts}, total {total:.0f} ms"


def parse(line: str) -> tuple[str, dict[str, float]] | None:
    """(path, {step: seconds, ..., "total": seconds}) of a logged steps line, or None."""
    _, sep, rest = line.partition(f": {PREFIX} (")
    if not sep:
        return None
    path, _, body = rest.partition("): ")
    out: dict[str, float] = {}
    for part in body.split(", "):
        name, _, val = part.removesuffix(" ms").rpartition(" ")
        try:
            out[name] = out.get(name, 0.0) + float(val) / 1000
        except ValueError:
            continue
    return path, out

"""The `moru` CLI's output: tables, JSON, durations and sizes, the progress line.

Shared by moru/cli.py and moru/_cli_more.py.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import IO, Any, TypeVar

T = TypeVar("T")
SPINNER = "|/-\\"
QUIET = 0.5  # a call quicker than this shows no progress line


def jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, datetime):
        return obj.isoformat()
    return obj


def print_json(obj: Any) -> None:
    print(json.dumps(jsonable(obj), indent=2, sort_keys=True, default=str))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def ago(dt: datetime) -> str:
    secs = int((datetime.now(UTC) - dt).total_seconds())
    return dur(secs) + " ago" if secs >= 0 else "in " + dur(-secs)


def left(dt: datetime) -> str:
    secs = int((dt - datetime.now(UTC)).total_seconds())
    return dur(secs) if secs > 0 else "expired"


def dur(secs: int) -> str:
    if secs < 60:
        return f"{secs}s"
    if secs < 3600:
        return f"{secs // 60}m{secs % 60:02d}s"
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m"


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """A one-line status on stderr, redrawn while a slow call runs."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._text = ""
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, text: str) -> None:
        self._text = text

    def _draw(self, frame: int) -> None:
        spin = SPINNER[frame % len(SPINNER)]
        sys.stderr.write(f"\r\033[K{spin} {self._text} ({time.monotonic() - self._t0:.1f}s)")
        sys.stderr.flush()

    def run(self, text: str, fn: Callable[[], T]) -> T:
        """`fn()`, with a spinner line once it takes longer than QUIET seconds."""
        self._text, self._t0 = text, time.monotonic()
        if not self.enabled:
            return fn()
        drawn = 0

        def loop() -> None:
            nonlocal drawn
            if self._stop.wait(QUIET):
                return
            while True:
                self._draw(drawn)
                drawn += 1
                if self._stop.wait(0.1):
                    return

        self._stop.clear()
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        try:
            return fn()
        finally:
            self._stop.set()
            self._thread.join()
            if drawn:
                sys.stderr.write("\r\033[K")  # the line goes; the result is printed after
                sys.stderr.flush()


class CountingReader:
    """A file object wrapper that reports bytes read (for upload progress)."""

    def __init__(self, f: IO[bytes], total: int, progress: Progress, label: str) -> None:
        self._f, self._total, self._done = f, total, 0
        self._progress, self._label = progress, label

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self._done += len(b)
        pct = 100 * self._done / self._total if self._total else 100.0
        self._progress.update(f"{self._label} {size(self._done)}/{size(self._total)} {pct:.0f}%")
        return b

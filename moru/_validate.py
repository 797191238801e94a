"""Argument checks made before a call leaves the SDK.

A bad number must give the typed InvalidArgumentException naming the
argument, never a raw ValueError/OverflowError from float(), int() or a
protobuf field's range check deep inside a call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from moru._errors import InvalidArgumentException

# Ten years: above any node's maximum, and inside every timeout field's range.
MAX_SECONDS = 10 * 365 * 24 * 3600


def _invalid(message: str) -> InvalidArgumentException:
    return InvalidArgumentException(message, code="INVALID_ARGUMENT")


def seconds(value: object, name: str) -> float:
    """A finite, non-negative number of seconds (None: 0, meaning none/default)."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(f"{name}: expected a number of seconds, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _invalid(f"{name}: {value!r} is not a number of seconds")
    if not 0 <= value <= MAX_SECONDS:
        raise _invalid(f"{name}: {value} s is outside 0..{MAX_SECONDS} s")
    return float(value)


def whole_seconds(value: object, name: str) -> int:
    return int(seconds(value, name))


def port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _invalid(f"port: {value!r} is not a port number (1..65535)")
    return value


def states(value: str | Iterable[str] | None, known: Iterable[str]) -> list[str]:
    """One state name or several; unknown names are refused with the valid ones."""
    if value is None:
        return []
    names = [value] if isinstance(value, str) else list(value)
    allowed = sorted(known)
    for s in names:
        if s not in allowed:
            raise _invalid(f"state: unknown state {s!r}; one of {', '.join(allowed)}")
    return names


def excerpt(text: str, limit: int = 120) -> str:
    """repr of text for a message, shortened: errors never echo a megabyte command."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text.encode(errors='replace'))} bytes)"

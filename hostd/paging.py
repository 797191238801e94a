"""Page tokens for List: an opaque cursor (creation time, id) of the last item served.

A cursor, not an offset, so sandboxes created or killed between pages never
make a page skip or repeat one.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import TypeVar

from hostd.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

T = TypeVar("T")
Key = tuple[float, str]


def encode(key: Key) -> str:
    raw = json.dumps([key[0], key[1]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str) -> Key:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created, sid = json.loads(raw)
        return float(created), str(sid)
    except (ValueError, TypeError) as e:
        raise InvalidArgument("page_token", "not a token from a previous List") from e


def page(items: Sequence[tuple[Key, T]], page_size: int, token: str) -> tuple[list[T], str]:
    """One page of `items` (sorted by key) after `token`, and the next token ('' at the end)."""
    if page_size > MAX_PAGE_SIZE:
        raise InvalidArgument("page_size", f"{page_size}; at most {MAX_PAGE_SIZE}")
    size = page_size or DEFAULT_PAGE_SIZE
    after = decode(token) if token else None
    rest = [(k, v) for k, v in items if after is None or k > after]
    chunk = rest[:size]
    nxt = encode(chunk[-1][0]) if len(rest) > size else ""
    return [v for _, v in chunk], nxt

"""Structured logs: every line that concerns a sandbox carries its sandbox_id.

The id comes from a contextvar (set per RPC by the observability
interceptor, or by `sandbox_context` around background work); when it is
unset, from the first `sbx_...` id in the message itself, so existing log
calls like ``log.info("killed %s", sid)`` are tagged without changes.
JSON output (one object per line) when configured, plain text otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import re
import sys
from collections.abc import Iterator
from typing import IO, Any

sandbox_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("moru_sandbox_id", default="")
# hostd.sandboxes.new_sandbox_id(): "sbx_" + 20 of [a-z0-9].
SANDBOX_ID_RE = re.compile(r"(?<![A-Za-z0-9_])sbx_[a-z0-9]{20}(?![A-Za-z0-9])")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(sandbox_tag)s: %(message)s"

# LogRecord attributes that are not user-supplied `extra=` fields.
_STD_ATTRS = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message",
    "asctime",
    "sandbox_id",
    "sandbox_tag",
}


@contextlib.contextmanager
def sandbox_context(sandbox_id: str) -> Iterator[None]:
    """Tags every log line inside the block (and tasks started in it) with sandbox_id."""
    token = sandbox_id_var.set(sandbox_id)
    try:
        yield
    finally:
        sandbox_id_var.reset(token)


class SandboxIdFilter(logging.Filter):
    """Sets `record.sandbox_id` (contextvar, explicit extra, or the id in the message)."""

    def filter(self, record: logging.LogRecord) -> bool:
        sid = getattr(record, "sandbox_id", "") or sandbox_id_var.get()
        if not sid:
            try:
                m = SANDBOX_ID_RE.search(record.getMessage())
            except Exception:  # a malformed log call must not lose the line
                m = None
            sid = m.group(0) if m else ""
        record.sandbox_id = sid
        record.sandbox_tag = f" [{sid}]" if sid else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, sandbox_id, msg, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "sandbox_id": getattr(record, "sandbox_id", ""),
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def install_logging(
    level: str | int = "info", json_format: bool = False, stream: IO[str] | None = None
) -> logging.Handler:
    """Replaces the root handlers with one stderr handler tagging sandbox ids.

    The filter sits on the handler, so records of every logger (grpc's too)
    get a sandbox_id. Returns the handler (tests capture through `stream`).
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(SandboxIdFilter())
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler

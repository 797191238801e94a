"""Structured logs: JSON lines carrying sandbox_id from the context or from the message."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from hostd.observability import install_logging, sandbox_context

from .fakes import sid


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def lines(buf: io.StringIO) -> list[dict[str, object]]:
    out = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    return [o for o in out if o["logger"] != "asyncio"]  # its debug "Using selector"


def test_json_lines_carry_sandbox_id(restore_root: None) -> None:
    buf = io.StringIO()
    install_logging("debug", json_format=True, stream=buf)
    log = logging.getLogger("hostd.sandboxes")
    log.info("killed %s (%s)", sid(1), "timeout")  # id only in the message
    with sandbox_context(sid(2)):
        log.warning("guest call failed", extra={"method": "Process/Start"})

        async def task() -> None:
            logging.getLogger("hostd.rpc").info("inside a task started in the context")

        asyncio.run(task())
    log.info("node-wide line")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("create %s failed", sid(3))
    out = lines(buf)
    assert [o["sandbox_id"] for o in out] == [sid(1), sid(2), sid(2), "", sid(3)]
    assert out[0]["msg"] == f"killed {sid(1)} (timeout)" and out[0]["level"] == "info"
    assert out[1]["method"] == "Process/Start" and out[1]["logger"] == "hostd.sandboxes"
    assert "ValueError: boom" in str(out[4]["exc"])
    assert str(out[0]["time"]).endswith("+00:00")


def test_text_format_tags_the_sandbox(restore_root: None) -> None:
    buf = io.StringIO()
    install_logging("info", json_format=False, stream=buf)
    logging.getLogger("hostd").info("created %s", sid(7))
    logging.getLogger("hostd").debug("hidden")
    text = buf.getvalue()
    assert f"INFO hostd [{sid(7)}]: created {sid(7)}" in text and "hidden" not in text

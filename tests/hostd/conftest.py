"""Fixtures for hostd tests: one real hostd per module (VM boots are costly under TCG)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hostd_framework import IMAGES, Hostd, running_hostd


def require_images() -> None:
    if not (IMAGES / "templates" / "base" / "manifest.json").is_file():
        pytest.fail(f"template 'base' is not built in {IMAGES}: run `moru-images build base`")


@pytest.fixture(scope="module")
def hostd() -> Iterator[Hostd]:
    """A hostd for the module; its teardown fails the module if anything was left behind."""
    require_images()
    with running_hostd(max_sandboxes=8, memory_budget_mb=8192) as h:
        yield h


@pytest.fixture
def clean(hostd: Hostd) -> Iterator[Hostd]:
    """Per-test: every sandbox the test made is gone afterwards, and nothing is left."""
    yield hostd
    hostd.kill_all()
    left = hostd.check_clean()
    assert not left, f"left behind: {left}"

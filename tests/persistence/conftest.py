"""Fixtures for the persistence tests: VM runner/cgroups from tests/vmfixtures.py plus helpers."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmfixtures import vm_cgroups, vm_runner  # noqa: F401

"""Shared VM fixtures (tests/vmfixtures.py) for the VMM tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmfixtures import base_vm, vm_cgroups, vm_runner  # noqa: F401

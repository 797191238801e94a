"""Typing aliases shared by the servicers."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

Ctx: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

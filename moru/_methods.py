"""A method that works on the class (with an id) and on an instance.

`Sandbox.kill("sbx_...")` and `sandbox.kill()` are the same name in the spec,
as in E2B. The wrapped function gets the class or the instance as its first
argument and tells them apart with `isinstance(self_or_cls, type)`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Generic, TypeVar

R = TypeVar("R")


class class_or_instance_method(Generic[R]):
    def __init__(self, func: Callable[..., R]) -> None:
        self.func = func
        functools.update_wrapper(self, func)  # type: ignore[arg-type]

    def __get__(self, obj: object, objtype: type | None = None) -> Callable[..., R]:
        bound = obj if obj is not None else objtype
        return functools.partial(self.func, bound)

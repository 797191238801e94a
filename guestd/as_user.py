"""File operations as a given user: the calling thread's file-system identity.

guestd runs as root. A file call with `user` must succeed or fail as it would
for that user, so the work runs in a thread whose fsuid, fsgid and
supplementary groups are the user's. Linux keeps credentials per thread;
setfsuid/setfsgid/setgroups are made as raw syscalls because glibc's
setgroups() applies to every thread of the process. While fsuid is not 0 the
kernel drops CAP_DAC_OVERRIDE and the other file capabilities from the
thread, and gives them back when fsuid returns to 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import platform
from collections.abc import Callable, Iterator
from typing import TypeVar

from guestd.process.spawn import User, resolve_user

T = TypeVar("T")

# (setgroups, setfsuid, setfsgid) syscall numbers.
_SYSCALLS = {"x86_64": (116, 122, 123), "aarch64": (159, 151, 152)}
_libc = ctypes.CDLL(None, use_errno=True)


def _numbers() -> tuple[int, int, int]:
    try:
        return _SYSCALLS[platform.machine()]
    except KeyError:
        raise OSError(f"file calls as a user are not supported on {platform.machine()}") from None


def _set(uid: int, gid: int, groups: list[int]) -> None:
    nr_groups, nr_fsuid, nr_fsgid = _numbers()
    arr = (ctypes.c_uint32 * max(1, len(groups)))(*groups)
    if _libc.syscall(nr_groups, len(groups), arr) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    # setfsuid/setfsgid return the previous value and cannot report failure
    # directly: a second call returns the value in force, which must be ours.
    for nr, want in ((nr_fsgid, gid), (nr_fsuid, uid)):
        _libc.syscall(nr, want)
        if _libc.syscall(nr, want) != want:
            raise OSError(f"could not switch the file-system identity to {want}")


def _groups_of(user: User) -> list[int]:
    return sorted(set(os.getgrouplist(user.name, user.gid)))


@contextlib.contextmanager
def acting_as(user: str) -> Iterator[None]:
    """Within the block, this thread's file access is checked as `user`
    (a name or uid; empty or root: unchanged). The identity is restored on
    leaving, so a short synchronous block may run on the event loop's thread."""
    if not user:
        yield
        return
    u = resolve_user(user)
    if u.uid == 0:
        yield
        return
    saved = os.getgroups()
    _set(u.uid, u.gid, _groups_of(u))
    try:
        yield
    finally:
        _set(0, 0, saved)


async def run_as(user: str, fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` in a worker thread acting as `user` (NOT_FOUND for an unknown user)."""
    if user:
        resolve_user(user)  # an unknown user fails here, with the right status

    def call() -> T:
        with acting_as(user):
            return fn(*args)

    return await asyncio.to_thread(call)

"""Has any of these files changed? One non-blocking read per question.

The kept login environment must notice a change to /etc/profile, a script in
/etc/profile.d or ~/.profile before the next command, but stat-ing a dozen
files for every command is a dozen syscalls, each costly in a TCG guest. An
inotify watch on the directories holding them answers with one read: events
are queued by the kernel before the write that caused them returns, so a
command that follows a change always sees it. Any event (also for unrelated
files in the same directory, or a lost queue) only means "look again": the
caller then compares stats as before and re-arms the watch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

# inotify(7) event masks: any change to a directory's entries or their content.
_MASK = (0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800)


class _Inotify:
    """The three libc calls, loaded on first use (ctypes is a cost at boot)."""

    def __init__(self) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        self.init1 = libc.inotify_init1
        self.add_watch = libc.inotify_add_watch
        self.add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)


_lib: _Inotify | None = None


class DirWatch:
    """Watches a set of directories; `quiet()` is True while nothing in them
    changed since `arm()` (the same `generation`). Without inotify (or for a
    directory that cannot be watched) it is never quiet, and callers fall back
    to comparing stats every time."""

    def __init__(self) -> None:
        self._fd = -1
        self._dirs: frozenset[str] = frozenset()
        self.generation = 0  # changes with every arm(): what was checked before is stale

    def arm(self, dirs: Iterable[str]) -> None:
        """Starts a fresh watch of `dirs` (call before taking the stats it guards)."""
        global _lib
        self.close()
        want = frozenset(dirs)
        try:
            if _lib is None:
                _lib = _Inotify()
            fd = _lib.init1(os.O_NONBLOCK | os.O_CLOEXEC)  # IN_NONBLOCK | IN_CLOEXEC
        except (OSError, AttributeError):
            return
        if fd < 0:
            return
        self._fd = fd
        self.generation += 1
        # A directory that cannot be watched (missing, say) is left out: callers
        # that need it are never quiet.
        self._dirs = frozenset(d for d in want if _lib.add_watch(fd, os.fsencode(d), _MASK) >= 0)

    def quiet(self, dirs: Iterable[str]) -> bool:
        """True when armed for all of `dirs` and no event came since."""
        if self._fd < 0 or not self._dirs.issuperset(dirs):
            return False
        try:
            os.read(self._fd, 65536)
        except BlockingIOError:
            return True
        except OSError:
            pass
        self.close()  # something changed: the caller looks again and re-arms
        return False

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._dirs = -1, frozenset()

"""Children get default signal dispositions whatever guestd inherited.

An ignored signal stays ignored across exec, so a guestd started under `nohup`
or as a background job of a shell (SIGINT/SIGQUIT ignored) would hand that on
to every command it runs: `trap ... HUP` silently does nothing, ^C in a pty
does not interrupt, and an ignored SIGCHLD breaks waitpid. A caught signal, by
contrast, is reset to SIG_DFL by exec. So each inherited SIG_IGN becomes a
no-op handler: guestd itself still shrugs the signal off, its children do not.
SIGPIPE and SIGXFSZ are left alone: CPython sets them itself, and spawn
resets them in the child (posix_spawn setsigdef, or Popen's restore_signals for ptys).
"""

from __future__ import annotations

import signal

_LEFT_TO_PYTHON = {signal.SIGPIPE, signal.SIGXFSZ}


def _ignore(signum: int, frame: object) -> None:
    pass


def catch_inherited_ignores() -> list[signal.Signals]:
    """Turn inherited SIG_IGN dispositions into no-op handlers; returns those changed."""
    changed = []
    for sig in signal.valid_signals():
        if sig in _LEFT_TO_PYTHON or sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(sig) is signal.SIG_IGN:
                signal.signal(sig, _ignore)
                changed.append(signal.Signals(sig))
        except (OSError, ValueError):  # real-time or reserved signals
            continue
    return changed

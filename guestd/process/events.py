"""What a reader of a process's output gets: data, drops, keepalives and the end.

Shared by the process table (guestd.process.manager), which produces these
events, and their consumers: the gRPC stream, the output channel and the
registry of processes adopted after a restart.
"""

from __future__ import annotations

import os
import signal as signals
from dataclasses import dataclass

from guestd.process.output import Part


@dataclass(frozen=True)
class End:
    exit_code: int
    signal: int
    exited: bool
    timed_out: bool
    status: str


@dataclass(frozen=True)
class Data:
    """Output of one stream; `parts` concatenated (kept apart so the encoder copies once)."""

    kind: str
    parts: list[Part]

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)


@dataclass(frozen=True)
class Dropped:
    bytes_by_kind: dict[str, int]


@dataclass(frozen=True)
class KeepAlive:
    pass


Event = Data | Dropped | End | KeepAlive


def end_of(status: int, timed_out: bool) -> End:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signals.Signals(sig).name
        except ValueError:
            name = str(sig)
        return End(-1, sig, False, timed_out, f"signal: {name}")
    code = os.waitstatus_to_exitcode(status)
    return End(code, 0, True, timed_out, f"exit status {code}")

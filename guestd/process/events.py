"""What a process's followers receive (Start/Connect streams, output channels): output,
a count of dropped bytes, keep-alives and the end, with its exit status decoded."""

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

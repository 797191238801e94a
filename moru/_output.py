"""Turns a process's event stream into output chunks and a CommandResult.

Shared by the async and the sync command handles, so both decode, collect
and judge a command's end the same way, whether the output came as events or
over an output channel (moru._output_channel). No I/O here.
"""

from __future__ import annotations

import codecs

from moru._errors import CommandExitException, SandboxException, TimeoutException
from moru._models import CommandResult
from moru._output_channel import Frame, Output
from moru_proto.guest.v1 import process_pb2 as pb

# One output chunk as iteration yields it: (stdout, stderr, pty); one is set.
Chunk = tuple[str | None, str | None, bytes | None]


class OutputCollector:
    """Accumulates a command's stdout/stderr and remembers how it ended."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._out: list[str] = []
        self._err: list[str] = []
        self._dec_out = codecs.getincrementaldecoder("utf-8")("replace")
        self._dec_err = codecs.getincrementaldecoder("utf-8")("replace")
        self.end: pb.EndEvent | None = None
        self.dropped = 0

    @property
    def done(self) -> bool:
        return self.end is not None

    def feed(self, ev: pb.ProcessEvent) -> Chunk | None:
        """Takes one event; returns the output chunk it carried, if any."""
        kind = ev.WhichOneof("event")
        if kind == "data":
            d = ev.data
            which = d.WhichOneof("output")
            if which == "stdout":
                s = self._dec_out.decode(d.stdout)
                self._out.append(s)
                return (s, None, None)
            if which == "stderr":
                s = self._dec_err.decode(d.stderr)
                self._err.append(s)
                return (None, s, None)
            if which == "pty":
                return (None, None, d.pty)
        elif kind == "end":
            self.end = ev.end
            tail_out = self._dec_out.decode(b"", final=True)
            tail_err = self._dec_err.decode(b"", final=True)
            if tail_out:
                self._out.append(tail_out)
            if tail_err:
                self._err.append(tail_err)
        elif kind == "dropped":
            dr = ev.dropped
            self.dropped += dr.stdout_bytes + dr.stderr_bytes + dr.pty_bytes
        return None

    def feed_frame(self, frame: Frame) -> Chunk | None:
        """Takes one output channel frame, as `feed` takes an event."""
        if not isinstance(frame, Output):
            self.dropped += frame.nbytes
            return None
        if frame.kind == "stdout":
            s = self._dec_out.decode(frame.data)
            self._out.append(s)
            return (s, None, None)
        if frame.kind == "stderr":
            s = self._dec_err.decode(frame.data)
            self._err.append(s)
            return (None, s, None)
        return (None, None, bytes(frame.data))

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    def result(self, *, timeout: float | None = None) -> CommandResult:
        """The result, raising CommandExitException / TimeoutException as the spec says."""
        end = self.end
        if end is None:
            raise SandboxException(
                f"lost the output stream of process {self.pid} before it ended; "
                f"reattach with commands.connect({self.pid})"
            )
        error: str | None = end.error or None
        if not error and not end.exited:
            error = end.status or f"signal {end.signal}"
        if self.dropped:
            note = f"{self.dropped} bytes of output were dropped (replay buffer full)"
            error = f"{error}; {note}" if error else note
        result = CommandResult(self.stdout, self.stderr, end.exit_code, error)
        if end.timed_out:
            limit = f" of {timeout:g} s" if timeout else ""
            raise TimeoutException(
                f"command (pid {self.pid}) exceeded its own timeout{limit} and was killed; "
                "pass a larger timeout= to commands.run (0 for no limit). "
                "This is the command's timeout, not the sandbox's."
            )
        if end.error or not end.exited or end.exit_code != 0:
            raise CommandExitException(result)
        return result

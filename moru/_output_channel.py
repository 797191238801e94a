"""A command's output channel: its output as frames on hostd's data relay.

gRPC costs a message per MiB at every hop (guestd in a TCG guest, hostd, the
SDK), which bounds output streaming well below vsock. So `commands.run` and
`connect` ask for an output channel (StartRequest.output_channel): the start
event carries a one-use ticket for the data relay. Once CHANNEL_AFTER bytes
came as events the handle connects (a short command never pays for it);
guestd answers with ToChannel, the rest of the output arrives there as frames
(format in process.proto, OutputChannel) and the end event follows on the
event stream. Asked for only when hostd is on a unix socket (the relay is a
unix socket next to it); a hostd or guestd without one just sends data
events, which the handle reads as before.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass

from moru import _data_relay as data_relay
from moru._guest import GuestTarget
from moru_proto.guest.v1 import process_pb2 as pb

HEADER = struct.Struct(">BI")
KINDS = {1: "stdout", 2: "stderr", 3: "pty"}
DROPPED = 4
END = 5
DROPPED_BODY = struct.Struct(">QQQ")
CHANNEL_AFTER = 64 * 1024  # output bytes on the event stream before the channel is connected
FRAME_MAX = 64 * 1024 * 1024  # guestd sends at most its message size; more is corruption
BODY_BUFFER = 4 * 1024 * 1024  # frames are read into one reused buffer (grown if one is larger)


def usable(target: GuestTarget) -> bool:
    return target.config.address.startswith("unix:")


@dataclass(frozen=True)
class Output:
    """One frame's data: a view of the channel's buffer, valid until its next read()."""

    kind: str  # stdout, stderr or pty
    data: bytes | memoryview


@dataclass(frozen=True)
class Lost:
    """Bytes the channel did not deliver: guestd's OutputDropped, or a frame
    cut off when the channel broke."""

    nbytes: int


Frame = Output | Lost


class OutputChannel:
    """The reading end; `read()` until it returns None (end frame or closed)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._done = False
        self._head = bytearray(HEADER.size)
        self._body = bytearray(BODY_BUFFER)
        self._cut = 0  # bytes of a frame the channel broke in, reported after its start

    @classmethod
    async def open(cls, info: pb.OutputChannel) -> OutputChannel | None:
        """Connects and sends the ticket; None when the relay cannot be reached
        (guestd then keeps sending the output as data events)."""
        try:
            s = await data_relay.connect(info.address, info.ticket)
        except OSError:
            return None
        return cls(s)

    def close(self) -> None:
        self._done = True
        if self._sock.fileno() >= 0:
            try:  # a read in flight must not watch a closed (maybe reused) fd
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            except RuntimeError:  # no loop running: nothing watches it
                pass
        self._sock.close()

    async def _exactly(self, view: memoryview) -> int:
        loop = asyncio.get_running_loop()
        got = 0
        while got < len(view):
            n = await loop.sock_recv_into(self._sock, view[got:])
            if n == 0:
                break
            got += n
        return got

    async def read(self) -> Frame | None:
        """The next frame; None once the output ended or the channel closed."""
        if self._cut:
            cut, self._cut = self._cut, 0
            return Lost(cut)
        if self._done:
            return None
        try:
            got = await self._exactly(memoryview(self._head))
            if got < HEADER.size:
                self.close()
                return None  # closed between frames
            kind, n = HEADER.unpack(self._head)
            if kind == END or n > FRAME_MAX:
                self.close()
                return None
            if n > len(self._body):
                self._body = bytearray(n)
            body = memoryview(self._body)[:n]
            got = await self._exactly(body)
        except OSError:
            self.close()
            return None
        if got < n:  # broken mid-frame: what came, then the rest as lost
            self.close()
            if kind not in KINDS or not got:
                return Lost(n if kind in KINDS else 0)
            self._cut = n - got
            return Output(KINDS[kind], body[:got])
        if kind == DROPPED:
            return Lost(sum(DROPPED_BODY.unpack(body)))
        name = KINDS.get(kind)
        if name is None:
            self.close()
            return None
        return Output(name, body)

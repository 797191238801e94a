"""Small helpers to run commands through a guestd and collect their events."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from moru_proto.guest.v1 import process_pb2 as pb


@dataclass
class Result:
    pid: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    pty: bytes = b""
    order: list[tuple[str, bytes]] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    keepalives: int = 0
    end: pb.EndEvent | None = None


def collect(events: Iterable[pb.ProcessEvent]) -> Result:
    r = Result()
    for ev in events:
        kind = ev.WhichOneof("event")
        if kind == "start":
            r.pid = ev.start.pid
        elif kind == "data":
            which = ev.data.WhichOneof("output")
            data = getattr(ev.data, which)
            setattr(r, which, getattr(r, which) + data)
            r.order.append((which, data))
        elif kind == "dropped":
            for k in ("stdout", "stderr", "pty"):
                r.dropped[k] = r.dropped.get(k, 0) + getattr(ev.dropped, f"{k}_bytes")
        elif kind == "keepalive":
            r.keepalives += 1
        elif kind == "end":
            r.end = ev.end
    return r


def shell(cmd: str, **kw: object) -> pb.StartRequest:
    cfg = {k: kw.pop(k) for k in ("env", "cwd", "user") if k in kw}
    return pb.StartRequest(config=pb.ProcessConfig(shell=cmd, **cfg), **kw)  # type: ignore[arg-type]


def argv(*args: str, **kw: object) -> pb.StartRequest:
    cfg = {k: kw.pop(k) for k in ("env", "cwd", "user") if k in kw}
    return pb.StartRequest(config=pb.ProcessConfig(argv=list(args), **cfg), **kw)  # type: ignore[arg-type]

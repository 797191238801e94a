"""Running a shell command in a booted test VM through its guestd (sync stubs)."""

from __future__ import annotations

from moru_proto.guest.v1 import process_pb2, process_pb2_grpc


def sh(stub: process_pb2_grpc.ProcessStub, script: str, timeout: float = 60) -> tuple[int, str]:
    """Exit code and combined output of `/bin/sh -c script` in the guest."""
    req = process_pb2.StartRequest(config=process_pb2.ProcessConfig(argv=["/bin/sh", "-c", script]))
    out = bytearray()
    code = -1
    for ev in stub.Start(req, timeout=timeout):
        kind = ev.WhichOneof("event")
        if kind == "data":
            out += ev.data.stdout or ev.data.stderr
        elif kind == "end":
            code = ev.end.exit_code if ev.end.exited else -1
    return code, out.decode(errors="replace")


def check(stub: process_pb2_grpc.ProcessStub, script: str, timeout: float = 60) -> str:
    code, out = sh(stub, script, timeout)
    assert code == 0, f"{script!r} exited {code}: {out}"
    return out

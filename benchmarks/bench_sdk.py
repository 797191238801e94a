"""SDK overhead vs raw gRPC through hostd, measured in the same run.

    /opt/moru/venv/bin/python benchmarks/bench_sdk.py [--runs N] [--mb M]

Uses the hostd at $MORU_HOSTD (with $MORU_API_KEY) when set; otherwise starts a
private one (own state dir, socket and cgroup root; networking off) and stops
it afterwards. One sandbox serves every measurement.

Figures (each printed next to its floor and the ratio):
  * commands.run("true") round trip vs a raw Process/Start stream of the same
    request through hostd: ratio must be <= 1.2.
  * files.write / files.read throughput vs raw Filesystem/Write and /Read
    streams (same 1 MiB chunks): ratio must be >= 0.8.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from moru import Sandbox
from moru._files import CHUNK
from moru_proto.guest.v1 import filesystem_pb2 as fs_pb
from moru_proto.guest.v1 import filesystem_pb2_grpc, process_pb2, process_pb2_grpc

REPO = Path(__file__).resolve().parents[1]


def median_time(fn: Callable[[], Any], runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _hostd() -> tuple[str, str, Any]:
    """(address, api key, handle to stop or None)."""
    if os.environ.get("MORU_HOSTD"):
        return os.environ["MORU_HOSTD"], os.environ.get("MORU_API_KEY", ""), None
    sys.path.insert(0, str(REPO / "tests" / "hostd"))
    from hostd_framework import Hostd

    h = Hostd(api_key="bench")
    h.start(timeout=120)
    return f"unix:{h.sock}", "bench", h


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="file transfers per side")
    ap.add_argument("--template", default="base")
    args = ap.parse_args()

    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C so the sandbox and hostd are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with sandbox_on_hostd(args.template) as (sbx, address, key):
        ok = bench(sbx, address, key, args)
    return 0 if ok else 1


@contextlib.contextmanager
def sandbox_on_hostd(template: str) -> Iterator[tuple[Sandbox, str, str]]:
    """(sandbox, hostd address, api key) on $MORU_HOSTD or a private hostd; both
    are gone afterwards."""
    address, key, handle = _hostd()
    try:
        sbx = Sandbox.create(template, timeout=3600, hostd=address, api_key=key)
        try:
            yield sbx, address, key
        finally:
            sbx.kill()
    finally:
        if handle is not None:
            left = handle.close()
            if left:
                print(f"hostd left behind: {left}", file=sys.stderr)


def bench(sbx: Sandbox, address: str, key: str, args: argparse.Namespace) -> bool:
    info = sbx.get_info()
    token = sbx._core._target.access_token
    pairs = [("sandbox-id", sbx.sandbox_id)]
    if key:
        pairs.append(("authorization", f"Bearer {key}"))
    if token:
        pairs.append(("x-moru-access-token", token))
    md: tuple[tuple[str, str | bytes], ...] = tuple(pairs)
    channel = grpc.insecure_channel(
        address,
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
    )
    proc = process_pb2_grpc.ProcessStub(channel)
    fs = filesystem_pb2_grpc.FilesystemStub(channel)
    print(f"sandbox {info.sandbox_id} ({info.template_id}, {info.cpu_count} vCPU) via {address}")

    # -- command round trip -------------------------------------------------
    req = process_pb2.StartRequest(
        config=process_pb2.ProcessConfig(shell="true"), timeout_seconds=60
    )

    def raw_run() -> None:
        for ev in proc.Start(req, metadata=md):
            if ev.WhichOneof("event") == "end":
                assert ev.end.exit_code == 0
                return
        raise RuntimeError("no end event")

    def sdk_run() -> None:
        sbx.commands.run("true")

    # Interleave to share any drift in machine load.
    raw_t: list[float] = []
    sdk_t: list[float] = []
    for _ in range(3):
        raw_t.append(median_time(raw_run, args.runs // 3 or 1, warmup=2))
        sdk_t.append(median_time(sdk_run, args.runs // 3 or 1, warmup=2))
    raw_rt, sdk_rt = statistics.median(raw_t), statistics.median(sdk_t)
    ratio = sdk_rt / raw_rt
    ok_cmd = ratio <= 1.2
    print(
        f"commands.run('true'): SDK {sdk_rt * 1000:.2f} ms  "
        f"raw Process/Start {raw_rt * 1000:.2f} ms  ratio {ratio:.3f} (floor: <= 1.2) "
        f"{'OK' if ok_cmd else 'FAIL'}"
    )

    # -- file throughput ----------------------------------------------------
    size = args.mb << 20
    data = os.urandom(size)
    path = "/tmp/bench.bin"

    def raw_write() -> None:
        def reqs() -> Iterator[fs_pb.WriteRequest]:
            yield fs_pb.WriteRequest(header=fs_pb.WriteHeader(path=path))
            view = memoryview(data)
            for i in range(0, size, CHUNK):
                yield fs_pb.WriteRequest(data=bytes(view[i : i + CHUNK]))

        fs.Write(reqs(), metadata=md)

    def sdk_write() -> None:
        sbx.files.write(path, data)

    def raw_read() -> None:
        buf = bytearray()
        for msg in fs.Read(fs_pb.ReadRequest(path=path), metadata=md):
            buf += msg.data
        assert len(buf) == size

    def sdk_read() -> None:
        assert len(sbx.files.read(path, format="bytes")) == size

    ok_files = True
    for name, raw_fn, sdk_fn in (
        ("upload", raw_write, sdk_write),
        ("download", raw_read, sdk_read),
    ):
        raw_s: list[float] = []
        sdk_s: list[float] = []
        for _ in range(args.rounds):
            raw_s.append(median_time(raw_fn, 1, warmup=0))
            sdk_s.append(median_time(sdk_fn, 1, warmup=0))
            print(f"  {name}: raw {raw_s[-1]:.2f} s, SDK {sdk_s[-1]:.2f} s", flush=True)
        raw_mbs = args.mb / statistics.median(raw_s)
        sdk_mbs = args.mb / statistics.median(sdk_s)
        r = sdk_mbs / raw_mbs
        ok = r >= 0.8
        ok_files &= ok
        print(
            f"files {name} {args.mb} MiB: SDK {sdk_mbs:.1f} MiB/s  raw Filesystem RPC "
            f"{raw_mbs:.1f} MiB/s  ratio {r:.3f} (floor: >= 0.8) {'OK' if ok else 'FAIL'}"
        )
    channel.close()
    return ok_cmd and ok_files


if __name__ == "__main__":
    sys.exit(main())

"""Commands and files through the SDK, each next to its floor measured in the same run.

    /opt/moru/venv/bin/python benchmarks/bench_commands.py [--mb 64] [--runs 20]

Starts a private hostd (own state dir, socket and cgroup root; networking
off; images from $MORU_IMAGES_DIR) with one sandbox, and stops it afterwards.

Floors, measured in the same sandbox:
  * in-guest spawn of `bash -c true` (a Python loop inside the guest);
  * the raw hybrid-vsock round trip and one-way throughput each way to a
    Python server in the guest (host side: the sandbox's vhost-device-vsock
    socket). One way, not a two-way echo: a many-MiB echo stalls on this
    vsock device.
  * the pipe floor: that server reading `head -c N /dev/zero` from a pipe and
    sending it (what any design that keeps output in guestd must do at least;
    in a TCG guest the producer and the pipe copy cost as much as the send).
The floors are printed once at the start; each throughput figure is also
measured in rounds, each right after a transfer of its floor, and its ratio is
the median of the per-round ratios, so a load change between floor and figure
does not move the ratio.

Figures:
  * commands.run("true") round trip vs (bash -c true + vsock RTT): target <= 1.5x;
  * stdout streaming of `head -c N /dev/zero`: target >= 0.8 of guest->host
    (also shown against the pipe floor);
  * files.write / files.read of N MiB: target >= 0.85 of that direction;
  * p50 of the 20 MB stdout of `head -c 20000000 /dev/zero | tr '\\0' a`;
  * CPU per command of guestd (in the guest), hostd and the SDK process;
  * guestd's peak RSS (VmHWM) before and after --gb GiB of stdout through the SDK.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "hostd"))

import grpc  # noqa: E402
from bench_sdk import median_time  # noqa: E402
from hostd_framework import Hostd, our_pids  # noqa: E402

from hostd.vsock import dial_socket, wait_ready  # noqa: E402
from moru import Sandbox  # noqa: E402
from moru_proto.guest.v1 import process_pb2, process_pb2_grpc  # noqa: E402

ECHO_PORT = 5000
# The raw floor's guest end: "echo N" (N one-byte round trips), "sink N"
# (reads N bytes, answers one), "source N" (sends N bytes) or "pipe N" (sends
# N bytes it reads from `head -c N /dev/zero` through a pipe, as guestd would).
ECHO_SERVER = f"""
import fcntl, os, socket, subprocess
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.bind((socket.VMADDR_CID_ANY, {ECHO_PORT}))
s.listen(16)
while True:
    c, _ = s.accept()
    if os.fork() == 0:
        f = c.makefile("rb")
        cmd, n = f.readline().split()
        n = int(n)
        if cmd == b"echo":
            for _ in range(n):
                c.sendall(f.read(1))
        elif cmd == b"sink":
            while n > 0:
                d = f.read1(min(n, 1 << 20))
                if not d:
                    break
                n -= len(d)
            c.sendall(b"k")
        elif cmd == b"pipe":
            p = subprocess.Popen(["head", "-c", str(n), "/dev/zero"], stdout=subprocess.PIPE)
            fd = p.stdout.fileno()
            fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ, as guestd grows a busy pipe
            while d := os.read(fd, 1 << 18):
                c.sendall(d)
            p.wait()
        else:
            buf = b"a" * (1 << 20)
            while n > 0:
                k = min(n, len(buf))
                c.sendall(buf[:k])
                n -= k
        os._exit(0)
    c.close()
"""
SPAWN_FLOOR = """
import os, statistics, sys, time
n = int(sys.argv[1]); out = []
for _ in range(n):
    t = time.perf_counter()
    pid = os.posix_spawn("/bin/bash", ["bash", "-c", "true"], os.environ)
    os.waitpid(pid, 0)
    out.append(time.perf_counter() - t)
print(statistics.median(out))
"""
TWENTY_MB = "head -c 20000000 /dev/zero | tr '\\0' a"


def cpu_seconds(stat: str) -> float:
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _dial_blocking(uds: Path) -> socket.socket:
    sock = await dial_socket(uds, ECHO_PORT, 10)
    sock.setblocking(True)
    sock.settimeout(120)
    return sock


def guest_to_host(uds: Path, cmd: str, total: int) -> float:
    """MB/s of `total` bytes the guest server sends for `cmd` ("source", "pipe")."""
    s = asyncio.run(_dial_blocking(uds))
    try:
        buf = bytearray(1 << 20)
        t = time.perf_counter()
        s.sendall(f"{cmd} {total}\n".encode())
        left = total
        while left:
            n = s.recv_into(buf, min(left, len(buf)))
            if not n:
                raise ConnectionError(f"{cmd} connection closed early")
            left -= n
        return total / (time.perf_counter() - t) / 1e6
    finally:
        s.close()


def vsock_floors(uds: Path, mb: int, rounds: int) -> tuple[float, float, float]:
    """Raw hybrid vsock to the guest: (median 1-byte round trip in s, host->guest
    MB/s, guest->host MB/s). One direction at a time: a two-way echo of many
    MiB stalls on this vsock device (both directions fill up)."""
    total = mb << 20
    s = asyncio.run(_dial_blocking(uds))
    try:
        s.sendall(f"echo {rounds}\n".encode())
        rtts = []
        for _ in range(rounds):
            t = time.perf_counter()
            s.sendall(b"x")
            s.recv(1)
            rtts.append(time.perf_counter() - t)
    finally:
        s.close()
    return statistics.median(rtts), host_to_guest(uds, mb), guest_to_host(uds, "source", total)


def host_to_guest(uds: Path, mb: int) -> float:
    """MB/s of `mb` MiB sent to the guest server's sink."""
    s = asyncio.run(_dial_blocking(uds))
    try:
        chunk = os.urandom(1 << 20)
        t = time.perf_counter()
        s.sendall(f"sink {mb << 20}\n".encode())
        for _ in range(mb):
            s.sendall(chunk)
        assert s.recv(1) == b"k"
        return (mb << 20) / (time.perf_counter() - t) / 1e6
    finally:
        s.close()


def paired(fn: Callable[[], Any], floor: Callable[[], float], size: int, rounds: int,
           ) -> tuple[float, float, float]:
    """(MB/s, floor MB/s, ratio), each the median over `rounds` rounds of a floor
    transfer right before the figure's: a load change moves both sides of a
    ratio alike instead of one floor measured minutes earlier."""
    fn()  # warm-up
    rates, floors, ratios = [], [], []
    for _ in range(rounds):
        fl = floor()
        t = time.perf_counter()
        fn()
        rate = size / (time.perf_counter() - t) / 1e6
        rates.append(rate)
        floors.append(fl)
        ratios.append(rate / fl)
    return statistics.median(rates), statistics.median(floors), statistics.median(ratios)


def line(name: str, value: str, floor: str, ratio: float, target: str) -> None:
    print(f"  {name:34s} {value:>14s}   floor {floor:>14s}   ratio {ratio:6.2f}  (target {target})")


def bench(sbx: Sandbox, h: Hostd, args: argparse.Namespace) -> None:
    uds = next(h.state.rglob("v.sock"))
    sbx.files.write("/tmp/echo.py", ECHO_SERVER)
    sbx.files.write("/tmp/spawn.py", SPAWN_FLOOR)
    print("starting the echo server in the guest")
    sbx.commands.run("setsid python3 /tmp/echo.py </dev/null >/dev/null 2>&1 &")
    asyncio.run(wait_ready(uds, ECHO_PORT, time.monotonic() + 120))
    mb = args.mb
    size = mb << 20

    # -- floors ---------------------------------------------------------------
    print("measuring floors")
    spawn = float(sbx.commands.run(f"python3 /tmp/spawn.py {args.runs}", timeout=600).stdout)
    rtt, up, down = vsock_floors(uds, mb, args.runs)
    piped = guest_to_host(uds, "pipe", size)
    print(f"floors: in-guest bash -c true {spawn * 1e3:.1f} ms, vsock RTT {rtt * 1e3:.2f} ms,"
          f" raw vsock host->guest {up:.1f} MB/s, guest->host {down:.1f} MB/s,"
          f" pipe -> guest->host {piped:.1f} MB/s")

    # -- round trip and CPU per command ----------------------------------------
    n = args.runs
    before_g = cpu_seconds(sbx.commands.run("cat /proc/$PPID/stat").stdout)
    hostd_stat = Path(f"/proc/{h.proc.pid}/stat") if h.proc else None
    before_h = cpu_seconds(hostd_stat.read_text()) if hostd_stat else 0.0
    before_c = time.process_time()
    rt = median_time(lambda: sbx.commands.run("true"), n, warmup=0)
    after_c = time.process_time()
    after_h = cpu_seconds(hostd_stat.read_text()) if hostd_stat else 0.0
    after_g = cpu_seconds(sbx.commands.run("cat /proc/$PPID/stat").stdout)
    floor = spawn + rtt
    print("round trip")
    line('commands.run("true") p50', f"{rt * 1e3:.1f} ms", f"{floor * 1e3:.1f} ms",
         rt / floor, "<= 1.5")
    # n+1: the second `cat` is counted too.
    print(f"  CPU per command: guestd {(after_g - before_g) / (n + 1) * 1e3:.1f} ms (in-guest),"
          f" hostd {(after_h - before_h) / n * 1e3:.1f} ms,"
          f" SDK process {(after_c - before_c) / n * 1e3:.1f} ms")

    # -- stdout streaming ----------------------------------------------------
    print(f"throughput ({mb} MiB) vs raw vsock in the same direction")
    print("  (each figure beside its floor measured right before it, round by round;"
          " medians over the rounds)")
    cmd = f"head -c {size} /dev/zero"

    def source() -> float:
        return guest_to_host(uds, "source", size)

    def stdout() -> None:
        sbx.commands.run(cmd, timeout=600)

    rate, fl, ratio = paired(stdout, source, size, args.rounds)
    line("stdout streaming", f"{rate:.1f} MB/s", f"{fl:.1f} MB/s", ratio, ">= 0.8")
    rate, fl, ratio = paired(stdout, lambda: guest_to_host(uds, "pipe", size), size, args.rounds)
    line("  same, vs the pipe floor", f"{rate:.1f} MB/s", f"{fl:.1f} MB/s", ratio, "-")
    host_cpu(h, {"raw guest->host": source, "pipe floor": lambda: guest_to_host(uds, "pipe", size),
                 "stdout (SDK)": stdout, 'run("true")': lambda: sbx.commands.run("true")}, mb)

    # The same stream as raw gRPC through hostd (no SDK): where the time goes.
    channel = grpc.insecure_channel(f"unix:{h.sock}",
                                    options=[("grpc.max_receive_message_length", -1)])
    stub = process_pb2_grpc.ProcessStub(channel)
    md = sbx._core._target.metadata
    req = process_pb2.StartRequest(config=process_pb2.ProcessConfig(shell=cmd))

    def raw() -> None:
        n = sum(len(ev.data.stdout) for ev in stub.Start(req, metadata=md))
        assert n == size

    rate, fl, ratio = paired(raw, source, size, args.rounds)
    channel.close()
    line("  same, data events (raw Process/Start)", f"{rate:.1f} MB/s", f"{fl:.1f} MB/s",
         ratio, "-")

    data = os.urandom(size)
    path = "/tmp/bench.bin"
    rate, fl, ratio = paired(lambda: sbx.files.write(path, data),
                             lambda: host_to_guest(uds, mb), size, args.rounds)  # fmt: skip
    line("files.write", f"{rate:.1f} MB/s", f"{fl:.1f} MB/s", ratio, ">= 0.85")

    def read() -> None:
        assert len(sbx.files.read(path, format="bytes")) == size

    rate, fl, ratio = paired(read, source, size, args.rounds)
    line("files.read", f"{rate:.1f} MB/s", f"{fl:.1f} MB/s", ratio, ">= 0.85")

    def twenty() -> None:
        assert len(sbx.commands.run(TWENTY_MB, timeout=600).stdout) == 20_000_000

    t = median_time(twenty, args.rounds, warmup=1)
    line("20 MB stdout (head | tr) p50", f"{t * 1e3:.0f} ms",
         f"{20e6 / down / 1e6 * 1e3:.0f} ms", t / (20e6 / down / 1e6), "printed")
    if args.gb:
        guestd_memory(sbx, args.gb)


def host_cpu(h: Hostd, runs: dict[str, Callable[[], Any]], mb: int) -> None:
    """Host CPU seconds each process spent on one transfer of each kind: on a
    2-core host running 2 TCG vCPUs, what the guest (QEMU) and each host hop
    cost is what bounds the throughput."""
    def sample() -> dict[str, float]:
        out = {"SDK": time.process_time()}
        for pid in {*our_pids(str(h.root)), *([h.proc.pid] if h.proc else [])}:
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                cpu = cpu_seconds(Path(f"/proc/{pid}/stat").read_text())
            except OSError:
                continue
            name = ("hostd" if h.proc and pid == h.proc.pid else "QEMU" if comm.startswith("qemu")
                    else "vsock device" if comm.startswith("vhost-device") else "")
            if name:
                out[name] = out.get(name, 0.0) + cpu
        return out

    print(f"  host CPU seconds per {mb} MiB (one run each; QEMU = the guest's work;"
          " run(\"true\"): a command's fixed cost):")
    for what, fn in runs.items():
        before = sample()
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
        after = sample()
        used = "  ".join(f"{k} {after[k] - before.get(k, 0.0):.2f}" for k in
                         ("QEMU", "vsock device", "hostd", "SDK") if k in after)
        print(f"    {what:18s} {wall:5.2f} s wall   {used}")


def guestd_memory(sbx: Sandbox, gb: float) -> None:
    """guestd's peak RSS around a `head -c` of `gb` GiB through the SDK."""
    size = int(gb * (1 << 30))

    def hwm_mib() -> float:
        return int(sbx.commands.run("grep VmHWM /proc/$PPID/status").stdout.split()[1]) / 1024

    before = hwm_mib()
    n = 0
    t = time.perf_counter()
    h = sbx.commands.run(f"head -c {size} /dev/zero", background=True, timeout=3600)
    for out, _, _ in h:  # iterated, not wait(): no joined copy of it all in this process
        n += len(out or "")
    t = time.perf_counter() - t
    assert n == size and h.exit_code == 0
    after = hwm_mib()
    print(f"guestd VmHWM {before:.1f} MiB before, {after:.1f} MiB after {gb:g} GiB of stdout"
          f" through the SDK (+{after - before:.1f} MiB; {size / t / 1e6:.1f} MB/s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds (floor, then figure) per throughput figure")
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--template", default="base")
    ap.add_argument("--gb", type=float, default=1.0,
                    help="GiB of stdout for the guestd memory figure (0: skip)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}"
          f" ({os.cpu_count()} CPUs)")
    h = Hostd(api_key="bench")
    h.start(timeout=120)
    try:
        print("creating a sandbox")
        sbx = Sandbox.create(args.template, timeout=3600, hostd=f"unix:{h.sock}",
                             api_key="bench")
        try:
            bench(sbx, h, args)
        finally:
            sbx.kill()
    finally:
        left = h.close()
        if left:
            print(f"hostd left behind: {left}", file=sys.stderr)
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())

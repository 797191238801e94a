#!/usr/bin/env python3
"""hostd benchmark: every figure next to its floor measured in the same run.

1. Create -> first command latency vs a bare boot of the same image to
   guestd-ready (the VMM driver alone: no cgroup, relay, Init or API). Target <= 1.2x.
2. Command round trip through hostd's pass-through vs straight to guestd
   (a relay of our own on the same VM's vsock socket). Target <= 1.5x.
3. Host memory overhead per idle sandbox: the PSS of QEMU and of the vsock
   device without guest RAM (the memfd backend), split into TCG's code cache,
   other anonymous memory (heap, QEMU's copy of the kernel, buffers) and
   file-backed pages (shared ones counted once), plus hostd's own RSS growth
   per sandbox. Target <= 40 MB.

Usage (root; images built):
    bench_hostd.py [--boots N] [--calls N] [--idle N] [--only-memory] [--ready-snapshot]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "hostd"))

from hostd_framework import Hostd, pb  # noqa: E402

from hostd.guest import TOKEN_HEADER, open_channel  # noqa: E402
from hostd.readiness import wait_guestd  # noqa: E402
from hostd.vmm.base import VmSpec  # noqa: E402
from hostd.vmm.qemu import PciQemuVmm  # noqa: E402
from hostd.vsock import VsockRelay  # noqa: E402
from images.manifest import load_manifest  # noqa: E402
from moru_proto.guest.v1 import process_pb2, process_pb2_grpc  # noqa: E402


def line(name: str, value: float, floor: float, unit: str, target: str) -> None:
    ratio = value / floor if floor else float("inf")
    print(f"{name:<44} {value:9.3f} {unit}   floor {floor:9.3f} {unit}", end="")
    print(f"   ratio {ratio:5.2f}x  ({target})")


async def bare_boot(template: str) -> float:
    """Seconds from VMM start to guestd answering on vsock, nothing else."""
    m = load_manifest(template)
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="mb"))
    spec = VmSpec(
        sandbox_id="sbx_bench", kernel=Path(m.kernel), initramfs=Path(m.initramfs),
        rootfs=Path(m.rootfs), run_dir=d / "r", vcpus=m.defaults.vcpus,
        memory_mb=m.defaults.memory_mb, disk_mb=m.defaults.disk_mb,
        kernel_cmdline=m.kernel_cmdline + " moru.hostname=bench",
    )  # fmt: skip
    vm = PciQemuVmm().create(spec)  # the device set hostd boots (vsock on a PCIe port)
    t0 = time.monotonic()
    try:
        await vm.start()
        # As hostd waits (console line, then vsock), so the floor is the same wait.
        await wait_guestd(vm, m.guestd_port, time.monotonic() + 600)
        return time.monotonic() - t0
    finally:
        await vm.destroy()
        os.rmdir(d)


def create_to_first_command(h: Hostd, template: str) -> tuple[float, pb.SandboxInfo]:
    t0 = time.monotonic()
    s = h.create(template=template)
    code, _, _ = h.run(s, "true")
    assert code == 0
    return time.monotonic() - t0, s


def round_trips_via_hostd(h: Hostd, s: pb.SandboxInfo, n: int) -> tuple[float, float]:
    """Median seconds of Process.List (unary) and Start("true") (stream) through hostd."""
    md = h.md(s)
    unary, stream = [], []
    for _ in range(n):
        t = time.perf_counter()
        h.process.List(process_pb2.ListRequest(), metadata=md)
        unary.append(time.perf_counter() - t)
        t = time.perf_counter()
        h.run(s, "true")
        stream.append(time.perf_counter() - t)
    return statistics.median(unary), statistics.median(stream)


async def round_trips_direct(vsock_uds: Path, token: str, n: int) -> tuple[float, float]:
    """The same calls straight to guestd through our own relay on the VM's vsock socket."""
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="mb"))
    relay = VsockRelay(d / "r.sock", vsock_uds, 50051)
    await relay.start()
    ch = open_channel(relay.target)
    stub = process_pb2_grpc.ProcessStub(ch)
    md = ((TOKEN_HEADER, token),)
    req = process_pb2.StartRequest(config=process_pb2.ProcessConfig(shell="true"))
    unary, stream = [], []
    try:
        for _ in range(n):
            t = time.perf_counter()
            await stub.List(process_pb2.ListRequest(), metadata=md)
            unary.append(time.perf_counter() - t)
            t = time.perf_counter()
            async for _ev in stub.Start(req, metadata=md):
                pass
            stream.append(time.perf_counter() - t)
    finally:
        await ch.close(None)
        await relay.close()
        os.rmdir(d)
    return statistics.median(unary), statistics.median(stream)


# Parts of a VM process's memory, from /proc/<pid>/smaps, as PSS (a page shared by
# n processes counts 1/n to each, so shared library and page-cache pages are
# counted once across all VMs). Guest RAM (the memory backend: a /dev/shm file,
# or a memfd, mapped shared by QEMU and the vsock device) is excluded: it is the
# guest's memory.
PARTS = ("tcg code cache", "other anon (heap, kernel copy, buffers)", "file-backed", "guest RAM")


def memory_parts(pid: int) -> dict[str, int]:
    """{part: PSS bytes} of one process (see PARTS)."""
    out = dict.fromkeys(PARTS, 0)
    part = PARTS[1]
    for ln in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        f = ln.split()
        if "-" in f[0] and len(f) >= 5 and ":" in f[3]:  # a mapping's header line
            name = f[5] if len(f) > 5 else ""
            if "memfd:" in ln or (name.startswith("/dev/shm/moru-") and name.endswith(".ram")):
                part = PARTS[3]
            elif name.startswith("/"):
                part = PARTS[2]
            elif "x" in f[1]:
                part = PARTS[0]  # TCG's code buffer is the only anonymous rwx memory
            else:
                part = PARTS[1]
        elif f[0] == "Pss:":
            out[part] += int(f[1]) * 1024
    return out


def vm_overhead(h: Hostd, sid: str) -> dict[str, dict[str, int]]:
    """{process name: memory_parts} of the sandbox's processes (from its cgroup)."""
    out: dict[str, dict[str, int]] = {}
    for cg in h.sandbox_cgroups():
        if cg.name == sid and cg.parent.parent.name == "pids":
            for p in (cg / "cgroup.procs").read_text().split():
                comm = Path(f"/proc/{p}/comm").read_text().strip()
                name = "qemu" if comm.startswith("qemu") else comm
                parts = out.setdefault(name, dict.fromkeys(PARTS, 0))
                for k, v in memory_parts(int(p)).items():
                    parts[k] += v
    return out


def rss(pid: int) -> int:
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        if ln.startswith("VmRSS:"):
            return int(ln.split()[1]) * 1024
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", default="base")
    ap.add_argument("--boots", type=int, default=2)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--idle", type=int, default=2)
    ap.add_argument("--only-memory", action="store_true", help="skip figures 1 and 2")
    ap.add_argument(
        "--ready-snapshot",
        action="store_true",
        help="hostd keeps a ready snapshot of the template; creates restore it",
    )
    args = ap.parse_args()

    h = Hostd(max_sandboxes=16, memory_budget_mb=16384)
    h.network = {"enabled": False}
    h.config["create_deadline_seconds"] = 600.0
    if args.ready_snapshot:
        h.config["ready_snapshot_templates"] = args.template
    h.start()
    if args.ready_snapshot:
        t0, ready = time.monotonic(), h.state / "ready"
        while not any(ready.glob(f"{args.template}-*/ready.json")):
            assert time.monotonic() - t0 < 1800, "no ready snapshot after 1800 s"
            time.sleep(2)
        print(f"# ready snapshot of {args.template} made in {time.monotonic() - t0:.0f} s")
    sandboxes: list[pb.SandboxInfo] = []
    try:
        if not args.only_memory:
            # 1. Create -> first command vs bare boot, interleaved so load hits both alike.
            floors, creates = [], []
            for _ in range(args.boots):
                floors.append(asyncio.run(bare_boot(args.template)))
                dt, s = create_to_first_command(h, args.template)
                creates.append(dt)
                sandboxes.append(s)
            print(f"# {args.boots} boots each; medians")
            line("create -> first command (s)", statistics.median(creates),
                 statistics.median(floors), "s ", "target <= 1.2x")  # fmt: skip

            # 2. Round trips through hostd vs straight to guestd, same VM.
            s = sandboxes[0]
            uds = h.state / "sandboxes" / s.sandbox_id / "v.sock"
            hu, hs = round_trips_via_hostd(h, s, args.calls)
            du, ds = asyncio.run(round_trips_direct(uds, s.access_token, args.calls))
            line("unary round trip Process.List (ms)", hu * 1e3, du * 1e3, "ms", "target <= 1.5x")
            line('command round trip run("true") (ms)', hs * 1e3, ds * 1e3, "ms", "target <= 1.5x")

        # 3. Memory per idle sandbox.
        assert h.proc is not None
        for sb in sandboxes:
            h.kill(sb.sandbox_id)
        sandboxes.clear()
        time.sleep(2)
        hostd_empty = rss(h.proc.pid)
        for _ in range(args.idle):
            sandboxes.append(h.create(template=args.template))
        time.sleep(5)  # settle: first metrics samples, idle guests
        hostd_share = max(0, rss(h.proc.pid) - hostd_empty) / args.idle
        per_vm = [vm_overhead(h, sb.sandbox_id) for sb in sandboxes]
        mean: dict[str, dict[str, float]] = {}
        for vm in per_vm:
            for proc, parts in vm.items():
                for k, v in parts.items():
                    d = mean.setdefault(proc, dict.fromkeys(PARTS, 0.0))
                    d[k] += v / len(per_vm)
        mb = 2**20
        vmm = sum(v for d in mean.values() for k, v in d.items() if k != "guest RAM")
        per = (vmm + hostd_share) / mb
        print(
            f"{'host memory overhead per idle sandbox (MB)':<44} {per:9.1f} MB   (target <= 40 MB)"
        )
        for proc, d in sorted(mean.items()):
            shown = ", ".join(f"{k} {v / mb:.1f}" for k, v in d.items() if k != "guest RAM")
            ram = d["guest RAM"] / mb
            print(f"    {proc}: {shown} MB; guest RAM touched {ram:.0f} MB, not counted")
        print(f"    hostd's growth per sandbox {hostd_share / mb:.1f} MB (RSS, {args.idle} idle)")
    finally:
        left = h.close()
    if left:
        print("left behind:", left, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

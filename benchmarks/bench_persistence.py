#!/usr/bin/env python3
"""Persistence benchmark: every figure next to its floor measured in the same run.

1. Pause to disk vs guest memory size (default 256, 512 MiB): save time next to
   writing the same number of bytes to the same disk with fsync (the floor),
   and the snapshot size.
2. Resume (restore until guestd answers) next to a cold boot of the same VM
   to guestd-ready.
3. Create from a ready snapshot (restore + Init + first command) vs cold
   create (boot to guestd-ready + Init + first command), same run. Target <= 0.3x.

VMs are started with the driver directly (hostd.vmm.snapshot.PciQemuVmm), the
way hostd would once wired (docs/persistence.md).

Usage: bench_persistence.py [--mem 256,512,1024] [--clones N]   (root; images built)
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "persistence"))
sys.path.insert(0, str(ROOT))

from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402
from guestcmd import check  # noqa: E402
from pcivm import boot_pci, wait_guestd  # noqa: E402
from vmfixtures import BootedVm, VmRunner, make_spec  # noqa: E402

from hostd.vmm import snapshot  # noqa: E402
from hostd.vmm.snapshot import EJECT_SCRIPT, PciQemuVmm  # noqa: E402
from moru_proto.guest.v1 import guest_pb2  # noqa: E402


def line(name: str, value: float, floor_name: str, floor: float) -> None:
    print(
        f"  {name:<34} {value:8.2f} s   floor ({floor_name}) {floor:8.2f} s"
        f"   ratio {value / floor if floor else float('nan'):.2f}x",
        flush=True,
    )


def write_floor(directory: Path, nbytes: int) -> float:
    """Writing nbytes to a new file in directory, fsynced: the least a save can cost."""
    p = directory / "floor.bin"
    block = os.urandom(1 << 20)
    t0 = time.monotonic()
    with p.open("wb") as f:
        left = nbytes
        while left > 0:
            n = f.write(block[: min(left, len(block))])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    dt = time.monotonic() - t0
    p.unlink()
    return dt


def init(vm: BootedVm, sid: str) -> None:
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    vm.guest.Init(
        guest_pb2.InitRequest(sandbox_id=sid, template_id="base", hostname=sid.replace("_", "-"),
                              wall_clock=ts, entropy=secrets.token_bytes(64)),
        timeout=60,
    )  # fmt: skip


def bench_memory(runner: VmRunner, mem: int) -> None:
    vm = boot_pci(runner, memory_mb=mem, vcpus=1)
    try:
        cold = vm.boot_seconds
        # Touch guest memory like a working sandbox would (page cache of a file).
        check(vm.process, f"head -c {mem // 8}M /dev/zero | tr '\\0' x > /tmp/fill", 600)
        snap = vm.vm.spec.run_dir / "mem.snap"
        check(vm.process, EJECT_SCRIPT)
        info = runner.run(snapshot.save(vm.vm, snap, guest_ejected=True))
        floor = write_floor(snap.parent, info.size_bytes)
        print(f"guest memory {mem} MiB: snapshot {info.size_bytes >> 20} MiB", flush=True)
        line("pause to disk (save)", info.save_seconds, "write+fsync same bytes", floor)
        print(f"  {'  of which vsock unplug':<34} {info.unplug_seconds:8.2f} s")
        t0 = time.monotonic()
        vm.vm = runner.run(snapshot.restore(PciQemuVmm(), vm.vm.spec, snap))
        wait_guestd(vm, 300)
        line("resume (restore to guestd)", time.monotonic() - t0, "cold boot to guestd", cold)
    finally:
        vm.destroy()


def bench_ready(runner: VmRunner, mem: int, clones: int) -> None:
    t0 = time.monotonic()
    template = boot_pci(runner, memory_mb=mem, vcpus=1)
    ready = Path(tempfile.mkdtemp(dir="/tmp", prefix="mbrdy"))
    booted: list[BootedVm] = []
    try:
        check(template.process, EJECT_SCRIPT)
        runner.run(snapshot.save_ready(template.vm, ready, guest_ejected=True))
        template.destroy()
        # Cold create: a fresh boot + Init + first command.
        t0 = time.monotonic()
        cold_vm = boot_pci(runner, memory_mb=mem, vcpus=1)
        booted.append(cold_vm)
        init(cold_vm, cold_vm.sandbox_id)
        check(cold_vm.process, "true")
        cold = time.monotonic() - t0
        cold_vm.destroy()
        warm = []
        for _ in range(clones):
            sid = "sbx_b" + secrets.token_hex(5)
            tmp = Path(tempfile.mkdtemp(dir="/tmp", prefix="mbcl"))
            spec = make_spec(template.manifest, tmp / "vm", sandbox_id=sid, memory_mb=mem, vcpus=1)
            t0 = time.monotonic()
            try:
                vm = runner.run(snapshot.restore_ready(PciQemuVmm(), spec, ready))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            b = BootedVm(runner, vm, None, template.manifest, tmp)
            booted.append(b)
            wait_guestd(b, 300)
            init(b, sid)
            check(b.process, "true")
            warm.append(time.monotonic() - t0)
            b.destroy()
        print(f"create ({mem} MiB guest), {clones} from the ready snapshot:", flush=True)
        line("create from ready snapshot (max)", max(warm), "cold create", cold)
        line("create from ready snapshot (min)", min(warm), "cold create", cold)
        print("  target <= 0.30x")
    finally:
        for b in booted:
            b.destroy()
        template.destroy()
        shutil.rmtree(ready, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mem", default="256,512", help="guest memory sizes in MiB (comma list)")
    ap.add_argument("--clones", type=int, default=2)
    args = ap.parse_args()
    runner = VmRunner()
    try:
        print(f"load average at start: {os.getloadavg()}")
        for mem in (int(m) for m in args.mem.split(",")):
            bench_memory(runner, mem)
        bench_ready(runner, 256, args.clones)
    finally:
        runner.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

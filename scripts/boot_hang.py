"""Cold-boots the PCI variant of `base` N times, K at a time, and counts boots that never finish.

    PYTHONPATH=$PWD /opt/moru/venv/bin/python scripts/boot_hang.py \
        --boots 10 --parallel 2 --ram file --quota 1.75 --load 2

A boot "hangs" when guestd's console line has not come after --cpu-limit s
of the VM's CPU time (a normal boot takes 8-11 s) or --wall s, or when the
kernel said it disabled its APIC timer: the checks of hostd.readiness
(BootStuck), which hostd's Create answers with a fresh VM. The kernel runs
without `quiet` (loglevel=7), so the console shows where it stops; the script
prints each boot's last console line and whether the kernel disabled its
local APIC timer ("APIC frequency too slow"): the calibration of that timer
is what a starved vCPU gets wrong.

Factors: --ram (memfd | file in /dev/shm), --quota (CPUs of the sandbox's
cgroup v1 CFS quota; 0: no cgroup), --shares (cpu.shares, 10 = the 1% of a
pool member), --load (busy loops started here, ended by PID), --args (extra
kernel parameters, e.g. a candidate fix).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from vmfixtures import make_spec

from hostd.cgroups import CgroupManager
from hostd.readiness import GUESTD_READY_LINE, BootStuck, VmExited, cpu_seconds, wait_console_line
from hostd.vmm.qemu import PciQemuVm, PciQemuVmm
from images.manifest import load_manifest

APIC_TOO_SLOW = "APIC frequency too slow"


class MemfdPciVm(PciQemuVm):
    """The PCI variant with guest RAM in a memfd (what the driver used before /dev/shm)."""

    def memory_backend(self, size: str) -> str:
        return f"memory-backend-memfd,id=mem,size={size},share=on"


class MemfdPciVmm(PciQemuVmm):
    def create(self, spec: Any) -> PciQemuVm:
        return MemfdPciVm(self, spec)


def cmdline(base: str, extra: str) -> str:
    words = [w for w in base.split() if w != "quiet"] + ["loglevel=7", *extra.split()]
    return " ".join(words)


async def one(i: int, args: argparse.Namespace, cgm: CgroupManager | None) -> dict[str, Any]:
    m = load_manifest("base")
    tmp = Path(tempfile.mkdtemp(dir="/tmp", prefix="bhang"))
    sid = f"sbx_bh{i:02d}{os.getpid() % 10000:04d}"
    cg = cgm.create(sid, 2, m.defaults.memory_mb << 20) if cgm else None
    if cg is not None and args.shares:
        cg.set_cpu_weight(args.shares)
    spec = make_spec(m, tmp / "vm", sandbox_id=sid, cgroup=cg)
    spec = replace(spec, kernel_cmdline=cmdline(spec.kernel_cmdline, args.args))
    vmm = MemfdPciVmm() if args.ram == "memfd" else PciQemuVmm()
    vm = vmm.create(spec)
    rec: dict[str, Any] = {"boot": i, "ram": args.ram, "quota": args.quota, "args": args.args}
    t0 = time.monotonic()
    try:
        await vm.start()
        try:
            rec["ok"] = await wait_console_line(
                vm, GUESTD_READY_LINE, t0 + args.wall, interval=0.2, cpu_budget=args.cpu_limit
            )
        except BootStuck as e:  # what hostd's Create now retries with a fresh VM
            rec["ok"], rec["stuck"] = False, str(e)
        except VmExited:
            rec["ok"], rec["exited"] = False, True
        cpu = cpu_seconds(vm.pids)
        text = vm.console_log.read_text(errors="replace") if vm.console_log.exists() else ""
        rec["seconds"] = round(time.monotonic() - t0, 1)
        rec["cpu"] = round(cpu, 1)
        rec["apic_too_slow"] = APIC_TOO_SLOW in text
        lines = [ln for ln in text.splitlines() if ln.strip()]
        rec["last"] = lines[-1][-110:] if lines else ""
        if cg is not None:
            cpu_dir = next(f.parent for f in cg.procs_files if (f.parent / "cpu.stat").exists())
            stat = dict(ln.split() for ln in (cpu_dir / "cpu.stat").read_text().splitlines())
            rec["throttled"] = f"{stat['nr_throttled']}/{stat['nr_periods']}"
        if not rec["ok"] or args.keep_all:
            tag = "ok" if rec["ok"] else "hang"
            keep = args.out / f"{tag}{i}-{args.ram}-q{args.quota}-{os.getpid()}"
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(vm.console_log, keep / "console.log")
            (keep / "boot.json").write_text(json.dumps(rec, indent=1))
    except Exception as e:
        rec["error"] = repr(e)
    finally:
        await vm.destroy()
        if cg is not None:
            await cg.remove()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(rec), flush=True)
    return rec


def busy_loops(n: int) -> list[subprocess.Popen[bytes]]:
    """n shell loops that spin until killed (by the caller, by PID)."""
    return [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(n)]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=10)
    ap.add_argument("--parallel", type=int, default=2, choices=[1, 2])
    ap.add_argument("--ram", default="file", choices=["file", "memfd"])
    ap.add_argument("--quota", type=float, default=1.75, help="CPUs (0: no cgroup)")
    ap.add_argument("--shares", type=int, default=0, help="cpu weight, 1..100 (0: default)")
    ap.add_argument("--load", type=int, default=0, help="busy loops to run meanwhile")
    ap.add_argument("--args", default="", help="extra kernel parameters")
    ap.add_argument("--cpu-limit", type=float, default=40.0)
    ap.add_argument("--wall", type=float, default=150.0)
    ap.add_argument("--keep-all", action="store_true", help="keep every console, not only hangs")
    ap.add_argument("--out", type=Path, default=Path("/tmp/boothang"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cgm = None
    if args.quota:
        ncpu = os.cpu_count() or 1
        cgm = CgroupManager("moru-boothang", cpu_reserve=max(0.0, ncpu - args.quota) or 0.0)
    loops = busy_loops(args.load)
    load_cg = None
    if cgm is not None and loops:
        # The busy loops are a sibling sandbox at full weight (as a busy sandbox
        # next to a warm pool member is).
        load_cg = cgm.create(f"sbx_bhload{os.getpid()}", 2, 64 << 20)
        for p in loops:
            for f in load_cg.procs_files:
                f.write_text(str(p.pid))
    sem = asyncio.Semaphore(args.parallel)

    async def run(i: int) -> dict[str, Any]:
        async with sem:
            return await one(i, args, cgm)

    try:
        recs = await asyncio.gather(*(run(i) for i in range(args.boots)))
    finally:
        for p in loops:
            p.kill()
            p.wait()
        if load_cg is not None:
            await load_cg.remove()
        if cgm is not None:
            cgm.remove_root()
    hung = [r["boot"] for r in recs if r.get("ok") is False]
    slow = [r["boot"] for r in recs if r.get("apic_too_slow")]
    print(f"ram={args.ram} quota={args.quota} shares={args.shares} load={args.load} "
          f"args={args.args!r} boots={len(recs)} hung={len(hung)} {hung} "
          f"apic-too-slow={len(slow)} {slow} errors={sum('error' in r for r in recs)} "
          f"loadavg={os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())

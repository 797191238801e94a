#!/usr/bin/env python3
"""Persistence benchmark: every figure next to its floor measured in the same run.

1. Pause to disk vs guest memory size (default 256, 512 MiB): save time next to
   writing the same number of bytes to the same disk with fsync (the floor),
   and the snapshot size.
2. Resume (restore until guestd answers) next to a cold boot of the same VM
   to guestd-ready.
3. Create from a ready snapshot (restore + Init + first command) vs cold
   create (boot to guestd-ready + Init + first command), same run. Target <= 0.3x.
4. The same through hostd's API (`--hostd N`): Create + first command on a
   hostd keeping a ready snapshot of the template vs on a hostd without one,
   alternating, N of each, the template's default shape.

VMs are started with the driver directly (hostd.vmm.qemu.PciQemuVmm), the
way hostd would once wired (docs/persistence.md).

5. `--restore N`: a ready snapshot's restore step by step (driver restore,
   guestd reachable, Init, first command) next to copying its RAM image.

Usage: bench_persistence.py [--mem 256,512,1024] [--clones N] [--hostd N] [--only-hostd]
       [--restore N]
(root; images built)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import secrets
import shutil
import subprocess
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

from hostd.ready_snapshots import restore_ready, save_ready  # noqa: E402
from hostd.rundir import snapshot_ram  # noqa: E402
from hostd.vmm.qemu import PciQemuVmm  # noqa: E402
from hostd.vmm.qemu.hotplug import EJECT_SCRIPT  # noqa: E402
from images.manifest import load_manifest  # noqa: E402
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
        info = runner.run(vm.vm.save(snap, guest_ejected=True))
        floor = write_floor(snap.parent, info.size_bytes)
        print(f"guest memory {mem} MiB: snapshot {info.size_bytes >> 20} MiB", flush=True)
        line("pause to disk (save)", info.save_seconds, "write+fsync same bytes", floor)
        print(f"  {'  of which vsock unplug':<34} {info.unplug_seconds:8.2f} s")
        t0 = time.monotonic()
        vm.vm = runner.run(PciQemuVmm().restore(vm.vm.spec, snap))
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
        runner.run(save_ready(template.vm, ready, guest_ejected=True))
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
                vm = runner.run(restore_ready(PciQemuVmm(), spec, ready))
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


def copy_floor(ram: Path) -> float:
    """Copying a RAM image to /dev/shm as a restore does: the data it must move."""
    dst = Path("/dev/shm") / f"moru-bench-{secrets.token_hex(4)}.ram"
    t0 = time.monotonic()
    subprocess.run(["cp", "--sparse=auto", str(ram), str(dst)], check=True)
    dt = time.monotonic() - t0
    dst.unlink()
    return dt


def bench_restore(runner: VmRunner, mem: int, n: int) -> None:
    """A ready snapshot's restore, step by step, next to the RAM copy it cannot avoid."""
    template = boot_pci(runner, memory_mb=mem, vcpus=1)
    ready = Path(tempfile.mkdtemp(dir="/tmp", prefix="mbrst"))
    try:
        check(template.process, EJECT_SCRIPT)
        info = runner.run(save_ready(template.vm, ready, guest_ejected=True))
        template.destroy()
        ram = snapshot_ram(ready / "mem.snap")
        print(f"ready snapshot ({mem} MiB guest): state {(ready / 'mem.snap').stat().st_size >> 10}"
              f" KiB, RAM image {ram.stat().st_blocks * 512 >> 20} MiB allocated, saved in "
              f"{info.save_seconds:.2f} s", flush=True)  # fmt: skip
        rows: list[tuple[float, float, float, float, float]] = []
        for _ in range(n):
            floor = copy_floor(ram)
            sid = "sbx_r" + secrets.token_hex(5)
            tmp = Path(tempfile.mkdtemp(dir="/tmp", prefix="mbrc"))
            spec = make_spec(template.manifest, tmp / "vm", sandbox_id=sid, memory_mb=mem, vcpus=1)
            t0 = time.monotonic()
            try:
                vm = runner.run(restore_ready(PciQemuVmm(), spec, ready))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            t1 = time.monotonic()
            b = BootedVm(runner, vm, None, template.manifest, tmp)
            try:
                wait_guestd(b, 300)
                t2 = time.monotonic()
                init(b, sid)
                t3 = time.monotonic()
                check(b.process, "true")
                rows.append((floor, t1 - t0, t2 - t1, t3 - t2, time.monotonic() - t3))
            finally:
                b.destroy()
        print(f"restore of the ready snapshot, {n} runs (load {os.getloadavg()[0]:.1f}):")
        for floor, restore, reach, ini, first in rows:
            line("driver restore (RAM, QEMU, vsock)", restore, "cp RAM image", floor)
            print(f"  {'  then guestd reachable':<34} {reach:8.2f} s\n"
                  f"  {'  then Init':<34} {ini:8.2f} s\n"
                  f"  {'  then first command':<34} {first:8.2f} s", flush=True)  # fmt: skip
    finally:
        template.destroy()
        shutil.rmtree(ready, ignore_errors=True)


def bench_hostd_ready(n: int, template: str = "base") -> None:
    """Create -> first command through hostd: from its ready snapshot vs cold (another hostd)."""
    sys.path.insert(0, str(ROOT / "tests" / "hostd"))
    from hostd_framework import Hostd, wait_for

    # A private copy of the template: a rebuild of the shared cache meanwhile
    # would (rightly) make the ready snapshot stale and the creates cold.
    images = Path(tempfile.mkdtemp(dir="/tmp", prefix="mbimg"))
    m = load_manifest(template)
    (images / "files").mkdir()
    paths = {}
    for key in ("kernel", "initramfs", "rootfs"):
        dst = images / "files" / Path(getattr(m, key)).name
        subprocess.run(["cp", "--sparse=always", getattr(m, key), str(dst)], check=True)
        paths[key] = str(dst)
    (images / "templates" / template).mkdir(parents=True)
    (images / "templates" / template / "manifest.json").write_text(
        dataclasses.replace(
            m, kernel=paths["kernel"], initramfs=paths["initramfs"], rootfs=paths["rootfs"]
        ).to_json()
    )
    warm_h = Hostd(max_sandboxes=4, ready_snapshot_templates=template, images_dir=str(images))
    cold_h = Hostd(max_sandboxes=4, images_dir=str(images))
    try:
        t0 = time.monotonic()
        warm_h.start(timeout=120)
        cold_h.start(timeout=120)
        ready = warm_h.state / "ready"
        wait_for(lambda: ready.is_dir() and any((d / "ready.json").is_file()
                                                for d in ready.iterdir()),
                 1200, interval=1.0, what="the ready snapshot")  # fmt: skip
        print(f"hostd made its ready snapshot of {template} {time.monotonic() - t0:.0f} s "
              "after start", flush=True)  # fmt: skip

        def create_run(h: Hostd) -> float:
            t = time.monotonic()
            s = h.create(template=template)
            code, _, _ = h.run(s, "true")
            took = time.monotonic() - t
            assert code == 0
            h.kill(s.sandbox_id)
            return took

        cold, warm = [], []
        for _ in range(n):
            cold.append(create_run(cold_h))
            warm.append(create_run(warm_h))
            print(f"  cold {cold[-1]:.2f} s, from ready snapshot {warm[-1]:.2f} s", flush=True)
        log = warm_h.log_tail(1_000_000)
        assert "ready_snapshot" in log
        # hostd's own time for each Create (its log line), without the client's round trips.
        inside = [float(m) for m in re.findall(r"created \S+ \(template \S+, ready_snapshot\)"
                                               r" in ([0-9.]+) s", log)]  # fmt: skip
        steps = re.findall(r"RAM file copied \(vsock backend started\) in ([0-9.]+) s, QEMU up "
                           r"in ([0-9.]+) s, state "
                           r"loaded in ([0-9.]+) s.*?vsock device back in ([0-9.]+) s", log, re.S)
        restored = [float(m) for m in re.findall(r"restored from ready snapshot \S+ and "
                                                 r"initialized in ([0-9.]+) s", log)]  # fmt: skip
        if inside:
            print(f"  hostd time per Create from the ready snapshot: "
                  f"{', '.join(f'{x:.2f}' for x in inside)} s (target <= 0.50 s)\n"
                  f"    of which restore + guestd reachable + Init: "
                  f"{', '.join(f'{x:.2f}' for x in restored)} s (the rest: checks, store, "
                  f"cgroup, network, first metrics sample)")  # fmt: skip
        for ram_s, qemu_s, state_s, vsock_s in steps:
            print(f"    RAM copy {ram_s} s, QEMU start {qemu_s} s, state load {state_s} s, "
                  f"vsock re-plug + guest probe {vsock_s} s")
        print(f"hostd Create + first command, {template} defaults, {n} each (load "
              f"{os.getloadavg()[0]:.1f}):")  # fmt: skip
        line("from ready snapshot (median)", sorted(warm)[n // 2], "cold (median)",
             sorted(cold)[n // 2])  # fmt: skip
        line("from ready snapshot (max)", max(warm), "cold (min)", min(cold))
    finally:
        for h in (warm_h, cold_h):
            left = h.close()
            if left:
                print(f"left behind: {left}")
        shutil.rmtree(images, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mem", default="256,512", help="guest memory sizes in MiB (comma list)")
    ap.add_argument("--clones", type=int, default=2)
    ap.add_argument("--hostd", type=int, default=3, help="creates of each kind through hostd")
    ap.add_argument("--only-hostd", action="store_true", help="only the hostd comparison")
    ap.add_argument("--restore", type=int, default=0,
                    help="only: N restores of a ready snapshot, step by step (256 MiB guest)")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    if args.restore:
        # The driver logs where a restore's time goes (RAM copy, QEMU start, state, vsock).
        logging.basicConfig(format="    %(message)s")
        logging.getLogger("hostd.vmm.qemu.pci").setLevel(logging.INFO)
        runner = VmRunner()
        try:
            bench_restore(runner, 256, args.restore)
        finally:
            runner.close()
        return 0
    if args.hostd:
        bench_hostd_ready(args.hostd)
    if args.only_hostd:
        return 0
    runner = VmRunner()
    try:
        for mem in (int(m) for m in args.mem.split(",")):
            bench_memory(runner, mem)
        bench_ready(runner, 256, args.clones)
    finally:
        runner.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

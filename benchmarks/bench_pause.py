"""Pause to disk and resume THROUGH hostd's API vs guest memory size, floors from the same run.

Per memory size, one sandbox on one hostd:
  create (cold, until the first command answers)       -> the floor for resume
  fill 1/8 of guest memory (page cache), Pause (to disk) -> floor: write+fsync the
                                                           snapshot's bytes on the same disk
  Resume + first command                                -> ratio to the cold create
  Pause + Resume in place (pause_to_disk = false, same sandbox after a hostd restart)
                                                        -> what the memory saving costs
Prints the cgroup's memory charge running vs paused to disk.

Usage: bench_pause.py [--mem 256,512,1024]   (root; `base` built)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "hostd"))
sys.path.insert(0, str(ROOT))

from bench_persistence import line, write_floor  # noqa: E402  (one floor for both)
from hostd_framework import Hostd, pb  # noqa: E402


def cgroup_memory(h: Hostd, sid: str) -> int:
    for cg in h.sandbox_cgroups():
        for name in ("memory.usage_in_bytes", "memory.current"):
            if cg.name == sid and (cg / name).exists():
                return int((cg / name).read_text())
    return -1


def bench(mem: int) -> None:
    h = Hostd(max_sandboxes=2, memory_budget_mb=4096)
    try:
        h.start()
        t0 = time.monotonic()
        s = h.create(timeout_seconds=3600, memory_mb=mem, vcpus=2)
        assert h.run(s, "true")[0] == 0
        cold = time.monotonic() - t0
        sid = s.sandbox_id
        code, _, err = h.run(s, f"head -c {mem // 8}M /dev/zero | tr '\\0' x > /tmp/fill", 600)
        assert code == 0, err
        running_mem = cgroup_memory(h, sid)
        md = h.md()

        t0 = time.monotonic()
        h.sandboxes.Pause(pb.PauseRequest(sandbox_id=sid), metadata=md, timeout=900)
        pause = time.monotonic() - t0
        snap = h.state / "sandboxes" / sid / "mem.snap"
        size = snap.stat().st_size
        paused_mem = cgroup_memory(h, sid)
        floor = write_floor(snap.parent, size)
        t0 = time.monotonic()
        h.sandboxes.Resume(pb.ResumeRequest(sandbox_id=sid), metadata=md, timeout=900)
        assert h.run(s, "true")[0] == 0
        resume = time.monotonic() - t0

        h.config["pause_to_disk"] = False
        h.stop()
        h.start()
        md = h.md()
        t0 = time.monotonic()
        h.sandboxes.Pause(pb.PauseRequest(sandbox_id=sid), metadata=md, timeout=60)
        pause_ip = time.monotonic() - t0
        t0 = time.monotonic()
        h.sandboxes.Resume(pb.ResumeRequest(sandbox_id=sid), metadata=md, timeout=60)
        assert h.run(s, "true")[0] == 0
        resume_ip = time.monotonic() - t0

        print(f"guest memory {mem} MiB, 2 vCPUs: snapshot {size >> 20} MiB; cgroup memory "
              f"{running_mem >> 20} MiB running, {paused_mem >> 20} MiB paused to disk "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
        log = h.log_tail(1_000_000).splitlines()
        for ln in log:  # hostd's own breakdown (vsock unplug / restore / guestd reachable)
            if sid in ln and ("paused to disk:" in ln or "restored in" in ln):
                print("  hostd:", ln.split(": ", 1)[-1].split(f"{sid} ", 1)[-1])
        line("Pause (to disk) via hostd", pause, "write+fsync same bytes", floor)
        line("Resume + first command via hostd", resume, "cold Create + first command", cold)
        line("Pause in place via hostd", pause_ip, "Pause to disk", pause)
        line("Resume in place + first command", resume_ip, "Resume from disk", resume)
    finally:
        left = h.close()
        if left:
            print(f"left behind: {left}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mem", default="256,512,1024", help="guest memory sizes in MiB (comma list)")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    for mem in (int(m) for m in args.mem.split(",")):
        bench(mem)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Boots `base` VMs N times, K at a time, without hostd's retry; counts vsock-silent boots.

    PYTHONPATH=/work/main RUST_LOG=debug /opt/moru/venv/bin/python scripts/vsock_silence.py \
        --boots 16 --parallel 2 --mode line --out /tmp/vsilence

Modes (how the vsock port is dialled):
  line           once the console says guestd listens, every 0.1 s (hostd's pattern)
  early          from power-on, every --interval s (what used to trigger the silence)
  product        hostd.readiness.wait_guestd as is
  product-early  wait_guestd plus a stray dialler from power-on (detection speed)

A silent boot is one whose device never answers (30 s after the line, or 240 s
from power-on). For those it keeps vsk.err (the device's log: RUST_LOG is passed
through), the console and QEMU's view of the vsock rings (x-query-virtio-*), and
prints whether vhost-device-vsock's `vring_worker` thread still runs: the root
cause (see QemuVm.vsock_device_dead) shows as that thread gone and the rings
untouched (RX used.idx 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from vmfixtures import make_spec

from hostd.readiness import (
    GUESTD_READY_LINE,
    VsockSilent,
    wait_console_line,
    wait_guestd,
)
from hostd.vmm.qemu import QemuVm, QemuVmm
from hostd.vmm.qemu.process import thread_names as _thread_names
from hostd.vmm.qmp import qmp_command
from hostd.vsock import dial_socket
from images.manifest import load_manifest


async def rings(vm: QemuVm) -> dict[str, Any]:
    """QEMU's view of the vsock device: status, vhost state, ring indexes in guest memory."""
    out: dict[str, Any] = {}
    try:
        for d in await qmp_command(vm.qmp_sock, "x-query-virtio"):
            if "vsock" not in d.get("name", ""):
                continue
            st = await qmp_command(vm.qmp_sock, "x-query-virtio-status", {"path": d["path"]})
            out["status"] = st.get("status")
            out["vhost_started"] = st.get("started")
            for q in (0, 1):
                el = await qmp_command(
                    vm.qmp_sock, "x-query-virtio-queue-element", {"path": d["path"], "queue": q}
                )
                out[f"q{q}"] = {"avail_idx": el["avail"]["idx"], "used_idx": el["used"]["idx"]}
    except Exception as e:
        out["error"] = repr(e)
    return out


async def dial_loop(vm: QemuVm, port: int, until: float, interval: float) -> bool:
    while time.monotonic() < until:
        with contextlib.suppress(OSError, TimeoutError):
            (await dial_socket(vm.vsock_uds, port, 2.0)).close()
            return True
        await asyncio.sleep(interval)
    return False


async def one(i: int, args: argparse.Namespace) -> dict[str, Any]:
    m = load_manifest("base")
    port = m.guestd_port
    tmp = Path(tempfile.mkdtemp(dir="/tmp", prefix="vsil"))
    vm = QemuVmm().create(make_spec(m, tmp / "vm"))
    rec: dict[str, Any] = {"boot": i}
    t0 = time.monotonic()
    stray: asyncio.Future[bool] | None = None
    try:
        await vm.start()
        if args.mode in ("product", "product-early"):
            if args.mode == "product-early":
                stray = asyncio.ensure_future(dial_loop(vm, port, t0 + 240, args.interval))
            try:
                await wait_guestd(vm, port, time.monotonic() + 240)
                rec["ok"] = True
            except VsockSilent as e:
                rec["ok"], rec["silent"] = False, str(e)
        elif args.mode == "line":
            seen = await wait_console_line(vm, GUESTD_READY_LINE, time.monotonic() + 240)
            rec["line_s"] = round(time.monotonic() - t0, 1)
            rec["ok"] = await dial_loop(vm, port, time.monotonic() + (30 if seen else 240), 0.1)
        else:
            rec["ok"] = await dial_loop(vm, port, time.monotonic() + 240, args.interval)
        rec["seconds"] = round(time.monotonic() - t0, 1)
        names = _thread_names(vm.pids[-1]) or []
        rec["worker_alive"] = "vring_worker" in names
        if not rec["ok"]:
            rec["rings"] = await rings(vm)
            keep = args.out / f"silent{i}"
            keep.mkdir(parents=True, exist_ok=True)
            for f in ("vsk.err", "console.log", "vmm.err"):
                with contextlib.suppress(OSError):
                    shutil.copy(vm.spec.run_dir / f, keep / f)
            (keep / "boot.json").write_text(json.dumps(rec, indent=1))
    except Exception as e:
        rec["error"] = repr(e)
    finally:
        if stray is not None:
            stray.cancel()
        await vm.destroy()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({k: v for k, v in rec.items() if k != "rings"}), flush=True)
    return rec


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=16)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--mode", default="line",
                    choices=["line", "early", "product", "product-early"])  # fmt: skip
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/vsilence"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sem = asyncio.Semaphore(args.parallel)

    async def run(i: int) -> dict[str, Any]:
        async with sem:
            return await one(i, args)

    recs = await asyncio.gather(*(run(i) for i in range(args.boots)))
    silent = [r["boot"] for r in recs if r.get("ok") is False]
    dead = [r["boot"] for r in recs if r.get("ok") is False and not r.get("worker_alive")]
    print(f"mode={args.mode} boots={len(recs)} silent={len(silent)} {silent} "
          f"worker-gone={len(dead)} errors={sum('error' in r for r in recs)} "
          f"load={os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())

"""Boot-to-guestd-ready for a template next to its floor, and vsock relay cost.

Floor: the same kernel and the same QEMU driver (hostd/vmm/qemu/) with a
minimal busybox initramfs whose init prints a marker; measured until the
marker reaches the console. Template: until guestd answers Health through
the vsock relay. Runs alternate so host load hits both alike. Besides wall
time, each boot's QEMU CPU time (user + system, all threads) is read at the
same moment: on a shared, loaded host it moves far less than wall time, so
its ratio is the steadier figure.

Then raw hybrid-vsock round trip and echo throughput (a Python echo server
started in the guest through guestd) against the same through VsockRelay.

    /opt/moru/venv/bin/python benchmarks/bench_boot.py [--template base] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostd.vmm.base import VmSpec
from hostd.vmm.qemu import QemuVm, QemuVmm
from hostd.vsock import VsockRelay, dial, wait_ready
from images.manifest import TemplateManifest, load_manifest
from moru_proto.guest.v1 import (
    filesystem_pb2,
    filesystem_pb2_grpc,
    guest_pb2,
    guest_pb2_grpc,
    process_pb2,
    process_pb2_grpc,
)

MARKER = "MORU-FLOOR-INIT-REACHED"
ECHO_PORT = 5000
ECHO_SERVER = f"""
import os, socket
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.bind((socket.VMADDR_CID_ANY, {ECHO_PORT}))
s.listen(16)
while True:
    c, _ = s.accept()
    if os.fork() == 0:
        while d := c.recv(1 << 18):
            c.sendall(d)
        os._exit(0)
    c.close()
"""


def floor_initramfs(dest: Path) -> Path:
    """A busybox-only initramfs whose /init prints MARKER and then idles."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise SystemExit("busybox not found: apt-get install busybox-static")
    root = dest / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    init = root / "init"
    init.write_text(
        f"#!/bin/busybox sh\n/bin/busybox echo {MARKER}\n"
        "while :; do /bin/busybox sleep 3600; done\n"
    )
    init.chmod(0o755)
    out = dest / "floor.cpio"
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    with out.open("wb") as f:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, stdout=f, check=True
        )
    return out


def cpu_seconds(vm: QemuVm) -> float:
    """User + system CPU time of the VM's QEMU process so far."""
    fields = Path(f"/proc/{vm.pids[0]}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spec(m: TemplateManifest, run_dir: Path, name: str, **kw: object) -> VmSpec:
    fields: dict[str, object] = dict(
        sandbox_id=name,
        kernel=Path(m.kernel),
        initramfs=Path(m.initramfs),
        rootfs=Path(m.rootfs),
        run_dir=run_dir,
        vcpus=m.defaults.vcpus,
        memory_mb=m.defaults.memory_mb,
        disk_mb=m.defaults.disk_mb,
        kernel_cmdline=f"{m.kernel_cmdline} moru.hostname={name}",
    )
    fields.update(kw)
    return VmSpec(**fields)  # type: ignore[arg-type]


async def boot_floor(
    m: TemplateManifest, initrd: Path, tmp: Path, i: int
) -> tuple[float, float]:
    s = spec(
        m, tmp / f"f{i}", f"floor{i}", initramfs=initrd,
        kernel_cmdline=f"{m.kernel_cmdline} rdinit=/init",
    )  # fmt: skip
    vm = QemuVmm().create(s)
    t0 = time.monotonic()
    try:
        await vm.start()
        while MARKER not in vm.console_tail(65536):
            if not vm.is_alive() or time.monotonic() - t0 > 300:
                raise RuntimeError(f"floor boot failed:\n{vm.console_tail()}")
            await asyncio.sleep(0.005)
        return time.monotonic() - t0, cpu_seconds(vm)
    finally:
        await vm.destroy()


# guestd's line on the console once it listens (hostd waits for it too).
READY_LINE = "guestd listening on vsock"
# vhost-device-vsock 0.3 sometimes never answers although guestd listens (see
# hostd/sandboxes.py): after this long past the console line, the boot is redone.
VSOCK_SILENCE = 30.0


class VsockSilent(RuntimeError):
    """guestd listens (console) but the vsock device does not answer."""


async def boot_ready(
    m: TemplateManifest, tmp: Path, name: str
) -> tuple[QemuVm, VsockRelay, float, float]:
    """Boots the template until guestd answers Health through a relay (caller destroys)."""
    vm = QemuVmm().create(spec(m, tmp / name, name))
    relay = VsockRelay(tmp / f"{name}.g", vm.vsock_uds, m.guestd_port)
    t0 = time.monotonic()
    try:
        await vm.start()
        while READY_LINE not in vm.console_tail(65536):
            if not vm.is_alive() or time.monotonic() - t0 > 300:
                raise RuntimeError(f"{name}: guestd did not start:\n{vm.console_tail()}")
            await asyncio.sleep(0.005)
        try:
            await wait_ready(vm.vsock_uds, m.guestd_port, time.monotonic() + VSOCK_SILENCE,
                             alive=vm.is_alive)
        except TimeoutError as e:
            raise VsockSilent(f"{name}: {e}") from None
        await relay.start()
        async with grpc.aio.insecure_channel(relay.target) as ch:
            await guest_pb2_grpc.GuestStub(ch).Health(guest_pb2.HealthRequest(), timeout=60)
        wall, cpu = time.monotonic() - t0, cpu_seconds(vm)
    except BaseException:
        await relay.close()
        await vm.destroy()
        raise
    return vm, relay, wall, cpu


async def rtt_us(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        w.write(b"x")
        await r.readexactly(1)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e6


async def echo_mb_s(r: asyncio.StreamReader, w: asyncio.StreamWriter, total: int) -> float:
    chunk = os.urandom(1 << 16)

    async def send() -> None:
        for _ in range(total // len(chunk)):
            w.write(chunk)
            await w.drain()

    async def receive() -> None:
        # In chunks: readexactly(n) beyond the reader's buffer limit never returns.
        left = total
        while left:
            data = await r.read(min(left, 1 << 20))
            if not data:
                raise ConnectionError("echo connection closed early")
            left -= len(data)

    t = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(send())
        tg.create_task(receive())
    return total / (time.perf_counter() - t) / 1e6


async def vsock_bench(vm: QemuVm, tmp: Path, relay_g: VsockRelay, rounds: int, mb: int) -> None:
    async with grpc.aio.insecure_channel(relay_g.target) as ch:
        fs = filesystem_pb2_grpc.FilesystemStub(ch)
        reqs = [
            filesystem_pb2.WriteRequest(header=filesystem_pb2.WriteHeader(path="/tmp/echo.py")),
            filesystem_pb2.WriteRequest(data=ECHO_SERVER.encode()),
        ]

        async def gen() -> AsyncIterator[filesystem_pb2.WriteRequest]:
            for r in reqs:
                yield r

        await fs.Write(gen(), timeout=60)
        proc = process_pb2_grpc.ProcessStub(ch)
        shell = "setsid python3 /tmp/echo.py </dev/null >/dev/null 2>&1 &"
        async for _ in proc.Start(
            process_pb2.StartRequest(config=process_pb2.ProcessConfig(shell=shell)), timeout=60
        ):
            pass
        guest = guest_pb2_grpc.GuestStub(ch)
        g = []
        for _ in range(rounds // 4):
            t = time.perf_counter()
            await guest.Health(guest_pb2.HealthRequest(), timeout=30)
            g.append(time.perf_counter() - t)
    await wait_ready(vm.vsock_uds, ECHO_PORT, time.monotonic() + 60)
    print("echo server up in the guest; measuring", flush=True)

    async with asyncio.timeout(600):
        r, w = await dial(vm.vsock_uds, ECHO_PORT, 10)
        raw_rtt = await rtt_us(r, w, rounds)
        raw_tp = await echo_mb_s(r, w, mb << 20)
        w.close()
        async with VsockRelay(tmp / "e.sock", vm.vsock_uds, ECHO_PORT) as relay:
            r, w = await asyncio.open_unix_connection(str(relay.path))
            rel_rtt = await rtt_us(r, w, rounds)
            rel_tp = await echo_mb_s(r, w, mb << 20)
            w.close()
    print(f"vsock round trip (1 byte, median of {rounds})")
    print(f"  raw hybrid vsock  {raw_rtt:9.0f} us   (floor)")
    print(f"  through relay     {rel_rtt:9.0f} us   ratio {rel_rtt / raw_rtt:.2f}x")
    print(f"vsock echo throughput ({mb} MiB)")
    print(f"  raw hybrid vsock  {raw_tp:9.1f} MB/s (floor)")
    print(f"  through relay     {rel_tp:9.1f} MB/s ratio {raw_tp / rel_tp:.2f}x slower")
    print(f"gRPC Guest.Health through relay: median {statistics.median(g) * 1e3:.2f} ms")


def sizes(m: TemplateManifest) -> None:
    print(f"image sizes for template {m.name!r} (apparent / on disk)")
    for label, p in (("kernel", m.kernel), ("initramfs", m.initramfs), ("rootfs", m.rootfs)):
        st = os.stat(p)
        print(f"  {label:9s} {st.st_size / 1e6:9.1f} MB / {st.st_blocks * 512 / 1e6:9.1f} MB  {p}")
    print(f"  manifest rootfs_bytes {m.rootfs_bytes / 1e6:.1f} MB")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", default="base")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--mb", type=int, default=32)
    args = ap.parse_args()
    task = asyncio.current_task()
    assert task is not None
    # A SIGTERM (e.g. from `timeout`) cancels, so every VM is still destroyed.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    m = load_manifest(args.template)
    tmp = Path(tempfile.mkdtemp(dir="/tmp", prefix="mb"))
    try:
        print(f"host load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        sizes(m)
        initrd = floor_initramfs(tmp)
        floors, readies, floor_cpu, ready_cpu = [], [], [], []
        silent = 0
        kept: tuple[QemuVm, VsockRelay] | None = None
        for i in range(args.runs):
            f_wall, f_cpu = await boot_floor(m, initrd, tmp, i)
            floors.append(f_wall)
            floor_cpu.append(f_cpu)
            for attempt in range(3):
                try:
                    vm, relay, t, t_cpu = await boot_ready(m, tmp, f"t{i}-{attempt}")
                    break
                except VsockSilent as e:
                    silent += 1
                    print(f"  run {i}: vsock device silent, booting again ({e})", flush=True)
            else:
                raise RuntimeError("the vsock device stayed silent in 3 boots in a row")
            readies.append(t)
            ready_cpu.append(t_cpu)
            if i == args.runs - 1:
                kept = (vm, relay)
            else:
                await relay.close()
                await vm.destroy()
            print(
                f"  run {i}: floor {f_wall:.2f} s ({f_cpu:.2f} s QEMU CPU), "
                f"{args.template} ready {t:.2f} s ({t_cpu:.2f} s QEMU CPU), "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        f, r = statistics.median(floors), statistics.median(readies)
        fc, rc = statistics.median(floor_cpu), statistics.median(ready_cpu)
        print(f"boot (median of {args.runs}, {os.cpu_count()} host CPUs, TCG unless KVM usable; "
              f"{silent} boot(s) redone for a silent vsock device)")
        print(f"  floor: kernel + busybox init     {f:7.2f} s   {fc:7.2f} s QEMU CPU")
        label = f"{args.template}: to guestd ready"
        print(
            f"  {label:32s} {r:7.2f} s   {rc:7.2f} s QEMU CPU   "
            f"ratio {r / f:.2f}x wall, {rc / fc:.2f}x CPU (target <= 1.5x)"
        )
        assert kept is not None
        try:
            await vsock_bench(kept[0], tmp, kept[1], args.rounds, args.mb)
        finally:
            await kept[1].close()
            await kept[0].destroy()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    uvloop.run(main())

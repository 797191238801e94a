"""Create from a template's ready snapshot: restore + Init gives each sandbox its own identity."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from guestcmd import check
from pcivm import boot_pci, wait_guestd
from vmfixtures import BootedVm, VmRunner, make_spec

from hostd.cgroups import CgroupManager
from hostd.ready_snapshots import restore_ready, save_ready
from hostd.vmm.qemu import PciQemuVmm
from hostd.vmm.qemu.hotplug import EJECT_SCRIPT
from moru_proto.guest.v1 import guest_pb2

pytestmark = pytest.mark.vm

RANDOM = "python3 -c 'import os; print(os.urandom(16).hex())'"
# A guest restored without Init would be behind by at least this (the
# snapshot's age); TCG guests on a loaded host also lag some seconds.
SNAPSHOT_AGE = 45.0


def _init(vm: BootedVm, sid: str) -> None:
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    vm.guest.Init(
        guest_pb2.InitRequest(sandbox_id=sid, template_id="base", hostname=sid.replace("_", "-"),
                              env={"WHO": sid}, wall_clock=ts, entropy=secrets.token_bytes(64)),
        timeout=60,
    )  # fmt: skip


def _identity(c: BootedVm) -> tuple[str, str]:
    """Hostname and 16 random bytes of a clone; checks its id, env and clock came from Init."""
    info = c.guest.GetInfo(guest_pb2.GetInfoRequest(), timeout=30)
    assert info.sandbox_id == c.sandbox_id and info.initialized
    assert info.hostname == c.sandbox_id.replace("_", "-")
    assert check(c.process, "hostname").strip() == info.hostname
    assert check(c.process, "printenv WHO").strip() == c.sandbox_id
    offset = float(check(c.process, "date +%s").strip()) - time.time()
    assert abs(offset) < SNAPSHOT_AGE - 15, f"guest clock off by {offset:.1f}s: not set by Init"
    return info.hostname, check(c.process, RANDOM).strip()


def _guest_ram_resident(qemu_pid: int) -> int:
    """Bytes of QEMU's shared memory resident (the guest RAM memfd is all of it)."""
    for ln in Path(f"/proc/{qemu_pid}/status").read_text().splitlines():
        if ln.startswith("RssShmem:"):
            return int(ln.split()[1]) << 10
    raise AssertionError("no RssShmem line")


def test_sandboxes_from_a_ready_snapshot_are_distinct_and_fast(
    vm_runner: VmRunner, vm_cgroups: CgroupManager
) -> None:
    template = boot_pci(vm_runner, cgroups=vm_cgroups, memory_mb=256, vcpus=1)
    ready = Path(tempfile.mkdtemp(dir="/tmp", prefix="mrdy"))
    clones: list[BootedVm] = []
    try:
        # Cold create is at least boot to guestd-ready (Init not even counted).
        cold = template.boot_seconds
        # The ready snapshot: booted, guestd waiting for Init.
        check(template.process, EJECT_SCRIPT)
        info = vm_runner.run(save_ready(template.vm, ready, guest_ejected=True))
        print(
            f"ready snapshot saved in {info.save_seconds:.2f}s (unplug {info.unplug_seconds:.2f}s)"
        )
        template.destroy()
        saved_at = time.monotonic()

        warm: list[float] = []
        seen: list[tuple[str, str]] = []
        for _ in range(2):
            sid = "sbx_c" + secrets.token_hex(5)
            tmp = Path(tempfile.mkdtemp(dir="/tmp", prefix="mcl"))
            spec = make_spec(template.manifest, tmp / "vm", sandbox_id=sid, memory_mb=256, vcpus=1)
            time.sleep(max(0.0, saved_at + SNAPSHOT_AGE - time.monotonic()))
            t0 = time.monotonic()
            try:
                vm = vm_runner.run(restore_ready(PciQemuVmm(), spec, ready))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # restore killed what it started
                raise
            booted = BootedVm(vm_runner, vm, None, template.manifest, tmp)
            clones.append(booted)
            wait_guestd(booted, 120)
            _init(booted, sid)
            check(booted.process, "true")
            warm.append(time.monotonic() - t0)
            # The restore read every page of the shared memfd (so allocated it); the
            # all-zero ones are given back before the guest runs (zeropages.py).
            resident = _guest_ram_resident(vm.pids[0])
            print(f"{sid}: guest RAM resident after restore + Init: {resident >> 20} MiB of 256")
            assert resident < 0.75 * (256 << 20), resident
            # Right after Init: under TCG on a loaded host guest clocks lag later on.
            seen.append(_identity(booted))
        print(f"cold create {cold:.2f}s, from ready snapshot {warm} -> "
              f"ratio {max(warm) / cold:.2f}")  # fmt: skip
        assert max(warm) < cold

        for c in clones:  # diagnostics only: TCG guests' clocks drift on a loaded host
            print(f"{c.sandbox_id} clock offset now: "
                  f"{float(check(c.process, 'date +%s.%N')) - time.time():+.1f}s")  # fmt: skip
        assert seen[0][0] != seen[1][0]
        assert seen[0][1] != seen[1][1], "clones produce the same random bytes"
    finally:
        for c in clones:
            c.destroy()
        template.destroy()
        shutil.rmtree(ready, ignore_errors=True)

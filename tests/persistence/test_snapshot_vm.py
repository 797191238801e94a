"""Pause to disk on real microVMs: processes keep running across save/restore, memory is freed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from guestcmd import check
from pcivm import boot_pci, wait_guestd
from vmfixtures import VmRunner

from hostd.cgroups import CgroupManager
from hostd.rundir import snapshot_ram
from hostd.vmm.qemu import PciQemuVmm
from hostd.vmm.qemu.hotplug import EJECT_SCRIPT
from hostd.vmm.specfile import load_spec

pytestmark = pytest.mark.vm

COUNTER = (
    # Written then renamed, so a reader never sees the file empty mid-write.
    "nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /root/count.new;"
    " mv /root/count.new /root/count; sleep 0.2; done'"
    " >/dev/null 2>&1 &"
)


RESTORE_ELSEWHERE = """
import asyncio, sys
from pathlib import Path
from hostd.vmm.qemu import PciQemuVmm
from hostd.vmm.specfile import load_spec
run_dir = Path(sys.argv[1])
asyncio.run(PciQemuVmm().restore(load_spec(run_dir), run_dir / "mem.snap"))
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _vm_memory(cg: object) -> int:
    """Anonymous + shmem (the memfd guest RAM) bytes of the cgroup; page cache left out."""
    for procs in cg.procs_files:  # type: ignore[attr-defined]
        stat = procs.parent / "memory.stat"
        if stat.exists():
            kv = dict(line.split() for line in stat.read_text().splitlines())
            if "total_rss" in kv:  # cgroup v1
                return int(kv["total_rss"]) + int(kv["total_shmem"])
            return int(kv["anon"]) + int(kv["shmem"])
    raise AssertionError("no memory controller for the VM's cgroup")


def _count(vm: object) -> int:
    return int(check(vm.process, "cat /root/count").strip())  # type: ignore[attr-defined]


def test_pause_to_disk_keeps_a_counting_process_and_frees_memory(
    vm_runner: VmRunner, vm_cgroups: CgroupManager
) -> None:
    vm = boot_pci(vm_runner, cgroups=vm_cgroups, memory_mb=256, vcpus=1)
    try:
        check(vm.process, "echo kept > /root/before && " + COUNTER)
        deadline = time.monotonic() + 60
        while check(vm.process, "cat /root/count 2>/dev/null || echo 0").strip() in ("", "0"):
            assert time.monotonic() < deadline, "the counter never started"
            time.sleep(0.2)
        c1 = _count(vm)
        pids = vm.vm.pids
        assert vm.cgroup is not None
        mem_before = _vm_memory(vm.cgroup)
        assert mem_before > 32 << 20, mem_before
        snap = vm.vm.spec.run_dir / "mem.snap"

        check(vm.process, EJECT_SCRIPT)
        info = vm_runner.run(vm.vm.save(snap, guest_ejected=True))
        assert info.path == snap and info.format == 2
        # Device state in the stream, RAM beside it as a sparse file of the guest's size.
        ram = snapshot_ram(snap)
        assert ram.stat().st_size == 256 << 20 and snap.stat().st_size < 4 << 20
        assert info.size_bytes == (snap.stat().st_blocks + ram.stat().st_blocks) * 512
        assert not Path(str(snap) + ".tmp").exists() and not vm.vm.files.ram.exists()
        # The VM's processes are gone and the cgroup holds (almost) no memory.
        assert pids and not any(_alive(p) for p in pids)
        assert vm.cgroup.pids() == set()
        mem_after = _vm_memory(vm.cgroup)
        assert mem_after < 4 << 20, (mem_before, mem_after)
        print(f"VM anon+shmem before save {mem_before >> 20} MiB, after {mem_after >> 20} MiB")
        print(f"save: {info.save_seconds:.2f}s (unplug {info.unplug_seconds:.2f}s), "
              f"{info.size_bytes >> 20} MiB")  # fmt: skip

        t0 = time.monotonic()
        vm.vm = vm_runner.run(PciQemuVmm().restore(vm.vm.spec, snap))
        # The re-plug waited for the fresh backend to take the rings (not a fixed time).
        assert vm.vm.vsock_rings_ready() is True
        assert {"RAM copy", "guest probes vsock", "vsock settle"} <= set(vm.vm.restore_steps)
        wait_guestd(vm, 120)
        print(f"restore to guestd answering: {time.monotonic() - t0:.2f}s")
        assert check(vm.process, "cat /root/before") == "kept\n"
        c2 = _count(vm)
        assert c2 >= c1
        time.sleep(2)
        c3 = _count(vm)
        assert c3 > c2, "the counting process stopped after restore"
        # Again, through device_del this time, and restored by another process from
        # the files alone (as a restarted hostd would), then adopted here by pid files.
        info2 = vm_runner.run(vm.vm.save(snap))
        assert info2.unplug_seconds < 20
        run_dir = vm.vm.spec.run_dir
        subprocess.run([sys.executable, "-c", RESTORE_ELSEWHERE, str(run_dir)], check=True,
                       timeout=300, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
        vm.vm = vm_runner.run(PciQemuVmm().attach(load_spec(run_dir)))
        wait_guestd(vm, 120)
        assert _count(vm) >= c3
        assert check(vm.process, "cat /root/before") == "kept\n"
    finally:
        vm.destroy()
    assert not vm.tmp.exists()

"""A volume's data outlives a sandbox: two real microVMs mount the same disk in turn."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from guestcmd import check, sh
from vmfixtures import VmRunner, boot_template

from hostd.cgroups import CgroupManager
from hostd.volumes import VolumeManager, VolumeMountError, mount_in_guest

pytestmark = pytest.mark.vm


@pytest.fixture
def volumes() -> Iterator[VolumeManager]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="mvv"))
    mgr = VolumeManager(d)
    yield mgr
    mgr.close()
    shutil.rmtree(d, ignore_errors=True)


def _mount(runner: VmRunner, target: str, path: str) -> None:
    async def go() -> None:
        async with grpc.aio.insecure_channel(target) as ch:
            await mount_in_guest(ch, path)

    runner.run(go())


def test_volume_round_trip_across_two_sandboxes(
    vm_runner: VmRunner, vm_cgroups: CgroupManager, volumes: VolumeManager
) -> None:
    vid = vm_runner.run(volumes.create("work", 64)).volume_id
    disks: list[Path] = []
    for i, sid_note in enumerate(("first", "second")):
        disk = volumes.attach(vid, f"sbx_{sid_note}", "/workspace/data")
        disks.append(disk)
        vm = boot_template(
            vm_runner,
            "base",
            cgroups=vm_cgroups,
            memory_mb=256,
            vcpus=1,
            extra_disks=(disk,),
            ready_timeout=600,
        )
        try:
            _mount(vm_runner, vm.relay.target, "/workspace/data")
            out = check(vm.process, "grep ' /workspace/data ' /proc/mounts")
            assert out.startswith("/dev/vdb /workspace/data ext4"), out
            if i == 0:
                check(vm.process, "echo hello-from-first > /workspace/data/note && mkdir "
                                  "/workspace/data/d && head -c 1048576 /dev/urandom > "
                                  "/workspace/data/d/blob && sha256sum /workspace/data/d/blob "
                                  "> /workspace/data/sum && sync")  # fmt: skip
            else:
                assert check(vm.process, "cat /workspace/data/note") == "hello-from-first\n"
                check(vm.process, "cd /workspace/data && sha256sum -c sum")
                # Mounting twice is an error the caller sees, with the guest's message.
                with pytest.raises(VolumeMountError, match="exit"):
                    _mount(vm_runner, vm.relay.target, "/workspace/data")
        finally:
            # Clean shutdown of the filesystem before the VM is killed.
            sh(vm.process, "sync; umount /workspace/data", timeout=30)
            vm.destroy()
            volumes.release(f"sbx_{sid_note}")
    assert disks[0] == disks[1]
    vm_runner.run(volumes.delete(vid))
    assert not disks[0].exists()

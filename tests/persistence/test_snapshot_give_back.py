"""A VM whose guest ejected its vsock device but was not saved is given back reachable.

That is what hostd does when a save fails after the guest ran EJECT_SCRIPT
(or when the disk filled up between the check and the save): the old
vhost-user chardev's connection is unusable then ("vhost_get_features
failed"), so the device goes back in over a fresh one.
"""

from __future__ import annotations

import pytest
from guestcmd import check
from pcivm import boot_pci, wait_guestd
from vmfixtures import VmRunner

from hostd.vmm.qemu import PciQemuVm, hotplug
from hostd.vmm.qemu.hotplug import EJECT_SCRIPT, VSOCK_DEV
from hostd.vmm.qmp import QmpClient

pytestmark = pytest.mark.vm


async def _unplug_ejected(vm: PciQemuVm) -> None:
    """What a save does first: wait for the guest to drop the device it ejected."""
    c = await QmpClient.connect(vm.qmp_sock)
    async with c:
        await hotplug.unplug(c, vm.spec.sandbox_id, guest_ejected=True)


def test_give_back_after_eject_makes_guestd_reachable_again(vm_runner: VmRunner) -> None:
    vm = boot_pci(vm_runner, memory_mb=256, vcpus=2)
    try:
        check(vm.process, "echo kept > /root/f")
        check(vm.process, EJECT_SCRIPT)
        vm_runner.run(_unplug_ejected(vm.vm))

        async def has_device() -> bool:
            c = await QmpClient.connect(vm.vm.qmp_sock)
            async with c:
                return await hotplug.has_device(c, VSOCK_DEV)

        assert not vm_runner.run(has_device())
        vm_runner.run(vm.vm.give_back(eject_wait=1.0))
        assert vm_runner.run(has_device())
        vm.channel = None  # the old connection died with the device
        wait_guestd(vm, 120)
        assert check(vm.process, "cat /root/f").strip() == "kept"
        # And once more: a second give back after a second eject also works.
        check(vm.process, EJECT_SCRIPT)
        vm_runner.run(_unplug_ejected(vm.vm))
        vm_runner.run(vm.vm.give_back(eject_wait=1.0))
        vm.channel = None
        wait_guestd(vm, 120)
        assert check(vm.process, "echo again").strip() == "again"
    finally:
        vm.destroy()

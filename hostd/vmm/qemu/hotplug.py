"""The vsock device on its hot-pluggable PCIe port, over QMP: unplug, plug, wait for the guest.

QEMU 7.2 refuses to migrate while a vhost-user vsock device is attached
("vhost-user backend lacks VHOST_USER_PROTOCOL_F_LOG_SHMFD"), and a
virtio-mmio device cannot be unplugged. So a VM that can be saved has its
vsock device as `vhost-user-vsock-pci` behind a `pcie-root-port` (see
`hostd.vmm.qemu.pci`); these helpers take it out before a save and put a
fresh one in after a restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hostd.vmm.base import SnapshotError
from hostd.vmm.qmp import QmpClient, QmpError

ROOT_PORT = "moru_rp0"
VSOCK_DEV = "moru_vsock0"
VSOCK_CHARDEV = "vs"
PCI_SLOT = 1
# After QEMU reports the re-plugged device started: time for vhost-device-vsock
# to take the ring set-up messages QEMU just sent, before anyone dials. Cut
# short once the backend shows it has taken them (`rings_ready`); waited in
# full where that cannot be seen.
VHOST_SETTLE = 0.3
# After the backend registered the tx ring (it takes QEMU's messages in order,
# so rx is ready by then): for it to mark the tx queue ready, a few instructions on.
RINGS_MARGIN = 0.02
# Run in the guest (e.g. through guestd) just before save: powers the vsock
# slot off after a short delay, so the command's own reply gets out first.
EJECT_SCRIPT = f"(sleep 0.2; echo 0 > /sys/bus/pci/slots/{PCI_SLOT}/power) >/dev/null 2>&1 &"


async def connect(qmp_sock: Path, sandbox_id: str) -> QmpClient:
    try:
        return await QmpClient.connect(qmp_sock)
    except QmpError as e:
        raise SnapshotError(f"VM {sandbox_id}: {e}") from e


async def has_device(c: QmpClient, dev: str = VSOCK_DEV) -> bool:
    props = await c.execute("qom-list", {"path": "/machine/peripheral"})
    return any(p.get("name") == dev for p in props)


async def wait_gone(c: QmpClient, dev: str, timeout: float) -> bool:  # noqa: ASYNC109
    end = time.monotonic() + timeout
    while await has_device(c, dev):
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.02)
    return True


async def unplug(
    c: QmpClient,
    sandbox_id: str,
    *,
    guest_ejected: bool,
    timeout: float = 20.0,  # noqa: ASYNC109
    eject_wait: float = 15.0,
) -> None:
    """Removes the vsock device; quick if the guest ran EJECT_SCRIPT, else ~5 s (pciehp)."""
    if not await has_device(c, VSOCK_DEV):
        if guest_ejected:
            return
        raise SnapshotError(
            f"VM {sandbox_id} has no PCI vsock device {VSOCK_DEV!r}: "
            "it was not started for pause to disk (PciQemuVm)"
        )
    # A device_del while the guest is already powering the slot off would
    # leave the guest's pciehp mid-way (and ignoring the re-plug after
    # restore): give a loaded guest time before falling back to it.
    if guest_ejected and await wait_gone(c, VSOCK_DEV, eject_wait):
        return
    with contextlib.suppress(QmpError):  # already being removed
        await c.execute("device_del", {"id": VSOCK_DEV})
    if not await wait_gone(c, VSOCK_DEV, timeout):
        raise SnapshotError(
            f"VM {sandbox_id}: the guest did not release its vsock device "
            f"within {timeout:.0f}s (does the guest kernel have pciehp and virtio_pci?)"
        )


async def replug(c: QmpClient, vhost_user_sock: Path) -> str:
    """Plugs a vsock device in over a fresh vhost-user connection; returns the chardev id.

    On a QEMU that had the device (a failed save, a pause a dead hostd left),
    the old chardev's connection is useless ("vhost_get_features failed") and
    may still be held by the unplugged device, so it is removed, or left and
    a new id used.
    """
    chardev = VSOCK_CHARDEV
    try:
        await c.execute("chardev-remove", {"id": VSOCK_CHARDEV})
    except QmpError as e:
        if "not found" not in str(e):
            chardev = f"{VSOCK_CHARDEV}{secrets.token_hex(3)}"
    await c.execute(
        "chardev-add",
        {
            "id": chardev,
            "backend": {
                "type": "socket",
                "data": {
                    "addr": {"type": "unix", "data": {"path": str(vhost_user_sock)}},
                    "server": False,
                },
            },
        },
    )
    await _device_add(c, chardev)
    return chardev


async def _device_add(c: QmpClient, chardev: str) -> None:
    await c.execute(
        "device_add",
        {"driver": "vhost-user-vsock-pci", "chardev": chardev, "id": VSOCK_DEV, "bus": ROOT_PORT},
    )


def bars_assigned(pci: list[dict[str, Any]], dev: str) -> bool | None:
    """Whether the guest gave dev's BARs addresses (it probed it); None: no such device."""
    for bus in pci:
        for d in bus.get("devices", []):
            for sub in [d, *d.get("pci_bridge", {}).get("devices", [])]:
                if sub.get("qdev_id") == dev:
                    regions = sub.get("regions", [])
                    return bool(regions) and all(0 < r["address"] < 1 << 63 for r in regions)
    return None


async def vhost_started(c: QmpClient) -> bool:
    """Whether the guest driver has started the vsock device (DRIVER_OK, backend rings set)."""
    try:
        st = await c.execute(
            "x-query-virtio-status", {"path": f"/machine/peripheral/{VSOCK_DEV}/virtio-backend"}
        )
    except QmpError:  # a QEMU without the query (< 7.2): the BARs are all there is to see
        return True
    return bool(st.get("vhost-started"))


async def ensure_probed(
    c: QmpClient,
    sandbox_id: str,
    wait: float,
    attempts: int = 3,
    chardev: str = VSOCK_CHARDEV,
    rings_ready: Callable[[], bool | None] | None = None,
) -> float:
    """Waits for the guest to probe and start the plugged vsock device; re-plugs it if
    it missed it.

    Rarely (seen under heavy host load) the guest's pciehp misses the
    hot-add after a restore; unplugging the never-enabled device is
    immediate and a second hot-add is noticed. Returns only once the guest
    driver has started the device (QEMU set up the backend's rings): a dial
    before that ends vhost-device-vsock 0.3's worker for good
    (QemuVm.vsock_device_dead), and the callers dial right after. Returns the
    seconds of settle time it waited after that (`settle`).
    """
    for attempt in range(attempts):
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if bars_assigned(await c.execute("query-pci"), VSOCK_DEV) and await vhost_started(c):
                return await settle(rings_ready)
            await asyncio.sleep(0.01)
        if attempt + 1 == attempts:
            break
        with contextlib.suppress(QmpError):
            await c.execute("device_del", {"id": VSOCK_DEV})
        if not await wait_gone(c, VSOCK_DEV, 15.0):
            break
        await _device_add(c, chardev)
    raise SnapshotError(
        f"VM {sandbox_id}: the guest did not take the vsock device back "
        f"(after {attempts} hot-adds); its processes were ended: retry restore from the snapshot"
    )


async def settle(rings_ready: Callable[[], bool | None] | None) -> float:
    """Waits until the vsock backend has taken its rings (`rings_ready`), at most
    VHOST_SETTLE; the full VHOST_SETTLE where it cannot tell. Returns the seconds waited."""
    t0 = time.monotonic()
    end = t0 + VHOST_SETTLE
    while rings_ready is not None and time.monotonic() < end:
        got = rings_ready()
        if got is None:
            break
        if got:
            await asyncio.sleep(RINGS_MARGIN)
            return time.monotonic() - t0
        await asyncio.sleep(0.005)
    await asyncio.sleep(max(0.0, end - time.monotonic()))
    return time.monotonic() - t0


async def device_chardev(c: QmpClient) -> str:
    """The chardev id the vsock device was plugged in with (a give-back may have used a new one)."""
    try:
        got = await c.execute(
            "qom-get", {"path": f"/machine/peripheral/{VSOCK_DEV}", "property": "chardev"}
        )
    except QmpError:
        return VSOCK_CHARDEV
    return got if isinstance(got, str) and got else VSOCK_CHARDEV

"""Pause to disk and resume for hostd's sandboxes (docs/persistence.md).

Pause: guestd runs the driver's `guest_eject_script` (the guest powers its
vsock slot off), `Vm.save` writes RAM and device state to `RunDir.snapshot`
(and beside it) and ends the VM's processes, then the (empty) cgroup's page
cache is uncharged. What stays: the run dir (overlay disk, console log, snapshot), the
cgroup, the network, the relay socket and the store row (paused_to_disk).

Resume: `Vmm.restore` starts fresh processes from the snapshot and plugs
a fresh vsock device in; hostd opens a new channel through its relay, sends
Guest.Init again (wall clock, same identity and env) and removes the snapshot.
Connections open at pause time were reset; mounts (volumes) and processes
carry on.

Errors: NotEnoughDisk -> RESOURCE_EXHAUSTED, the sandbox keeps running; a
failed save -> UNAVAILABLE, the VM is given back running. Missing snapshot ->
NOT_FOUND, corrupt -> FAILED_PRECONDITION; either way the sandbox stays
paused (and can be killed) rather than vanishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from hostd.errors import FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from hostd.guest import TOKEN_HEADER, GuestClient, open_channel
from hostd.network.manager import SandboxNetwork
from hostd.rundir import RunDir
from hostd.sandbox import Sandbox
from hostd.vmm.base import (
    NotEnoughDisk,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotInfo,
    SnapshotNotFound,
    Vm,
    VmError,
    Vmm,
)
from hostd.vmm.snapfile import check_disk, read_info
from hostd.vmm.specfile import load_spec
from hostd.volumes.mount import run_in_guest
from moru_proto.guest.v1 import guest_pb2, guest_pb2_grpc

if TYPE_CHECKING:
    from hostd.store import SandboxRecord

log = logging.getLogger("hostd.pause")

EJECT_TIMEOUT = 15.0
INIT_TIMEOUT = 60.0
RESTORE_TIMEOUT = 600.0


def can_pause_to_disk(vm: Vm | None) -> bool:
    """Whether vm's driver can save it right now."""
    return vm is not None and vm.can_save


async def pause(sb: Sandbox) -> SnapshotInfo:
    """Saves sb's VM to disk and ends its processes; the caller updates the record."""
    rec, vm, files = sb.rec, sb.res.vm, sb.files
    assert vm is not None
    path = files.snapshot
    try:
        check_disk(vm.spec, path)
    except NotEnoughDisk as e:
        raise ResourceExhausted(f"cannot pause {rec.sandbox_id} to disk: {e}") from None
    marker = files.pausing
    marker.touch()
    try:
        return await _pause(sb, vm, path)
    except BaseException:
        marker.unlink(missing_ok=True)
        raise


def pause_recorded(rec: SandboxRecord) -> None:
    """The row says paused to disk: a restarted hostd no longer needs the marker."""
    RunDir(rec.run_dir).pausing.unlink(missing_ok=True)


async def _pause(sb: Sandbox, vm: Vm, path: Path) -> SnapshotInfo:
    rec, res = sb.rec, sb.res
    ejected = False
    script = vm.guest_eject_script
    if res.channel is not None and script:
        try:
            code, out = await run_in_guest(
                res.channel, script, access_token=rec.access_token,
                timeout=EJECT_TIMEOUT,
            )  # fmt: skip
            ejected = code == 0
            if not ejected:
                log.warning("%s: eject script exited %d: %s", rec.sandbox_id, code, out.strip())
        except grpc.aio.AioRpcError as e:
            # The script powers the slot off 0.2 s after it starts, which
            # drops the vsock connection this answer travels on: a slow
            # answer is lost although the eject is under way. The driver
            # waits for the device to go and unplugs it itself if it stays.
            ejected = True
            log.warning("%s: no answer from the eject script (%s); waiting for the device",
                        rec.sandbox_id, e.details())  # fmt: skip
    try:
        info = await vm.save(path, guest_ejected=ejected)
    except NotEnoughDisk as e:  # the disk filled up since the check
        if ejected:
            await vm.give_back()
        raise ResourceExhausted(f"cannot pause {rec.sandbox_id} to disk: {e}") from None
    except SnapshotError as e:
        # save gave the VM back running with its vsock device (or never took it).
        raise Unavailable(
            f"pausing {rec.sandbox_id} to disk failed; it keeps running: {e}"
        ) from None
    except asyncio.CancelledError:
        if not vm.is_alive() and saved_completely(rec):
            # Cancelled while the VM was being ended: the pause is done (the
            # caller still gets its cancel; the record says paused to disk).
            log.warning("%s: pause cancelled after the VM was saved and ended; it is paused",
                        rec.sandbox_id)  # fmt: skip
            info = read_info(path)
        else:
            await _give_back_cancelled(rec, vm, ejected)
            raise
    # Connections through the old device are dead: a new channel is opened on resume.
    if res.channel is not None:
        await res.channel.close(None)
        res.channel = None
    if res.cgroup is not None:
        try:
            res.cgroup.reclaim()
        except (RuntimeError, OSError) as e:  # CgroupError
            log.warning("%s: reclaiming the cgroup's page cache: %s", rec.sandbox_id, e)
    log.info(
        "%s paused to disk: %d MiB in %.2f s (vsock unplug %.2f s)",
        rec.sandbox_id, info.size_bytes >> 20, info.save_seconds, info.unplug_seconds,
    )  # fmt: skip
    return info


async def _give_back_cancelled(rec: SandboxRecord, vm: Vm, ejected: bool) -> None:
    """A Pause cancelled (the client went away, hostd stops) while the device was being
    unplugged or once the snapshot was complete (during the migration, save gives
    the VM back itself): plug it back so the sandbox stays usable."""
    if not (ejected and vm.is_alive()):
        return
    log.warning("%s: pause cancelled; giving the VM back running", rec.sandbox_id)
    # The snapshot goes first: once the VM runs on it is stale, and a hostd
    # dying during the give-back must not restore it.
    RunDir(rec.run_dir).remove_snapshot()
    with contextlib.suppress(Exception):
        await asyncio.shield(vm.give_back())


def interrupted(rec: SandboxRecord) -> bool:
    """Whether a hostd went away in the middle of pausing this running sandbox."""
    return not rec.paused_to_disk and RunDir(rec.run_dir).pausing.exists()


def saved_completely(rec: SandboxRecord) -> bool:
    try:
        read_info(RunDir(rec.run_dir).snapshot)
    except (SnapshotError, OSError):
        return False
    return True


async def give_back(vm: Vm, rec: SandboxRecord) -> None:
    """A VM a hostd left mid-pause (stopped, or its vsock unplugged): running again, reachable.

    Any snapshot is removed before the VM runs on (it would be stale), so a
    hostd dying meanwhile leaves the VM to give back again, never a snapshot
    behind its state.
    """
    files = RunDir(rec.run_dir)
    files.remove_snapshot()
    await vm.give_back()
    files.pausing.unlink(missing_ok=True)


def check_snapshot(sb: Sandbox) -> None:
    """NotFound / FailedPrecondition when sb's snapshot cannot be restored (cheap checks)."""
    sid = sb.id
    try:
        read_info(sb.files.snapshot)
    except SnapshotNotFound as e:
        raise NotFound(
            f"sandbox {sid} was paused to disk but its snapshot is gone ({e}): its memory and "
            "running processes cannot be restored; kill it (its disk is still in its run dir)"
        ) from None
    except SnapshotCorrupt as e:
        raise FailedPrecondition(
            f"sandbox {sid} cannot be resumed, its snapshot is damaged: {e}; its memory and "
            "running processes are lost; kill it"
        ) from None


async def resume(vmm: Vmm, sb: Sandbox, env: dict[str, str]) -> None:
    """Restores sb's VM from its snapshot, reconnects and re-sends Init (with env); removes
    the snapshot.

    On failure the sandbox is left paused (snapshot kept, no processes).
    """
    rec, res = sb.rec, sb.res
    sid = sb.id
    check_snapshot(sb)
    path = sb.files.snapshot
    try:
        spec = load_spec(Path(rec.run_dir))
    except VmError as e:
        raise FailedPrecondition(f"sandbox {sid} cannot be resumed: {e}") from None
    # The cgroup may have been re-created (host reboot): use its files of now.
    spec = dataclasses.replace(spec, cgroup_procs_files=tuple(res.cgroup.procs_files))
    network = None
    if rec.network:
        net = SandboxNetwork.from_dict(rec.network)
        if spec.net != net.attachment():
            # Re-created since the pause (host reboot): the restored guest still
            # has the old address configured; Init gives it the new one.
            spec = dataclasses.replace(spec, net=net.attachment())
            network = guest_pb2.NetworkConfig(
                address=f"{net.guest_ip}/{net.prefix_len}", gateway=net.gateway, dns=net.dns,
                mac=net.mac,
            )  # fmt: skip
    t0 = time.monotonic()
    try:
        vm = await vmm.restore(spec, path, timeout=RESTORE_TIMEOUT)
    except SnapshotNotFound as e:
        raise NotFound(f"sandbox {sid}: {e}") from None
    except SnapshotCorrupt as e:
        raise FailedPrecondition(
            f"sandbox {sid} cannot be resumed, its snapshot did not load: {e}"
        ) from None
    except VmError as e:
        raise Unavailable(f"resuming {sid} failed (still paused, try again): {e}") from None
    t_restored = time.monotonic()
    channel = open_channel(res.relay.target)
    try:
        # Reachable first, so the wall clock Init carries is fresh when it lands.
        await guest_pb2_grpc.GuestStub(channel).Health(
            guest_pb2.HealthRequest(), metadata=((TOKEN_HEADER, rec.access_token),),
            timeout=INIT_TIMEOUT, wait_for_ready=True,
        )  # fmt: skip
        t_reachable = time.monotonic()
        await GuestClient(channel, rec.access_token).init(
            sandbox_id=sid,
            template_id=rec.template_id,
            hostname=rec.hostname,
            env=env,
            access_token=rec.access_token,
            rpc_timeout=INIT_TIMEOUT,
            network=network,
        )
        log.info(
            "%s restored in %.2f s, guestd reachable after %.2f s, Init %.2f s", sid,
            t_restored - t0, t_reachable - t_restored, time.monotonic() - t_reachable,
        )  # fmt: skip
    except BaseException as e:
        await channel.close(None)
        with contextlib.suppress(VmError):
            await vm.stop()
        if isinstance(e, grpc.aio.AioRpcError):
            raise Unavailable(
                f"resuming {sid}: guestd did not answer after restore ({e.details()});"
                " still paused, try again"
            ) from None
        raise
    res.vm = vm
    if res.channel is not None:  # the one a restarted hostd opened at re-attach
        await res.channel.close(None)
    res.channel = channel
    res.stack.push_async_callback(channel.close, None)
    sb.files.remove_snapshot()

"""hostd start after a restart (kill -9 included): find every stored sandbox again.

For each row: attach to its VM, open its cgroup, re-attach its network and
start a new vsock relay. A row whose VMM died meanwhile, or that was still
being created when hostd went away, is cleaned up and reported. Cgroups and
run dirs that no row names (a crash between taking and recording them) are
removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

from hostd import disk_pause
from hostd.config import Config
from hostd.events import Event, EventBus, EventType, Reason
from hostd.resources import vm_spec
from hostd.rundir import RunDir
from hostd.sandbox import PIDS_MAX, Sandbox, egress_policy
from hostd.state import State
from hostd.store import SandboxRecord, Store
from hostd.vmm.base import AttachError, Vm, VmError, Vmm, VmSpec

log = logging.getLogger("hostd.reattach")


class Reattacher:
    """Finds stored sandboxes again; holds the driver, the store and the host resources."""

    def __init__(
        self,
        config: Config,
        store: Store,
        vmm: Vmm,
        cgroups: Any,
        network: Any | None,
        bus: EventBus,
    ) -> None:
        self.config = config
        self.store = store
        self.vmm = vmm
        self.cgroups = cgroups
        self.network = network
        self.bus = bus

    async def reattach_all(self) -> list[Sandbox]:
        out = []
        for rec in self.store.all():
            sb = await self._reattach(rec)
            if sb is not None:
                out.append(sb)
        return out

    async def _reattach(self, rec: SandboxRecord) -> Sandbox | None:
        sb = Sandbox(rec=rec, metrics=deque(maxlen=self.config.metrics_history))
        res = sb.res
        if rec.state is State.CREATING:
            await self._discard(
                rec,
                EventType.CREATE_FAILED,
                Reason.HOST_RESTART,
                "hostd restarted while the sandbox was being created",
            )
            return None
        if disk_pause.interrupted(rec):
            await self._after_interrupted_pause(rec)
        elif rec.paused_to_disk:
            # Pause records the row, then removes the marker: a hostd that died
            # in between left it. Kept, it would make the next start after a
            # Resume take the running sandbox for an interrupted pause.
            disk_pause.pause_recorded(rec)
        try:
            async with contextlib.AsyncExitStack() as stack:
                res.cgroup = self._cgroup(rec)
                if self.network is not None and rec.network:
                    await self._network(rec)
                spec = vm_spec(rec, res.cgroup.procs_files)
                if rec.paused_to_disk:
                    # No processes: a VM handle never started, whose destroy (at
                    # kill) removes the run dir and so the snapshot. A missing
                    # snapshot is reported by Resume; the sandbox stays listed.
                    vm = self.vmm.create(spec)
                    if not RunDir(rec.run_dir).snapshot.is_file():
                        log.warning("%s was paused to disk but its snapshot is missing",
                                    rec.sandbox_id)  # fmt: skip
                else:
                    vm = await self._attach(rec, spec)
                res.vm = vm
                # The same release order Create registers: store row, cgroup,
                # network, VM, relay, channel (closed in reverse).
                stack.callback(self.store.delete, rec.sandbox_id)
                stack.push_async_callback(res.cgroup.remove)
                if self.network is not None and rec.network:
                    stack.push_async_callback(self.network.teardown, rec.sandbox_id)
                stack.push_async_callback(vm.destroy)
                await res.connect(vm, rec, stack)
                if disk_pause.interrupted(rec):
                    log.warning("%s: hostd went away while pausing it; giving it back running",
                                rec.sandbox_id)  # fmt: skip
                    await disk_pause.give_back(vm, rec)
                res.stack = stack.pop_all()
        except (RuntimeError, OSError, LookupError) as e:  # VmError, CgroupError, NetworkError
            log.warning("sandbox %s is gone after restart: %s", rec.sandbox_id, e)
            await self._discard(
                rec,
                EventType.KILLED,
                Reason.VMM_EXITED,
                f"the VMM exited while hostd was down: {e}",
            )
            return None
        log.info("re-attached %s (%s)", rec.sandbox_id, rec.state.value)
        return sb

    async def _after_interrupted_pause(self, rec: SandboxRecord) -> None:
        """A running row whose pause to disk a dead hostd left unfinished.

        VM alive: left for `_reattach`, which gives it back running (vsock plugged
        in again). VM gone and the snapshot complete: the save had finished, so
        the row becomes paused to disk. Otherwise the usual clean-up follows.
        """
        try:
            await self.vmm.attach(vm_spec(rec, ()))
            return
        except AttachError as e:
            if e.vm.is_alive():
                return  # only its vsock backend is gone: see _attach
            with contextlib.suppress(VmError):
                await e.vm.stop()
        if disk_pause.saved_completely(rec):
            log.warning("%s: hostd went away after saving it to disk; it is paused",
                        rec.sandbox_id)  # fmt: skip
            rec.paused_remaining = max(0.0, rec.end_at - time.time())
            rec.paused_to_disk = True
            rec.state = State.PAUSED
            self.store.put(rec)
        disk_pause.pause_recorded(rec)

    async def _attach(self, rec: SandboxRecord, spec: VmSpec) -> Vm:
        """The running VM of rec, also one whose vsock backend died (never destroyed for that).

        A hostd that dies while giving a VM back (a Pause cancelled by its
        client or a stop, then kill -9) can leave QEMU running and its
        vhost-device-vsock killed, the fresh one not started yet. The VM is
        fine: giving it back (`Vm.give_back`, which `_reattach` does next)
        starts a fresh backend and plugs a device in over it.
        """
        try:
            return await self.vmm.attach(spec)
        except AttachError as e:
            if not e.vm.is_alive():
                raise
            if disk_pause.interrupted(rec):
                log.warning("%s: its vsock backend is gone (hostd died giving it back)",
                            rec.sandbox_id)  # fmt: skip
            else:
                # QEMU and the guest live; only the backend died (a kill, a
                # crash). The health check restarts it and plugs it in again.
                log.warning("%s: its vsock backend is gone; the health check restarts it",
                            rec.sandbox_id)  # fmt: skip
            return e.vm

    def _cgroup(self, rec: SandboxRecord) -> Any:
        """The sandbox's cgroup; re-created for one paused to disk (gone after a host reboot)."""
        cgroups = self.cgroups
        try:
            return cgroups.open(rec.sandbox_id)
        except (RuntimeError, OSError):
            if not rec.paused_to_disk:
                raise
            return cgroups.create(rec.sandbox_id, rec.vcpus, rec.memory_mb << 20, PIDS_MAX)

    async def _network(self, rec: SandboxRecord) -> None:
        """Takes the sandbox's network over; re-creates it for one paused to disk (host reboot).

        The re-created network may have another address: Resume gives it to the
        guest through Init (disk_pause.resume).
        """
        network = self.network
        assert network is not None
        try:
            await network.attach(rec.sandbox_id, rec.network, egress_policy(rec))
        except Exception as e:
            if not rec.paused_to_disk:
                raise
            log.warning("%s: re-creating the network of a sandbox paused to disk (%s)",
                        rec.sandbox_id, e)  # fmt: skip
            net = await network.setup(rec.sandbox_id, egress_policy(rec))
            rec.network = dict(net.to_dict())
            self.store.put(rec)

    async def _discard(self, rec: SandboxRecord, typ: EventType, reason: Reason, msg: str) -> None:
        """Best-effort removal of whatever a half-created sandbox left."""
        with contextlib.suppress(Exception):
            spec = vm_spec(rec, ())
            vm: Vm
            try:
                vm = await self.vmm.attach(spec)
            except AttachError as e:
                vm = e.vm  # what still runs
            except VmError:
                vm = self.vmm.create(spec)
            await vm.destroy()
        if self.network is not None:
            with contextlib.suppress(Exception):
                await self.network.teardown(rec.sandbox_id)
        await self._remove_cgroup(rec.sandbox_id)
        await asyncio.to_thread(RunDir(rec.run_dir).remove)
        self.store.delete(rec.sandbox_id)
        self.bus.publish(Event(rec.sandbox_id, typ, reason, rec.template_id, msg))

    async def _remove_cgroup(self, sandbox_id: str) -> None:
        """Kills what is left in a sandbox's cgroup and removes it (CgroupManager does both)."""
        try:
            cg = self.cgroups.open(sandbox_id)
            await cg.remove()
        except (RuntimeError, OSError) as e:
            log.warning("could not remove the cgroup of %s: %s", sandbox_id, e)

    async def remove_orphans(self, known: set[str]) -> None:
        if self.network is not None:
            try:
                removed = await self.network.cleanup_orphans(known)
            except Exception:
                log.exception("cleaning up orphan sandbox networks failed")
            else:
                if removed:
                    log.warning("removed orphan sandbox networks %s", removed)
        with contextlib.suppress(OSError):
            for sid in self.cgroups.list_ids():
                if sid not in known:
                    log.warning("removing orphan cgroup %s", sid)
                    await self._remove_cgroup(sid)
        base = self.config.sandboxes_dir
        if base.is_dir():
            for d in base.iterdir():
                if d.name not in known:
                    log.warning("removing orphan run dir %s", d)
                    await asyncio.to_thread(RunDir(d).remove)

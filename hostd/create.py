"""Create: one sandbox from a template, every resource behind one cleanup stack.

The order (docs/hostd.md, "How a Create flows"): validate the request ->
store row (state creating) -> cgroup -> network -> volume -> VM (restored
from a ready snapshot, else booted) -> vsock relay + channel -> Guest.Init
-> running. Each resource is pushed on an `AsyncExitStack` right after it
is taken; on any failure the stack unwinds in reverse, on success it moves
into the sandbox (`pop_all`) and Kill closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hostd import validation
from hostd.config import Config
from hostd.create_staging import Staging
from hostd.create_steps import StepClock
from hostd.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    MoruError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from hostd.events import Event, EventBus, EventType, Reason
from hostd.guest import GuestClient
from hostd.pool import PoolShape, WarmPool
from hostd.pool_members import MEMBER_CPU_WEIGHT, Claimer
from hostd.readiness import BootStuck, VmExited, VsockSilent, wait_guestd, while_alive
from hostd.ready_snapshots import ReadySnapshots
from hostd.resources import Capacity, Resources, vm_spec
from hostd.rundir import RunDir
from hostd.sandbox import (
    PIDS_MAX,
    CreateOptions,
    Sandbox,
    egress_policy,
    net_config,
    net_dict,
    new_sandbox_id,
)
from hostd.state import Action, State, transition
from hostd.store import SandboxRecord, Store
from hostd.vmm.base import SnapshotCorrupt, SnapshotNotFound, Vm, Vmm, VmSpec
from hostd.vmm.specfile import write_spec
from hostd.volumes.mount import mount_in_guest
from images.manifest import TemplateManifest, TemplateNotFound

if TYPE_CHECKING:
    from pathlib import Path

    from hostd.volumes.manager import VolumeManager

log = logging.getLogger("hostd.create")

BOOT_ATTEMPTS = 2  # VMs one Create may boot (a fresh one when vsock stays silent or boot is stuck)


class Creator:
    """Makes sandboxes; holds only what Create needs (no manager)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        vmm: Vmm,
        cgroups: Any,
        network: Any | None,
        capacity: Capacity,
        bus: EventBus,
        load_template: Callable[[str], TemplateManifest],
        ready: ReadySnapshots | None,
        sandboxes: dict[str, Sandbox],
    ) -> None:
        self.config = config
        self.store = store
        self.vmm = vmm
        self.cgroups = cgroups
        self.network = network
        self.capacity = capacity
        self.bus = bus
        self._load_template = load_template
        self.ready = ready
        # The manager's table: a sandbox is in it (and so findable) while it is created.
        self._sandboxes = sandboxes
        self.volumes: VolumeManager | None = None
        # Set by the manager when warm_pool is configured: matching Creates claim.
        self.pool: WarmPool[Sandbox] | None = None
        self.claimer = Claimer(config, store, network, capacity, sandboxes)

    async def create(self, opts: CreateOptions) -> Sandbox:
        """A running sandbox for opts (in the manager's table); every resource released on
        failure. Publishes CREATE_FAILED; the caller publishes CREATED."""
        t0 = time.monotonic()
        cfg = self.config
        name = validation.template(opts.template)
        timeout = validation.timeout(
            opts.timeout_seconds
            if opts.timeout_seconds is not None
            else cfg.default_timeout_seconds,
            cfg.max_timeout_seconds,
        )
        metadata = validation.metadata(
            opts.metadata, cfg.max_metadata_entries, cfg.max_metadata_bytes
        )
        envs = validation.envs(opts.envs)
        allow_out = validation.network_rules(opts.allow_out, "network.allow_out")
        deny_out = validation.network_rules(opts.deny_out, "network.deny_out")
        validation.volume(opts.volume_id, opts.volume_mount_path)
        try:
            manifest = self._load_template(name)
        except TemplateNotFound as e:
            raise NotFound(str(e)) from None
        d = manifest.defaults
        vcpus, memory_mb, disk_mb = (
            opts.vcpus or d.vcpus,
            opts.memory_mb or d.memory_mb,
            opts.disk_mb or d.disk_mb,
        )
        validation.resources(vcpus, memory_mb, disk_mb)
        if (allow_out or deny_out or not opts.allow_internet_access) and self.network is None:
            raise FailedPrecondition(
                "network: egress rules need networking, which is disabled on this node"
            )
        if self.pool is not None and not opts.volume_id:
            shape = PoolShape(name, vcpus, memory_mb, disk_mb)
            # A member that died a moment ago can still look alive (its QEMU is
            # still exiting); its claim fails and destroys it: try the next one.
            while (member := self.pool.claim(shape)) is not None:
                got = await self.claimer.claim(member, opts, timeout, metadata, envs, allow_out,
                                               deny_out, manifest.env)  # fmt: skip
                if got is not None:
                    return got
                died = member.end_reason == "died while waiting"
                self.bus.publish(Event(member.id, EventType.POOL_MEMBER_REMOVED,
                                       Reason.VMM_EXITED if died else Reason.CREATE_FAILED,
                                       name, member.end_reason))  # fmt: skip

        sid = new_sandbox_id()
        now = time.time()
        rec = SandboxRecord(
            sandbox_id=sid,
            template_id=name,
            state=State.CREATING,
            created_at=now,
            started_at=now,
            end_at=now + timeout,
            vcpus=vcpus,
            memory_mb=memory_mb,
            disk_mb=disk_mb,
            metadata=metadata,
            envs=envs,
            secure=opts.secure,
            access_token=secrets.token_urlsafe(24) if opts.secure else "",
            traffic_token="" if opts.allow_public_traffic else secrets.token_urlsafe(24),
            allow_internet_access=opts.allow_internet_access,
            allow_out=allow_out,
            deny_out=deny_out,
            allow_public_traffic=opts.allow_public_traffic,
            volume_id=opts.volume_id,
            volume_mount_path=opts.volume_mount_path,
            hostname=sid.replace("_", "-"),
            kernel=manifest.kernel,
            initramfs=manifest.initramfs,
            rootfs=manifest.rootfs,
            run_dir=str(cfg.sandboxes_dir / sid),
            guestd_port=manifest.guestd_port,
            accel=cfg.accel,
        )
        sb = Sandbox(rec=rec, metrics=deque(maxlen=cfg.metrics_history))
        env = {**manifest.env, **envs}
        clock = StepClock()
        async with sb.lock:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    await self._reserve(sid, memory_mb)
                    stack.callback(self.capacity.release, sid)
                    self._sandboxes[sid] = sb
                    stack.callback(self._sandboxes.pop, sid, None)
                    self.store.put(rec)
                    stack.callback(self.store.delete, sid)
                    clock.mark("reserve + store row")
                    # Errors get the console tail here, before the stack removes it.
                    try:
                        async with asyncio.timeout(cfg.create_deadline_seconds):
                            await self._boot(sb, stack, manifest, env, clock)
                    except TimeoutError:
                        raise DeadlineExceeded(
                            f"sandbox {sid} was not ready within {cfg.create_deadline_seconds:g} s"
                            f" (stuck {sb.stage})" + self._console(sb)
                        ) from None
                    except MoruError as e:
                        e.message += self._console(sb)
                        e.args = (e.message,)
                        raise
                    except Exception as e:
                        log.exception("create %s failed", sid)
                        raise Unavailable(f"create failed: {e}{self._console(sb)}") from e
                    rec.state = transition(sid, rec.state, Action.READY)
                    rec.started_at = time.time()
                    rec.end_at = rec.started_at + timeout
                    self.store.put(rec)
                    sb.res.stack = stack.pop_all()
                    clock.mark("store row running")
                    log.info("%s", clock.line(sid, sb.create_path))
            except BaseException as e:
                sb.gone = True
                msg = e.message if isinstance(e, MoruError) else repr(e)
                self.bus.publish(
                    Event(
                        sid,
                        EventType.CREATE_FAILED,
                        Reason.CREATE_FAILED,
                        name,
                        msg,
                        time.monotonic() - t0,
                    )
                )
                raise
        return sb

    async def _reserve(self, sid: str, memory_mb: int) -> None:
        """Node capacity for a new sandbox; warm pool members give theirs up first."""
        while True:
            try:
                self.capacity.reserve(sid, memory_mb)
                return
            except ResourceExhausted:
                if self.pool is None or not await self.pool.evict():
                    raise

    async def prepare_member(self, shape: PoolShape, mid: str) -> Sandbox:
        """A warm pool member: a sandbox made as Create makes one, with a pool-only token.

        Not in the manager's table (never listed, reaped or sampled); at the
        lowest CPU weight once it is up (booted or restored at the normal one).
        Its host-side names (cgroup, netns, run dir) use the
        id it will be claimed under; everything the guest knows of it is
        replaced at claim. Its store row stays `creating`, so a hostd restart
        discards it. The pool holds its capacity reservation.
        """
        await self.claimer.settle()
        cfg = self.config
        manifest = self._load_template(shape.template)
        now = time.time()
        rec = SandboxRecord(
            sandbox_id=mid, template_id=shape.template, state=State.CREATING, created_at=now,
            started_at=now, end_at=now, vcpus=shape.vcpus, memory_mb=shape.memory_mb,
            disk_mb=shape.disk_mb, access_token=secrets.token_urlsafe(24),
            hostname=mid.replace("_", "-"), kernel=manifest.kernel,
            initramfs=manifest.initramfs, rootfs=manifest.rootfs,
            run_dir=str(cfg.sandboxes_dir / mid), guestd_port=manifest.guestd_port,
            accel=cfg.accel,
        )  # fmt: skip
        sb = Sandbox(rec=rec, metrics=deque(maxlen=cfg.metrics_history), background=True)
        clock = StepClock()
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self.store.delete, mid)
            try:
                async with asyncio.timeout(cfg.create_deadline_seconds):
                    await self._boot(sb, stack, manifest, dict(manifest.env), clock)
                # Only once it is up: a boot at this weight starves a vCPU, and the
                # kernel's APIC timer calibration then stops the boot for good.
                assert sb.res.cgroup is not None
                sb.res.cgroup.set_cpu_weight(MEMBER_CPU_WEIGHT)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"warm pool member {mid} was not ready within"
                    f" {cfg.create_deadline_seconds:g} s (stuck {sb.stage})" + self._console(sb)
                ) from None
            sb.res.stack = stack.pop_all()
        log.info("%s", clock.line(mid, f"pool member, {sb.create_path}"))
        return sb

    async def _boot(
        self,
        sb: Sandbox,
        stack: contextlib.AsyncExitStack,
        manifest: TemplateManifest,
        env: dict[str, str],
        clock: StepClock,
    ) -> None:
        """cgroup -> network -> VM -> relay -> guest ready -> Init, each pushed on `stack`."""
        rec, res = sb.rec, sb.res
        # The cgroup manager adds the VMM's own overhead to guest memory.
        sb.stage = "creating the cgroup"
        res.cgroup = self.cgroups.create(rec.sandbox_id, rec.vcpus, rec.memory_mb << 20, PIDS_MAX)
        stack.push_async_callback(res.cgroup.remove)
        clock.mark("cgroup")
        ready = self._ready_snapshot(rec, manifest)
        staging = None
        if ready is not None and self.ready is not None:
            # The ready snapshot's RAM image and overlay are copied while the network is
            # set up and QEMU starts (create_staging).
            stack.callback(RunDir(rec.run_dir).remove)
            staging = Staging(self.ready, vm_spec(rec, res.cgroup.procs_files), ready)
            stack.push_async_callback(staging.close)
        net = None
        if self.network is not None:
            sb.stage = "setting up the network"
            net = await self.network.setup(rec.sandbox_id, egress_policy(rec))
            stack.push_async_callback(self.network.teardown, rec.sandbox_id)
            rec.network = net_dict(net)
            clock.mark("network")
        rec.kernel_cmdline = " ".join(
            p
            for p in (
                manifest.kernel_cmdline,
                f"moru.hostname={rec.hostname}",
                net.kernel_args() if net else "",
            )
            if p
        )
        self.store.put(rec)
        spec = vm_spec(rec, res.cgroup.procs_files)
        if rec.volume_id:
            if self.volumes is None:
                raise FailedPrecondition("volume_id: this hostd serves no volumes")
            sb.stage = "attaching the volume"
            disk = self.volumes.attach(rec.volume_id, rec.sandbox_id, rec.volume_mount_path)
            stack.callback(self.volumes.detach, rec.volume_id, rec.sandbox_id)
            spec = dataclasses.replace(spec, extra_disks=(disk,))
        # Whichever VM is current is destroyed on failure (a retry replaces it).
        stack.push_async_callback(self._destroy_current_vm, res)
        clock.mark("store row + spec")
        if ready is not None and await self._from_ready(sb, stack, spec, ready, env, net, clock,
                                                        staging):  # fmt: skip
            return
        sb.create_path = "cold_boot"
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            vm = self.vmm.create(spec)
            res.vm = vm
            t0 = time.monotonic()
            sb.stage = "starting the VMM"
            await vm.start()
            t1 = time.monotonic()
            clock.mark("VMM start")
            sb.stage = "waiting for guestd on vsock"
            try:
                await self._wait_guest(vm, rec)
                clock.mark("guest boot to guestd")
                break
            except (VsockSilent, BootStuck) as e:
                if attempt == BOOT_ATTEMPTS:
                    raise Unavailable(f"sandbox {rec.sandbox_id}: {e}") from None
                log.warning("%s: %s; booting a fresh VM (attempt %d)", rec.sandbox_id, e,
                            attempt + 1)
                await vm.destroy()
        sb.stage = "starting the vsock relay"
        await res.connect(vm, rec, stack)
        t2 = time.monotonic()
        clock.mark("relay")
        await self._init(sb, env)
        clock.mark("Init")
        log.info(
            "%s: VMM started in %.2f s, guest ready after %.2f s, Init took %.2f s",
            rec.sandbox_id,
            t1 - t0,
            t2 - t1,
            time.monotonic() - t2,
        )

    async def _init(self, sb: Sandbox, env: dict[str, str], net: Any = None) -> None:
        """Guest.Init with the sandbox's identity (+ network for a restored guest), volume mount."""
        rec, res = sb.rec, sb.res
        assert res.channel is not None
        sb.stage = "in Guest.Init"
        await GuestClient(res.channel, rec.access_token).init(
            sandbox_id=rec.sandbox_id,
            template_id=rec.template_id,
            hostname=rec.hostname,
            env=env,
            access_token=rec.access_token,
            rpc_timeout=30.0,
            network=net_config(net) if net is not None else None,
        )
        if rec.volume_id:
            sb.stage = "mounting the volume"
            await mount_in_guest(res.channel, rec.volume_mount_path, access_token=rec.access_token)

    def _ready_snapshot(self, rec: SandboxRecord, manifest: TemplateManifest) -> Path | None:
        """The ready snapshot that fits this sandbox exactly, if any (extra disks: none)."""
        if self.ready is None or rec.volume_id:
            return None
        return self.ready.find(self.ready.shape(manifest, rec.vcpus, rec.memory_mb, rec.disk_mb))

    async def _from_ready(
        self,
        sb: Sandbox,
        stack: contextlib.AsyncExitStack,
        spec: VmSpec,
        ready: Path,
        env: dict[str, str],
        net: Any,
        clock: StepClock,
        staging: Staging | None = None,
    ) -> bool:
        """Restore + Init from a ready snapshot; False (all of it undone) to boot cold instead.
        `staging`: the copies of the snapshot's RAM and overlay, if started."""
        assert self.ready is not None
        rec, res = sb.rec, sb.res
        t0 = time.monotonic()
        files = RunDir(spec.run_dir)
        stack.callback(files.remove)  # also if cancelled mid-restore
        try:
            async with contextlib.AsyncExitStack() as sub:
                async with asyncio.timeout(self.config.ready_snapshot_restore_seconds):
                    sb.stage = "restoring the ready snapshot"
                    if staging is not None:
                        await staging.in_place()
                        clock.mark("copies started")
                    with self.ready.using(ready):
                        vm = await self.ready.restore(
                            spec, ready, staged=staging is not None,
                            staging=staging.task if staging is not None else None)  # fmt: skip
                    res.vm = vm
                    steps = vm.restore_steps
                    clock.mark("restore")
                    if steps:  # the driver's own steps, the rest (overlay copy, checks) apart
                        restore = clock.steps.pop()[1]
                        clock.add({"checks": restore - sum(steps.values()), **steps})
                    if staging is not None:
                        clock.add({"RAM + overlay copy ||": staging.task.result()})
                    write_spec(spec)
                    sb.stage = "starting the vsock relay"
                    await res.connect(vm, rec, sub)
                    clock.mark("relay")
                    # Init right away: no probe dial of guestd's port and no wait for the
                    # channel first. guestd listened when the snapshot was saved, each
                    # extra connection costs the cold restored guest tens of ms, and Init
                    # waits for the channel itself (wait_for_ready; fails fast on VM death).
                    await while_alive(vm, self._init(sb, env, net))
                    clock.mark("gRPC connect + Init")
                stack.push_async_exit(sub.pop_all())
        except Exception as e:
            log.warning("%s: create from ready snapshot %s failed after %.1f s, booting cold: %s",
                        rec.sandbox_id, ready.name, time.monotonic() - t0, e)  # fmt: skip
            if isinstance(e, SnapshotCorrupt | SnapshotNotFound):
                self.ready.discard(ready, str(e).splitlines()[0])
            await self._destroy_current_vm(res)
            res.vm = res.relay = res.channel = None
            await asyncio.to_thread(files.remove)
            return False
        sb.create_path = "ready_snapshot"
        log.info("%s: restored from ready snapshot %s and initialized in %.2f s",
                 rec.sandbox_id, ready.name, time.monotonic() - t0)  # fmt: skip
        return True

    async def _wait_guest(self, vm: Vm, rec: SandboxRecord) -> None:
        """Waits for guestd as hostd.readiness says; VsockSilent, BootStuck: boot a fresh VM."""
        deadline = time.monotonic() + self.config.create_deadline_seconds
        try:
            await wait_guestd(vm, rec.guestd_port, deadline)
        except VmExited as e:
            raise Unavailable(f"sandbox {rec.sandbox_id}: {e}") from None

    @staticmethod
    async def _destroy_current_vm(res: Resources) -> None:
        if res.vm is not None:
            await res.vm.destroy()

    def _console(self, sb: Sandbox) -> str:
        vm = sb.res.vm
        tail = vm.console_tail(2048) if vm is not None else ""
        return f"\n--- guest console (tail) ---\n{tail}" if tail else ""


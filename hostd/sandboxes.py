"""The sandbox lifecycle manager: where hostd's logic lives (servicers only translate).

Create takes resources one by one behind an AsyncExitStack; on success the
stack moves into the sandbox (`pop_all`) and Kill simply closes it, so every
resource has exactly one release path, registered right after it was taken.
Background work (reaper, VMM watcher, metrics sampler) runs in `run()` under
the server's task group: no fire-and-forget tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import secrets
import shutil
import string
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from hostd import disk_pause, paging, validation
from hostd.config import Config
from hostd.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    MoruError,
    NotFound,
    Unauthenticated,
    Unavailable,
    sandbox_not_found,
)
from hostd.events import Event, EventBus, EventType, Reason
from hostd.guest import GuestClient, Sample
from hostd.readiness import VmExited, VsockSilent, wait_guestd
from hostd.ready_snapshots import ReadySnapshots
from hostd.reattach import Reattacher
from hostd.resources import Capacity, Resources, vm_spec
from hostd.state import Action, State, transition
from hostd.store import SandboxRecord, Store
from hostd.vmm.base import Vm, Vmm, VmSpec
from hostd.vmm.qemu import QemuVmm
from hostd.vmm.snapshot import SnapshotCorrupt, SnapshotNotFound
from images.manifest import TemplateManifest, TemplateNotFound, load_manifest
from moru_proto.guest.v1 import guest_pb2

if TYPE_CHECKING:
    from hostd.volumes.manager import VolumeManager

log = logging.getLogger("hostd.sandboxes")

ID_ALPHABET = string.ascii_lowercase + string.digits
TICK = 0.2  # reaper/watcher period: kills land within ~TICK of end_at
PIDS_MAX = 1024
BOOT_ATTEMPTS = 2  # VMs one Create may boot (a fresh one when vsock stays silent)


def new_sandbox_id() -> str:
    return "sbx_" + "".join(secrets.choice(ID_ALPHABET) for _ in range(20))


@dataclass
class CreateOptions:
    """Create's inputs after the transport layer; 0/None mean "default"."""

    template: str = ""
    timeout_seconds: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    envs: dict[str, str] = field(default_factory=dict)
    allow_internet_access: bool = True
    allow_out: list[str] = field(default_factory=list)
    deny_out: list[str] = field(default_factory=list)
    allow_public_traffic: bool = True
    secure: bool = True
    volume_id: str = ""
    volume_mount_path: str = ""
    vcpus: int = 0
    memory_mb: int = 0
    disk_mb: int = 0


@dataclass
class Sandbox:
    """A sandbox hostd knows about: its durable record plus live handles."""

    rec: SandboxRecord
    res: Resources = field(default_factory=Resources)
    metrics: deque[Sample] = field(default_factory=deque)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    gone: bool = False
    # What Create is doing right now (named in its deadline error).
    stage: str = ""
    # How Create started the VM: "ready_snapshot" or "cold_boot".
    create_path: str = ""

    @property
    def id(self) -> str:
        return self.rec.sandbox_id


class SandboxManager:
    def __init__(
        self,
        config: Config,
        store: Store,
        vmm: Vmm,
        cgroups: Any,
        network: Any | None,
        bus: EventBus | None = None,
        load_template: Callable[[str], TemplateManifest] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.vmm = vmm
        self.cgroups = cgroups
        self.network = network
        self.bus = bus or EventBus()
        self._load_template = load_template or (
            lambda name: load_manifest(name, config.images_path)
        )
        self._sandboxes: dict[str, Sandbox] = {}
        self.capacity = Capacity(config)
        # hostd.volumes.VolumeManager, set by the server; None: volumes refused.
        self.volumes: VolumeManager | None = None
        self.ready: ReadySnapshots | None = None
        if config.ready_snapshot_templates:
            self.ready = ReadySnapshots(config, vmm, cgroups, network, self._load_template,
                                        self.capacity)

    # -- startup / shutdown -------------------------------------------------

    async def start(self) -> None:
        """Re-attaches every stored sandbox; cleans up dead ones and orphans."""
        self.config.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        r = Reattacher(self)
        for sb in await r.reattach_all():
            self._sandboxes[sb.id] = sb
            self.capacity.add(sb.id, 0 if sb.rec.paused_to_disk else sb.rec.memory_mb)
        await r.remove_orphans(set(self._sandboxes))
        if self.ready is not None:
            self.ready.remove_partial()

    async def close(self) -> None:
        """Drops hostd's handles; VMs keep running for the next hostd to re-attach."""
        for sb in list(self._sandboxes.values()):
            await sb.res.detach()

    async def run(self) -> None:
        """Reaper, VMM watcher and metrics sampler; runs until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._reap_loop())
            tg.create_task(self._sample_loop())
            if self.ready is not None:
                tg.create_task(self.ready.run())

    # -- lookups ------------------------------------------------------------

    def _get(self, sandbox_id: str) -> Sandbox:
        validation.sandbox_id(sandbox_id)
        sb = self._sandboxes.get(sandbox_id)
        if sb is None or sb.gone:
            raise sandbox_not_found(sandbox_id)
        return sb

    def get(self, sandbox_id: str) -> SandboxRecord:
        return self._get(sandbox_id).rec

    def list_page(
        self,
        metadata: Mapping[str, str] | None = None,
        states: list[State] | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[SandboxRecord], str]:
        want = set(states or [State.RUNNING, State.PAUSED])
        meta = dict(metadata or {})
        items = [
            ((sb.rec.created_at, sb.id), sb.rec)
            for sb in self._sandboxes.values()
            if not sb.gone
            and sb.rec.state in want
            and all(sb.rec.metadata.get(k) == v for k, v in meta.items())
        ]
        items.sort(key=lambda kv: kv[0])
        return paging.page(items, page_size, page_token)

    def ids(self) -> list[str]:
        return [sid for sid, sb in self._sandboxes.items() if not sb.gone]

    def sandbox(self, sandbox_id: str) -> Sandbox:
        """The live sandbox (for exporters and tests); NotFound when gone."""
        return self._get(sandbox_id)

    # -- create -------------------------------------------------------------

    async def create(self, opts: CreateOptions) -> SandboxRecord:
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
        async with sb.lock:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    self.capacity.reserve(sid, memory_mb)
                    stack.callback(self.capacity.release, sid)
                    self._sandboxes[sid] = sb
                    stack.callback(self._sandboxes.pop, sid, None)
                    self.store.put(rec)
                    stack.callback(self.store.delete, sid)
                    # Errors get the console tail here, before the stack removes it.
                    try:
                        async with asyncio.timeout(cfg.create_deadline_seconds):
                            await self._boot(sb, stack, manifest, env)
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
        await self._sample(sb)
        self.bus.publish(
            Event(sid, EventType.CREATED, Reason.USER, name, sb.create_path,
                  duration=time.monotonic() - t0)
        )  # fmt: skip
        log.info("created %s (template %s, %s) in %.2f s", sid, name, sb.create_path,
                 time.monotonic() - t0)  # fmt: skip
        return rec

    async def _boot(
        self,
        sb: Sandbox,
        stack: contextlib.AsyncExitStack,
        manifest: TemplateManifest,
        env: dict[str, str],
    ) -> None:
        """cgroup -> network -> VM -> relay -> guest ready -> Init, each pushed on `stack`."""
        rec, res = sb.rec, sb.res
        # The cgroup manager adds the VMM's own overhead to guest memory.
        sb.stage = "creating the cgroup"
        res.cgroup = self.cgroups.create(rec.sandbox_id, rec.vcpus, rec.memory_mb << 20, PIDS_MAX)
        stack.push_async_callback(res.cgroup.remove)
        net = None
        if self.network is not None:
            sb.stage = "setting up the network"
            net = await self.network.setup(rec.sandbox_id, self._policy(rec))
            stack.push_async_callback(self.network.teardown, rec.sandbox_id)
            rec.network = _net_dict(net)
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
        ready = self._ready_snapshot(rec, manifest)
        if ready is not None and await self._from_ready(sb, stack, spec, ready, env, net):
            return
        sb.create_path = "cold_boot"
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            vm = self.vmm.create(spec)
            res.vm = vm
            t0 = time.monotonic()
            sb.stage = "starting the VMM"
            await vm.start()
            t1 = time.monotonic()
            sb.stage = "waiting for guestd on vsock"
            try:
                await self._wait_guest(vm, rec)
                break
            except VsockSilent as e:
                if attempt == BOOT_ATTEMPTS:
                    raise Unavailable(f"sandbox {rec.sandbox_id}: {e}") from None
                log.warning("%s: %s; booting a fresh VM (attempt %d)", rec.sandbox_id, e,
                            attempt + 1)
                await vm.destroy()
        sb.stage = "starting the vsock relay"
        await res.connect(vm, rec, stack)
        t2 = time.monotonic()
        await self._init(sb, env)
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
            network=_net_config(net) if net is not None else None,
        )
        if rec.volume_id:
            from hostd.volumes.mount import mount_in_guest

            sb.stage = "mounting the volume"
            await mount_in_guest(res.channel, rec.volume_mount_path, access_token=rec.access_token)

    def _ready_snapshot(self, rec: SandboxRecord, manifest: TemplateManifest) -> Path | None:
        """The ready snapshot that fits this sandbox exactly, if any (extra disks: none)."""
        if self.ready is None or rec.volume_id or not isinstance(self.vmm, QemuVmm):
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
    ) -> bool:
        """Restore + Init from a ready snapshot; False (all of it undone) to boot cold instead."""
        from hostd.vmm.qemu import SPEC, spec_to_json
        from hostd.vmm.snapshot import restore_ready
        from hostd.vsock import wait_ready

        assert self.ready is not None and isinstance(self.vmm, QemuVmm)
        rec, res = sb.rec, sb.res
        t0 = time.monotonic()
        stack.callback(shutil.rmtree, spec.run_dir, True)  # also if cancelled mid-restore
        try:
            async with contextlib.AsyncExitStack() as sub:
                async with asyncio.timeout(self.config.ready_snapshot_restore_seconds):
                    sb.stage = "restoring the ready snapshot"
                    with self.ready.using(ready):
                        vm = await restore_ready(self.vmm, spec, ready)
                    res.vm = vm
                    (spec.run_dir / SPEC).write_text(spec_to_json(spec))
                    sb.stage = "waiting for the restored guestd on vsock"
                    await wait_ready(vm.vsock_uds, rec.guestd_port,
                                     time.monotonic() + self.config.ready_snapshot_restore_seconds,
                                     alive=vm.is_alive, interval=0.05)  # fmt: skip
                    sb.stage = "starting the vsock relay"
                    await res.connect(vm, rec, sub)
                    await self._init(sb, env, net)
                stack.push_async_exit(sub.pop_all())
        except Exception as e:
            log.warning("%s: create from ready snapshot %s failed after %.1f s, booting cold: %s",
                        rec.sandbox_id, ready.name, time.monotonic() - t0, e)  # fmt: skip
            if isinstance(e, SnapshotCorrupt | SnapshotNotFound):
                self.ready.discard(ready, str(e).splitlines()[0])
            await self._destroy_current_vm(res)
            res.vm = res.relay = res.channel = None
            await asyncio.to_thread(shutil.rmtree, spec.run_dir, True)
            return False
        sb.create_path = "ready_snapshot"
        log.info("%s: restored from ready snapshot %s and initialized in %.2f s",
                 rec.sandbox_id, ready.name, time.monotonic() - t0)  # fmt: skip
        return True

    async def _wait_guest(self, vm: Vm, rec: SandboxRecord) -> None:
        """Waits for guestd as hostd.readiness says; VsockSilent: boot a fresh VM."""
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

    def _policy(self, rec: SandboxRecord) -> Any:
        from hostd.network.policy import EgressPolicy

        return EgressPolicy(
            allow_internet_access=rec.allow_internet_access,
            allow_out=list(rec.allow_out),
            deny_out=list(rec.deny_out),
        )

    # -- lifecycle ----------------------------------------------------------

    async def kill(self, sandbox_id: str, reason: Reason = Reason.USER, message: str = "") -> None:
        sb = self._get(sandbox_id)
        await self._kill(sb, reason, message)

    async def _kill(self, sb: Sandbox, reason: Reason, message: str = "") -> None:
        t0 = time.monotonic()
        async with sb.lock:
            if sb.gone:
                if reason is Reason.USER:
                    raise sandbox_not_found(sb.id)
                return
            transition(sb.id, sb.rec.state, Action.KILL)
            sb.gone = True
            try:
                await sb.res.release()
            except Exception:
                log.exception("releasing %s left something behind", sb.id)
            finally:
                if self.volumes is not None:
                    self.volumes.release(sb.id)
                self._sandboxes.pop(sb.id, None)
                self.capacity.release(sb.id)
                self.store.delete(sb.id)
        self.bus.publish(
            Event(
                sb.id, EventType.KILLED, reason, sb.rec.template_id, message, time.monotonic() - t0
            )
        )
        log.info("killed %s (%s)", sb.id, reason.name.lower())

    async def set_timeout(self, sandbox_id: str, timeout_seconds: int) -> SandboxRecord:
        validation.timeout(timeout_seconds, self.config.max_timeout_seconds)
        sb = self._get(sandbox_id)
        async with sb.lock:
            self._check_alive(sb)
            transition(sb.id, sb.rec.state, Action.SET_TIMEOUT)
            if sb.rec.state is State.PAUSED:
                sb.rec.paused_remaining = float(timeout_seconds)
            sb.rec.end_at = time.time() + timeout_seconds
            self.store.put(sb.rec)
        self.bus.publish(Event(sb.id, EventType.TIMEOUT_EXTENDED, Reason.USER, sb.rec.template_id))
        return sb.rec

    async def pause(self, sandbox_id: str) -> SandboxRecord:
        """To disk by default (memory freed, processes kept); in place when it cannot be."""
        t0 = time.monotonic()
        sb = self._get(sandbox_id)
        message = "in place"
        async with sb.lock:
            self._check_alive(sb)
            nxt = transition(sb.id, sb.rec.state, Action.PAUSE)
            assert sb.res.vm is not None and sb.res.cgroup is not None
            if self.config.pause_to_disk and disk_pause.can_pause_to_disk(sb.res.vm):
                info = await disk_pause.pause(self, sb)
                sb.rec.paused_to_disk = True
                self.capacity.resize(sb.id, 0)
                message = f"to disk ({info.size_bytes >> 20} MiB)"
            else:
                await sb.res.vm.pause()
                await sb.res.cgroup.freeze()
            sb.rec.paused_remaining = max(0.0, sb.rec.end_at - time.time())
            sb.rec.state = nxt
            self.store.put(sb.rec)
            disk_pause.pause_recorded(sb.rec)
        self.bus.publish(
            Event(
                sb.id,
                EventType.PAUSED,
                Reason.USER,
                sb.rec.template_id,
                message,
                duration=time.monotonic() - t0,
            )
        )
        return sb.rec

    async def resume(self, sandbox_id: str, timeout_seconds: int | None = None) -> SandboxRecord:
        t0 = time.monotonic()
        if timeout_seconds is not None:
            validation.timeout(timeout_seconds, self.config.max_timeout_seconds)
        sb = self._get(sandbox_id)
        async with sb.lock:
            self._check_alive(sb)
            nxt = transition(sb.id, sb.rec.state, Action.RESUME)
            assert sb.res.vm is not None and sb.res.cgroup is not None
            if sb.rec.paused_to_disk:
                disk_pause.check_snapshot(sb)
                self.capacity.resize(sb.id, sb.rec.memory_mb)
                try:
                    await disk_pause.resume(self, sb)
                except BaseException:
                    self.capacity.resize(sb.id, 0)
                    raise
                sb.rec.paused_to_disk = False
            else:
                await sb.res.cgroup.thaw()
                await sb.res.vm.resume()
            left = (
                float(timeout_seconds) if timeout_seconds is not None else sb.rec.paused_remaining
            )
            sb.rec.end_at = time.time() + max(left, 1.0)
            sb.rec.paused_remaining = 0.0
            sb.rec.state = nxt
            self.store.put(sb.rec)
        await self._sample(sb)
        self.bus.publish(
            Event(
                sb.id,
                EventType.RESUMED,
                Reason.USER,
                sb.rec.template_id,
                duration=time.monotonic() - t0,
            )
        )
        return sb.rec

    def guest_env(self, rec: SandboxRecord) -> dict[str, str]:
        """The env Init gives the guest: the template's, then the sandbox's own."""
        try:
            base = dict(self._load_template(rec.template_id).env)
        except Exception:  # template removed since: the sandbox's own env still holds
            base = {}
        return {**base, **rec.envs}

    async def set_network(
        self,
        sandbox_id: str,
        allow_internet_access: bool | None,
        allow_out: list[str] | None,
        deny_out: list[str] | None,
        allow_public_traffic: bool | None,
    ) -> SandboxRecord:
        sb = self._get(sandbox_id)
        if self.network is None:
            raise FailedPrecondition("network: networking is disabled on this node")
        a = (
            validation.network_rules(allow_out, "network.allow_out")
            if allow_out is not None
            else None
        )
        d = validation.network_rules(deny_out, "network.deny_out") if deny_out is not None else None
        async with sb.lock:
            self._check_alive(sb)
            transition(sb.id, sb.rec.state, Action.SET_NETWORK)
            new = dataclasses.replace(sb.rec)
            if allow_internet_access is not None:
                new.allow_internet_access = allow_internet_access
            if a is not None:
                new.allow_out = a
            if d is not None:
                new.deny_out = d
            if allow_public_traffic is not None:
                new.allow_public_traffic = allow_public_traffic
                if not allow_public_traffic and not new.traffic_token:
                    new.traffic_token = secrets.token_urlsafe(24)
            await self.network.update(sb.id, self._policy(new))
            sb.rec = new
            self.store.put(new)
        return sb.rec

    def _check_alive(self, sb: Sandbox) -> None:
        if sb.gone:
            raise sandbox_not_found(sb.id)

    # -- guest access -------------------------------------------------------

    def guest_channel(self, sandbox_id: str, access_token: str) -> tuple[grpc.aio.Channel, str]:
        """The channel to a sandbox's guestd and the token to send, after every check."""
        sb = self._get(sandbox_id)
        if sb.rec.secure and not hmac.compare_digest(
            access_token.encode(), sb.rec.access_token.encode()
        ):
            raise Unauthenticated(
                f"sandbox {sandbox_id} is secure: guest calls need its access token"
                " in x-moru-access-token"
            )
        transition(sb.id, sb.rec.state, Action.GUEST_CALL)
        if sb.res.channel is None:
            raise Unavailable(f"sandbox {sandbox_id} has no guest connection")
        return sb.res.channel, sb.rec.access_token

    def metrics(self, sandbox_id: str, start: float | None, end: float | None) -> list[Sample]:
        sb = self._get(sandbox_id)
        return [
            s
            for s in sb.metrics
            if (start is None or s.timestamp >= start) and (end is None or s.timestamp <= end)
        ]

    def proxy_target(self, sandbox_id: str) -> Any:
        """For the port proxy: where a sandbox's ports are, or None (unknown/paused)."""
        from hostd.network import ProxyTarget

        sb = self._sandboxes.get(sandbox_id)
        if sb is None or sb.gone or sb.rec.state is not State.RUNNING:
            return None
        ip = sb.rec.network.get("guest_ip")
        if not ip:
            return None
        return ProxyTarget(guest_ip=str(ip), traffic_token=sb.rec.traffic_token or None)

    def host(self, sandbox_id: str, port: int) -> tuple[str, str]:
        validation.port(port)
        sb = self._get(sandbox_id)
        net = self.config.network
        name = f"{port}-{sb.id}.{net.proxy_domain}"
        proxy_port = net.proxy_listen.rsplit(":", 1)[-1]
        # `http://{host}/` must work as written, so a non-default proxy port is
        # part of the host (the proxy ignores it when routing; SNI carries none).
        host = name if proxy_port in ("80", "443") else f"{name}:{proxy_port}"
        return host, f"http://{host}"

    def console_log(self, sandbox_id: str, tail_bytes: int) -> bytes:
        sb = self._get(sandbox_id)
        vm = sb.res.vm
        if vm is None:
            return b""
        n = tail_bytes or 64 * 1024
        try:
            with vm.console_log.open("rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - n))
                return f.read()
        except FileNotFoundError:
            return b""

    # -- background ---------------------------------------------------------

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            await self.reap_once()

    async def reap_once(self) -> None:
        """Kills sandboxes past end_at and cleans up those whose VMM died."""
        now = time.time()
        due: list[tuple[Sandbox, Reason, str]] = []
        for sb in list(self._sandboxes.values()):
            if sb.gone or sb.rec.state is State.CREATING or sb.lock.locked():
                continue
            if sb.rec.paused_to_disk:
                continue  # no processes to watch; paused sandboxes do not expire
            if sb.res.vm is not None and not sb.res.vm.is_alive():
                due.append((sb, Reason.VMM_EXITED, "the VMM process exited"))
            elif sb.rec.state is State.RUNNING and now >= sb.rec.end_at:
                due.append((sb, Reason.TIMEOUT, ""))
        if due:
            async with asyncio.TaskGroup() as tg:
                for sb, reason, msg in due:
                    tg.create_task(self._kill(sb, reason, msg))

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.metrics_interval_seconds)
            running = [
                sb
                for sb in self._sandboxes.values()
                if not sb.gone and sb.rec.state is State.RUNNING
            ]
            async with asyncio.TaskGroup() as tg:
                for sb in running:
                    tg.create_task(self._sample(sb))

    async def _sample(self, sb: Sandbox) -> None:
        ch = sb.res.channel
        if ch is None:
            return
        try:
            s = await GuestClient(ch, sb.rec.access_token).metrics()
        except grpc.aio.AioRpcError as e:
            log.debug("metrics of %s: %s", sb.id, e.details())
            return
        except grpc.aio.UsageError as e:  # a Kill closed the channel before the call
            log.debug("metrics of %s: %s", sb.id, e)
            return
        except asyncio.CancelledError:
            # grpc.aio cancels calls in flight on a channel a Kill closes; only a
            # cancel of this task itself goes on.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return
        cg = sb.res.cgroup
        if cg is not None:
            with contextlib.suppress(OSError, ValueError):
                s = dataclasses.replace(
                    s,
                    host_cpu_seconds=cg.cpu_usage_seconds(),
                    host_memory_bytes=cg.memory_usage_bytes(),
                )
        sb.metrics.append(s)


def _net_config(net: Any) -> guest_pb2.NetworkConfig:
    """What `moru.net=` (SandboxNetwork.kernel_args) gives a booting guest, for Init."""
    return guest_pb2.NetworkConfig(
        address=f"{net.guest_ip}/{net.prefix_len}", gateway=net.gateway, dns=net.dns, mac=net.mac
    )


def _net_dict(net: Any) -> dict[str, Any]:
    """The network's own serialisation (what NetworkManager.attach takes back)."""
    to_dict = getattr(net, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else {}


__all__ = ["CreateOptions", "Sandbox", "SandboxManager", "new_sandbox_id"]

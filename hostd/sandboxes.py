"""The sandbox lifecycle manager: where hostd's logic lives (servicers only translate).

Create (`hostd.create`) takes resources one by one behind an AsyncExitStack;
on success the stack moves into the sandbox (`pop_all`) and Kill simply
closes it, so every resource has exactly one release path, registered right
after it was taken. Pause to disk (`hostd.disk_pause`) and re-attach after a
restart (`hostd.reattach`) get the driver and the store, not this manager.
Background work (reaper, VMM watcher, metrics sampler in `hostd.sampler`) runs in `run()` under
the server's task group: no fire-and-forget tasks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from hostd import disk_pause, paging, validation
from hostd.config import Config
from hostd.create import Creator
from hostd.errors import (
    FailedPrecondition,
    Unauthenticated,
    Unavailable,
    sandbox_not_found,
)
from hostd.events import Event, EventBus, EventType, Reason
from hostd.guest import Sample
from hostd.health import HealthChecker, HealthPolicy
from hostd.network import ProxyTarget
from hostd.pool import WarmPool
from hostd.pool_members import build_pool
from hostd.ready_snapshots import ReadySnapshots
from hostd.reattach import Reattacher
from hostd.resources import Capacity
from hostd.sampler import MetricsSampler
from hostd.sandbox import CreateOptions, Sandbox, egress_policy, new_sandbox_id
from hostd.state import Action, State, transition
from hostd.store import SandboxRecord, Store
from hostd.vmm.base import Vmm
from images.manifest import TemplateManifest, load_manifest

if TYPE_CHECKING:
    from hostd.volumes.manager import VolumeManager

log = logging.getLogger("hostd.sandboxes")

TICK = 0.2  # reaper/watcher period: kills land within ~TICK of end_at
# Why a kill ended a sandbox, as Sandbox.end says it (hostd.passthrough words it).
END_REASONS = {Reason.USER: "killed", Reason.TIMEOUT: "timeout", Reason.HEALTH: "error"}


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
        self.health = HealthChecker(
            lambda: list(self._sandboxes.values()), store, self.bus, self.guest_env,
            HealthPolicy(config.health_interval_seconds, config.guest_unhealthy_seconds,
                         config.error_kill_seconds),
        )  # fmt: skip
        self.sampler = MetricsSampler(
            lambda: list(self._sandboxes.values()), self.health.answered,
            config.metrics_interval_seconds,
        )  # fmt: skip
        self.ready: ReadySnapshots | None = None
        if config.ready_snapshot_templates:
            if vmm.can_restore:
                self.ready = ReadySnapshots(
                    config, vmm, cgroups, network, self._load_template, self.capacity
                )
            else:
                log.warning("ready snapshots are off: the %s driver cannot restore VMs",
                            vmm.name)  # fmt: skip
        self.creator = Creator(config, store, vmm, cgroups, network, self.capacity, self.bus,
                               self._load_template, self.ready, self._sandboxes)  # fmt: skip
        self.pool: WarmPool[Sandbox] | None = build_pool(
            config, self._load_template, self.creator.prepare_member, self.capacity, self.bus
        )
        self.creator.pool = self.pool

    @property
    def volumes(self) -> VolumeManager | None:
        """hostd.volumes.VolumeManager, set by the server; None: volumes refused."""
        return self.creator.volumes

    @volumes.setter
    def volumes(self, v: VolumeManager | None) -> None:
        self.creator.volumes = v

    # -- startup / shutdown -------------------------------------------------

    async def start(self) -> None:
        """Re-attaches every stored sandbox; cleans up dead ones and orphans."""
        self.config.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        r = Reattacher(self.config, self.store, self.vmm, self.cgroups, self.network, self.bus)
        for sb in await r.reattach_all():
            self._sandboxes[sb.id] = sb
            self.capacity.add(sb.id, 0 if sb.rec.paused_to_disk else sb.rec.memory_mb)
        await r.remove_orphans(set(self._sandboxes))
        if self.ready is not None:
            self.ready.remove_partial()

    async def close(self) -> None:
        """Drops hostd's handles; VMs keep running for the next hostd to re-attach.

        Warm pool members are not sandboxes yet: they are destroyed.
        """
        if self.pool is not None:
            await self.pool.close()
        for sb in list(self._sandboxes.values()):
            await sb.res.detach()

    async def run(self) -> None:
        """Reaper, VMM watcher and metrics sampler; runs until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._reap_loop())
            tg.create_task(self.sampler.run())
            tg.create_task(self.health.run())
            if self.ready is not None:
                tg.create_task(self.ready.run())
            if self.pool is not None:
                tg.create_task(self.pool.run())

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
        want = set(states or [State.RUNNING, State.PAUSED, State.ERROR])
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
        sb = await self.creator.create(opts)
        if sb.create_path == "cold_boot":
            # A claim or a restore returns without it (a guest round trip, 0.1-0.4 s
            # under TCG, more in a just-restored QEMU): the sampler takes it within
            # metrics_interval_seconds.
            await self.sampler.sample(sb)
        rec = sb.rec
        self.bus.publish(
            Event(sb.id, EventType.CREATED, Reason.USER, rec.template_id, sb.create_path,
                  duration=time.monotonic() - t0)
        )  # fmt: skip
        log.info("created %s (template %s, %s) in %.2f s", sb.id, rec.template_id,
                 sb.create_path, time.monotonic() - t0)  # fmt: skip
        return rec

    # -- lifecycle ----------------------------------------------------------

    async def kill(self, sandbox_id: str, reason: Reason = Reason.USER, message: str = "") -> None:
        sb = self._get(sandbox_id)
        await self._kill(sb, reason, message)

    async def _kill(self, sb: Sandbox, reason: Reason, message: str = "") -> None:
        t0 = time.monotonic()
        if not sb.gone:  # open calls end now, not after whatever holds the lock
            sb.end(END_REASONS.get(reason, reason.name.lower()))
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
            sb.end("paused")
            try:
                if self.config.pause_to_disk and disk_pause.can_pause_to_disk(sb.res.vm):
                    info = await disk_pause.pause(sb)
                    sb.rec.paused_to_disk = True
                    self.capacity.resize(sb.id, 0)
                    message = f"to disk ({info.size_bytes >> 20} MiB)"
                else:
                    await sb.res.vm.pause()
                    await sb.res.cgroup.freeze()
            except BaseException:
                sb.reopen()  # still running: new calls must not end at once
                raise
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
                    await disk_pause.resume(self.vmm, sb, self.guest_env(sb.rec))
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
            sb.reopen()
        await self.sampler.sample(sb)
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
            await self.network.update(sb.id, egress_policy(new))
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

    def vsock_uds(self, sandbox_id: str) -> Path:
        """The hybrid-vsock socket of a running sandbox's VM (for hostd.data_relay)."""
        sb = self._get(sandbox_id)
        transition(sb.id, sb.rec.state, Action.GUEST_CALL)
        if sb.res.vm is None:
            raise Unavailable(f"sandbox {sandbox_id} has no VM")
        return Path(sb.res.vm.vsock_uds)

    def metrics(self, sandbox_id: str, start: float | None, end: float | None) -> list[Sample]:
        sb = self._get(sandbox_id)
        return [
            s
            for s in sb.metrics
            if (start is None or s.timestamp >= start) and (end is None or s.timestamp <= end)
        ]

    def proxy_target(self, sandbox_id: str) -> Any:
        """For the port proxy: where a sandbox's ports are, or None (unknown/paused)."""
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
            elif sb.rec.state is State.ERROR and now >= sb.rec.end_at:
                due.append((sb, Reason.HEALTH, sb.rec.error))
        if due:
            async with asyncio.TaskGroup() as tg:
                for sb, reason, msg in due:
                    tg.create_task(self._kill(sb, reason, msg))


__all__ = ["CreateOptions", "Sandbox", "SandboxManager", "new_sandbox_id"]

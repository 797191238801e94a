"""Warm pool members as sandboxes: which pool the config asks for, and the claim.

`hostd.pool.WarmPool` only counts; this module is what a member is to the
rest of hostd. A member is made by `Creator.prepare_member` (the create
path with a pool-only token and the lowest CPU weight); `Claimer.claim`
makes one the caller's sandbox: Init with its identity (id, hostname, env,
a fresh token in place of the pool's, entropy, clock), its egress policy,
its TTL and its store row.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from hostd.cgroups import DEFAULT_CPU_WEIGHT
from hostd.config import Config
from hostd.events import EventBus
from hostd.guest import GuestClient
from hostd.pool import PoolShape, WarmPool
from hostd.resources import Capacity
from hostd.sandbox import CreateOptions, Sandbox, egress_policy, new_sandbox_id
from hostd.state import Action, transition
from hostd.store import Store
from images.manifest import TemplateManifest, TemplateNotFound

log = logging.getLogger("hostd.pool")

# A member's CPU weight until claimed: 1% of a sandbox's, so preparing one never
# slows the node's sandboxes.
MEMBER_CPU_WEIGHT = 1


def build_pool(
    config: Config,
    load_template: Callable[[str], TemplateManifest],
    prepare: Callable[[PoolShape, str], Coroutine[object, object, Sandbox]],
    capacity: Capacity,
    bus: EventBus,
) -> WarmPool[Sandbox] | None:
    """The pool `warm_pool` asks for (shapes from the templates' defaults), or None."""
    targets: dict[PoolShape, int] = {}
    for e in config.warm_pool_entries():
        if e.count <= 0:
            continue
        try:
            d = load_template(e.template).defaults
        except TemplateNotFound:
            log.warning("warm_pool: template %s is not built; no pool for it", e.template)
            continue
        shape = PoolShape(e.template, e.vcpus or d.vcpus, e.memory_mb or d.memory_mb,
                          e.disk_mb or d.disk_mb)  # fmt: skip
        targets[shape] = targets.get(shape, 0) + e.count
    if not targets:
        return None
    return WarmPool(
        targets,
        prepare=prepare,
        destroy=destroy_member,
        alive=member_alive,
        new_id=new_sandbox_id,
        capacity=capacity,
        bus=bus,
        max_age=config.warm_pool_max_age_seconds,
        backoff_max=config.warm_pool_backoff_max_seconds,
    )


async def destroy_member(sb: Sandbox) -> None:
    """Releases everything a member holds (its whole create stack, store row included)."""
    sb.gone = True
    await sb.res.release()


def member_alive(sb: Sandbox) -> bool:
    vm = sb.res.vm
    return vm is not None and vm.is_alive() and not vm.vsock_device_dead()


class Claimer:
    """Makes a prepared member the caller's sandbox; holds only what that needs."""

    def __init__(
        self,
        config: Config,
        store: Store,
        network: Any | None,
        capacity: Capacity,
        sandboxes: dict[str, Sandbox],
    ) -> None:
        self.config = config
        self.store = store
        self.network = network
        self.capacity = capacity
        self._sandboxes = sandboxes

    async def claim(
        self,
        sb: Sandbox,
        opts: CreateOptions,
        ttl: int,
        metadata: dict[str, str],
        envs: dict[str, str],
        allow_out: list[str],
        deny_out: list[str],
        template_env: Mapping[str, str],
    ) -> Sandbox | None:
        """The member, now the caller's running sandbox; None (member destroyed): create as usual.

        The member's capacity reservation (under its id) becomes the sandbox's.
        """
        sid, member = sb.id, sb.rec
        new = dataclasses.replace(
            member, metadata=metadata, envs=envs, secure=opts.secure,
            access_token=secrets.token_urlsafe(24) if opts.secure else "",
            traffic_token="" if opts.allow_public_traffic else secrets.token_urlsafe(24),
            allow_internet_access=opts.allow_internet_access, allow_out=allow_out,
            deny_out=deny_out, allow_public_traffic=opts.allow_public_traffic,
        )  # fmt: skip
        ok = False
        async with sb.lock:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    stack.push_async_callback(destroy_member, sb)
                    stack.callback(self.capacity.release, sid)
                    sb.rec = new
                    self._sandboxes[sid] = sb
                    stack.callback(self._sandboxes.pop, sid, None)
                    sb.background = False
                    sb.res.cgroup.set_cpu_weight(DEFAULT_CPU_WEIGHT)
                    async with asyncio.timeout(self.config.create_deadline_seconds):
                        if self.network is not None and egress_policy(new) != egress_policy(member):
                            sb.stage = "applying the egress policy"
                            await self.network.update(sid, egress_policy(new))
                        sb.stage = "in Guest.Init"
                        assert sb.res.channel is not None
                        t_init = time.monotonic()
                        await GuestClient(sb.res.channel, member.access_token).init(
                            sandbox_id=sid, template_id=new.template_id, hostname=new.hostname,
                            env={**template_env, **envs}, access_token=new.access_token,
                            rpc_timeout=30.0,
                        )  # fmt: skip
                    t_init = time.monotonic() - t_init
                    new.state = transition(sid, new.state, Action.READY)
                    new.created_at = new.started_at = time.time()
                    new.end_at = new.started_at + ttl
                    self.store.put(new)
                    stack.pop_all()
                    ok = True
            except Exception as e:
                log.warning("%s: claiming the warm pool member failed (%s: %s); creating as usual",
                            sid, sb.stage, e)  # fmt: skip
                return None
            finally:
                sb.gone = not ok
        sb.create_path = "warm_pool"
        log.info("%s: claimed from the warm pool (Init %.3f s)", sid, t_init)
        return sb


__all__ = ["MEMBER_CPU_WEIGHT", "Claimer", "build_pool", "destroy_member", "member_alive"]

"""Warm pool members as sandboxes: which pool the config asks for, and the claim.

`hostd.pool.WarmPool` only counts; this module is what a member is to the
rest of hostd. A member is made by `Creator.prepare_member` (the create
path with a pool-only token and the lowest CPU weight) and warmed by
`warm_member` (the SDK's first command, run once); `Claimer.claim`
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

from hostd.config import Config
from hostd.events import EventBus
from hostd.guest import TOKEN_HEADER, GuestClient
from hostd.pool import PoolShape, WarmPool
from hostd.resources import Capacity
from hostd.sandbox import CreateOptions, Sandbox, egress_policy, new_sandbox_id
from hostd.sandbox_cgroup import DEFAULT_CPU_WEIGHT
from hostd.state import Action, transition
from hostd.store import Store
from images.manifest import TemplateManifest, TemplateNotFound
from moru_proto.guest.v1 import process_pb2, process_pb2_grpc

log = logging.getLogger("hostd.pool")

# What a member runs once before it is ready: the SDK's commands.run("true") as sent.
WARM_COMMAND = "true"
WARM_TIMEOUT_SECONDS = 60.0
# How long after a claim the next member's preparation waits: restoring one
# (copying its RAM file, starting QEMU) takes both host cores for a moment,
# which the claimed sandbox's first commands would otherwise share.
REFILL_AFTER_CLAIM_SECONDS = 1.0

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

    async def prepare_warm(shape: PoolShape, mid: str) -> Sandbox:
        sb = await prepare(shape, mid)
        try:
            await warm_member(sb)
        except BaseException:
            await destroy_member(sb)
            raise
        return sb

    return WarmPool(
        targets,
        prepare=prepare_warm,
        destroy=destroy_member,
        alive=member_alive,
        new_id=new_sandbox_id,
        capacity=capacity,
        bus=bus,
        max_age=config.warm_pool_max_age_seconds,
        backoff_max=config.warm_pool_backoff_max_seconds,
    )


async def warm_member(sb: Sandbox) -> None:
    """Runs the first command a client would, as the default user, before the member is ready.

    A restored guest has done nothing since its snapshot: the first command
    in it pays for TCG translating bash, the dynamic loader and the kernel's
    exec path in this QEMU process, for the page cache of what it reads, and
    for guestd's lazy work (the login environment, kept per user and Init
    env, so a claim without envs reuses it; the user lookup). Done here, a
    claimed sandbox's first command pays none of it.
    """
    assert sb.res.channel is not None
    stub = process_pb2_grpc.ProcessStub(sb.res.channel)
    req = process_pb2.StartRequest(config=process_pb2.ProcessConfig(shell=WARM_COMMAND))
    code: int | None = None
    async for ev in stub.Start(req, metadata=((TOKEN_HEADER, sb.rec.access_token),),
                               timeout=WARM_TIMEOUT_SECONDS):  # fmt: skip
        if ev.WhichOneof("event") == "end":
            code = ev.end.exit_code if ev.end.exited else -1
    if code != 0:
        raise RuntimeError(f"warm pool member {sb.id}: `{WARM_COMMAND}` ended with {code}")


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
        self._claimed_at = -REFILL_AFTER_CLAIM_SECONDS

    async def settle(self) -> None:
        """Returns once the last claim is REFILL_AFTER_CLAIM_SECONDS old (a refill waits here)."""
        left = self._claimed_at + REFILL_AFTER_CLAIM_SECONDS - time.monotonic()
        while left > 0:  # a claim during the wait moves the end
            await asyncio.sleep(left)
            left = self._claimed_at + REFILL_AFTER_CLAIM_SECONDS - time.monotonic()

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
        t0 = self._claimed_at = time.monotonic()
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
                    # Runs before the destroy: says whether the member had died (a
                    # QEMU still exiting after a kill looked alive at the claim).
                    stack.callback(lambda: sb.end("died while waiting" if not member_alive(sb)
                                                  else "claim failed"))
                    stack.callback(self.capacity.release, sid)
                    sb.rec = new
                    self._sandboxes[sid] = sb
                    stack.callback(self._sandboxes.pop, sid, None)
                    sb.background = False
                    sb.res.cgroup.set_cpu_weight(DEFAULT_CPU_WEIGHT)
                    t_policy = t_init = time.monotonic()
                    async with asyncio.timeout(self.config.create_deadline_seconds):
                        if self.network is not None and egress_policy(new) != egress_policy(member):
                            sb.stage = "applying the egress policy"
                            await self.network.update(sid, egress_policy(new))
                        sb.stage = "in Guest.Init"
                        assert sb.res.channel is not None
                        t_init = time.monotonic()
                        t_policy = t_init - t_policy
                        await GuestClient(sb.res.channel, member.access_token).init(
                            sandbox_id=sid, template_id=new.template_id, hostname=new.hostname,
                            env={**template_env, **envs}, access_token=new.access_token,
                            rpc_timeout=30.0,
                        )  # fmt: skip
                    t_store = time.monotonic()
                    t_init = t_store - t_init
                    new.state = transition(sid, new.state, Action.READY)
                    new.created_at = new.started_at = time.time()
                    new.end_at = new.started_at + ttl
                    self.store.put(new)
                    t_store = time.monotonic() - t_store
                    stack.pop_all()
                    ok = True
            except Exception as e:
                log.warning("%s: claiming the warm pool member failed (%s: %s); creating as usual",
                            sid, sb.stage, e)  # fmt: skip
                return None
            finally:
                sb.gone = not ok
        sb.create_path = "warm_pool"
        log.info("%s: claimed from the warm pool in %.1f ms (egress policy %.1f ms, Init %.1f ms,"
                 " store %.1f ms)", sid, (time.monotonic() - t0) * 1000, t_policy * 1000,
                 t_init * 1000, t_store * 1000)  # fmt: skip
        return sb


__all__ = ["MEMBER_CPU_WEIGHT", "Claimer", "build_pool", "destroy_member", "member_alive",
           "warm_member"]

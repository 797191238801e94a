"""Per-sandbox health checks: repair what can be repaired, mark the rest error.

Every `health_interval_seconds`, for each running sandbox:
- QEMU: a dead VMM is the reaper's (it kills the sandbox, reason vmm_exited);
- the vsock backend (vhost-device-vsock) gone, or alive without its worker:
  the driver starts a fresh one and plugs the device in again
  (`Vm.restart_vsock_backend`); event `repaired`. Where the driver cannot,
  the sandbox is marked error;
- guestd: a Health call, unless the metrics sampler got an answer from an
  initialised guestd within the interval (`answered`): that counts as the
  check, so an idle sandbox costs guestd one call per interval, not two (a
  unary call costs a TCG guest 30-55 ms of CPU). Answered but not initialised means its restart loop
  started a fresh guestd: it gets Init again with the sandbox's identity,
  env and token; event `repaired`. Unanswered for `guest_unhealthy_seconds`
  (a guest too busy to answer counts too): error.

Marking error sets the state (with its reason in `SandboxRecord.error`, shown
by Get, List and /metrics), ends every open call on it (`Sandbox.end`) and
publishes an `error` event; the sandbox's end_at moves to at most
`error_kill_seconds` away, and the reaper then kills it (reason health).

The checker gets what it needs (the live sandboxes, the store, the event
bus, the env of a sandbox) and nothing else; it never reaches into the manager.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from hostd.events import Event, EventBus, EventType, Reason
from hostd.guest import GuestClient
from hostd.state import Action, State, transition
from hostd.store import SandboxRecord, Store

if TYPE_CHECKING:
    from hostd.sandbox import Sandbox

log = logging.getLogger("hostd.health")

HEALTH_RPC_SECONDS = 5.0
INIT_RPC_SECONDS = 30.0


@dataclass(frozen=True)
class HealthPolicy:
    interval: float = 2.0
    guest_unhealthy: float = 60.0  # seconds guestd may go unanswered
    error_kill: float = 30.0  # seconds an error sandbox stays listed


class HealthChecker:
    def __init__(
        self,
        sandboxes: Callable[[], Iterable[Sandbox]],
        store: Store,
        bus: EventBus,
        guest_env: Callable[[SandboxRecord], dict[str, str]],
        policy: HealthPolicy,
    ) -> None:
        self._sandboxes = sandboxes
        self._store = store
        self._bus = bus
        self._guest_env = guest_env
        self.policy = policy
        # sandbox id -> monotonic time guestd first failed to answer (cleared on an answer)
        self._silent_since: dict[str, float] = {}
        # sandbox id -> monotonic time of the last answer of an initialised guestd
        # to another call (the metrics sampler's)
        self._answered_at: dict[str, float] = {}
        self.health_calls = 0  # Health RPCs sent (what `answered` saves)

    def answered(self, sandbox_id: str) -> None:
        """An initialised guestd answered a call just now: the next check may skip its own."""
        self._answered_at[sandbox_id] = time.monotonic()
        self._silent_since.pop(sandbox_id, None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.policy.interval)
            await self.check_all()

    async def check_all(self) -> None:
        due = [sb for sb in self._sandboxes() if _checkable(sb)]
        live = {sb.id for sb in self._sandboxes()}
        for known in (self._silent_since, self._answered_at):
            for sid in list(known):
                if sid not in live:
                    del known[sid]
        if due:
            async with asyncio.TaskGroup() as tg:
                for sb in due:
                    tg.create_task(self._check_logged(sb))

    async def _check_logged(self, sb: Sandbox) -> None:
        try:
            await self.check(sb)
        except Exception:  # one sandbox's check must not stop the others'
            log.exception("health check of %s failed", sb.id)

    async def check(self, sb: Sandbox) -> None:
        vm = sb.res.vm
        if vm is None or not vm.is_alive():
            return  # the reaper's: it kills the sandbox (vmm_exited)
        if not vm.vsock_backend_alive() or vm.vsock_device_dead():
            await self._repair_vsock(sb)
            return
        at = self._answered_at.get(sb.id)
        if at is not None and time.monotonic() - at < self.policy.interval:
            return  # the sampler's call just now counts as this check
        await self._check_guest(sb)

    async def _repair_vsock(self, sb: Sandbox) -> None:
        vm = sb.res.vm
        assert vm is not None
        what = "exited" if not vm.vsock_backend_alive() else "stopped serving (no worker thread)"
        t0 = time.monotonic()
        async with sb.lock:
            if not _checkable(sb, locked_ok=True):
                return
            log.warning("%s: its vsock backend %s; restarting it", sb.id, what)
            try:
                await vm.restart_vsock_backend()
            except Exception as e:
                await self._fail(sb, f"the vsock backend {what} and could not be restarted: {e}")
                return
            await self._reconnect(sb)
        self._publish(sb, EventType.REPAIRED, f"vsock backend {what}; restarted it",
                      time.monotonic() - t0)  # fmt: skip
        log.info("%s: vsock backend restarted in %.2f s", sb.id, time.monotonic() - t0)

    async def _reconnect(self, sb: Sandbox) -> None:
        """Waits until hostd's channel reaches guestd again, so the next call does not
        fail on a reconnect backoff; a guest that stays silent is the next checks' matter."""
        ch = sb.res.channel
        if ch is None:
            return
        try:
            await GuestClient(ch, sb.rec.access_token).health(INIT_RPC_SECONDS, wait_for_ready=True)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
            log.warning("%s: guestd not reachable yet after the vsock repair: %s", sb.id, e)

    async def _check_guest(self, sb: Sandbox) -> None:
        ch = sb.res.channel
        if ch is None:
            return
        client = GuestClient(ch, sb.rec.access_token)
        self.health_calls += 1
        try:
            r = await client.health(HEALTH_RPC_SECONDS)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
            await self._guest_silent(sb, e.details() if isinstance(e, grpc.aio.AioRpcError)
                                     else str(e))  # fmt: skip
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return  # a Kill closed the channel under the call
        self._silent_since.pop(sb.id, None)
        if not r.initialized:
            await self._reinit(sb, client)

    async def _guest_silent(self, sb: Sandbox, why: str | None) -> None:
        now = time.monotonic()
        since = self._silent_since.setdefault(sb.id, now)
        if now - since < self.policy.guest_unhealthy:
            if since == now:
                log.warning("%s: guestd does not answer (%s)", sb.id, why)
            return
        async with sb.lock:
            if _checkable(sb, locked_ok=True):
                await self._fail(sb, f"guestd has not answered for {now - since:.0f} s ({why})")

    async def _reinit(self, sb: Sandbox, client: GuestClient) -> None:
        """A restarted guestd: the sandbox's identity, env and token again."""
        rec = sb.rec
        t0 = time.monotonic()
        log.warning("%s: guestd restarted (not initialised); initialising it again", sb.id)
        await client.init(
            sandbox_id=rec.sandbox_id,
            template_id=rec.template_id,
            hostname=rec.hostname,
            env=self._guest_env(rec),
            access_token=rec.access_token,
            rpc_timeout=INIT_RPC_SECONDS,
        )
        self._publish(sb, EventType.REPAIRED, "guestd restarted; initialised it again",
                      time.monotonic() - t0)  # fmt: skip

    async def _fail(self, sb: Sandbox, why: str) -> None:
        """State error (caller holds sb.lock): visible everywhere, killed by the reaper later."""
        rec = sb.rec
        rec.state = transition(sb.id, rec.state, Action.FAIL)
        rec.error = why
        rec.end_at = min(rec.end_at, time.time() + self.policy.error_kill)
        self._store.put(rec)
        sb.end(f"error: {why}")
        self._silent_since.pop(sb.id, None)
        log.error("%s: marked error: %s", sb.id, why)
        self._publish(sb, EventType.ERROR, why)

    def _publish(
        self, sb: Sandbox, typ: EventType, msg: str, duration: float | None = None
    ) -> None:
        self._bus.publish(Event(sb.id, typ, Reason.HEALTH, sb.rec.template_id, msg, duration))


def _checkable(sb: Sandbox, locked_ok: bool = False) -> bool:
    """Running, not being killed/paused/resumed right now."""
    return (not sb.gone and sb.rec.state is State.RUNNING and not sb.rec.paused_to_disk
            and (locked_ok or not sb.lock.locked()))  # fmt: skip


__all__ = ["HealthChecker", "HealthPolicy"]

"""Per-sandbox networks: namespace, veth pair, tap, egress rules and resolver.

Layout of one sandbox (slot addresses in `slots.py`)::

    root netns                      netns <prefix>-<id>                 VM
    uplink <-NAT- <veth_prefix><slot> <==veth==> veth0   tap0 (gateway, dnsmasq) <-> eth0

The host's table (`nft.host_rules`) masquerades the pool to the uplink and
isolates sandboxes from each other and from the host; the namespace's table
(`nft.sandbox_rules`) enforces the sandbox's egress policy. Each sandbox's
record lives in ``<run_dir>/<netns>/net.json`` so teardown and leftover
cleanup work without hostd's store too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostd.vmm.base import NetAttachment

from . import links, nft, resolver
from .config import NetworkConfig
from .policy import EgressPolicy
from .slots import SlotPool, addresses

log = logging.getLogger(__name__)

_SANDBOX_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class NetworkError(RuntimeError):
    """A sandbox network could not be set up, changed or found; the message says why."""


@dataclass
class SandboxNetwork:
    """What the VMM and the guest need to know about one sandbox's network."""

    sandbox_id: str
    netns: str
    tap: str
    mac: str
    guest_ip: str
    prefix_len: int
    gateway: str
    dns: str
    host_veth: str
    slot: int
    policy: EgressPolicy = field(default_factory=EgressPolicy)

    def kernel_args(self) -> str:
        """The guest init's eth0 configuration."""
        return f"moru.net={self.guest_ip}/{self.prefix_len},{self.gateway},{self.dns}"

    def attachment(self) -> NetAttachment:
        """For VmSpec.net."""
        return NetAttachment(netns=self.netns, tap=self.tap, mac=self.mac)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sandbox_id": self.sandbox_id,
            "netns": self.netns,
            "tap": self.tap,
            "mac": self.mac,
            "guest_ip": self.guest_ip,
            "prefix_len": self.prefix_len,
            "gateway": self.gateway,
            "dns": self.dns,
            "host_veth": self.host_veth,
            "slot": self.slot,
            "policy": self.policy.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SandboxNetwork:
        return cls(
            sandbox_id=str(d["sandbox_id"]),
            netns=str(d["netns"]),
            tap=str(d["tap"]),
            mac=str(d["mac"]),
            guest_ip=str(d["guest_ip"]),
            prefix_len=int(d["prefix_len"]),
            gateway=str(d["gateway"]),
            dns=str(d["dns"]),
            host_veth=str(d["host_veth"]),
            slot=int(d["slot"]),
            policy=EgressPolicy.from_dict(d.get("policy") or {}),
        )


class NetworkManager:
    """Owns the host's sandbox networking; one per hostd."""

    def __init__(self, config: NetworkConfig) -> None:
        self.config = config
        self.slots = SlotPool(config.pool)
        self._nets: dict[str, SandboxNetwork] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # -- names and files -------------------------------------------------

    def netns_name(self, sandbox_id: str) -> str:
        if not _SANDBOX_ID.match(sandbox_id):
            raise ValueError(f"invalid sandbox_id {sandbox_id!r}")
        return f"{self.config.name_prefix}-{sandbox_id.removeprefix('sbx_')[:40]}"

    def _dir(self, netns: str) -> Path:
        return self.config.run_dir / netns

    def _conf(self, netns: str) -> Path:
        return self._dir(netns) / "dnsmasq.conf"

    def _pid(self, netns: str) -> Path:
        return self._dir(netns) / "dnsmasq.pid"

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def _records(self) -> dict[str, SandboxNetwork]:
        out: dict[str, SandboxNetwork] = {}
        if not self.config.run_dir.is_dir():
            return out
        for f in self.config.run_dir.glob("*/net.json"):
            try:
                net = SandboxNetwork.from_dict(json.loads(f.read_text()))
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring unreadable network record %s: %s", f, e)
                continue
            out[net.sandbox_id] = net
        return out

    def _write_record(self, net: SandboxNetwork) -> None:
        path = self._dir(net.netns) / "net.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(net.to_dict()))
        tmp.replace(path)

    # -- host side -------------------------------------------------------

    async def start(self) -> None:
        """Enables forwarding, loads the host's table and reserves recorded slots."""
        if not self.config.enabled:
            return
        _enable_forwarding(self.config.run_dir)
        await nft.run_nft(
            nft.host_rules(
                self.config.table, self.config.veth_prefix, self.config.pool, self.config.uplink
            )
        )
        for net in self._records().values():
            if 0 <= net.slot < self.slots.size:
                self.slots.reserve(net.slot)

    async def stop(self, purge: bool = False) -> None:
        """Leaves sandboxes running (they outlive hostd) unless purge: then removes everything."""
        if not purge:
            return
        for sid in list(self._nets) + list(self._records()):
            await self.teardown(sid)
        await nft.run_nft(nft.delete_table_script("inet", self.config.table))

    # -- per sandbox -----------------------------------------------------

    async def setup(self, sandbox_id: str, policy: EgressPolicy) -> SandboxNetwork:
        """Creates the sandbox's network; on any failure nothing is left behind."""
        if not self.config.enabled:
            raise NetworkError("sandbox networking is disabled in hostd's configuration")
        ns = self.netns_name(sandbox_id)
        async with self._lock(sandbox_id):
            if sandbox_id in self._nets:
                raise NetworkError(f"sandbox {sandbox_id} already has a network")
            async with contextlib.AsyncExitStack() as stack:
                slot = self.slots.acquire()
                stack.callback(self.slots.release, slot)
                a = addresses(self.config.pool, slot)
                net = SandboxNetwork(
                    sandbox_id=sandbox_id,
                    netns=ns,
                    tap=nft.TAP,
                    mac=a.mac,
                    guest_ip=str(a.guest_ip),
                    prefix_len=a.guest_net.prefixlen,
                    gateway=str(a.gateway),
                    dns=str(a.gateway),
                    host_veth=f"{self.config.veth_prefix}{slot}",
                    slot=slot,
                    policy=policy,
                )
                # Leftovers of a crashed hostd under the same names go first.
                await self._destroy(net)
                stack.push_async_callback(self._destroy, net)
                self._dir(ns).mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(
                    links.in_own_thread, lambda: links.create(ns, net.host_veth, a, a.mac)
                )
                await self._ns_init(net)
                await self._start_resolver(net)
                self._write_record(net)
                stack.pop_all()
            self._nets[sandbox_id] = net
            return net

    async def update(self, sandbox_id: str, policy: EgressPolicy) -> SandboxNetwork:
        """Applies a new egress policy to a running sandbox (new and open connections)."""
        async with self._lock(sandbox_id):
            net = self._nets.get(sandbox_id)
            if net is None:
                raise NetworkError(f"sandbox {sandbox_id} has no network")
            new = SandboxNetwork(**{**net.__dict__, "policy": policy})
            await nft.run_nft(self._sandbox_rules(new), netns=new.netns)
            await resolver.stop(self._conf(new.netns), self._pid(new.netns))
            await self._start_resolver(new)
            self._write_record(new)
            self._nets[sandbox_id] = new
            return new

    async def teardown(self, sandbox_id: str) -> None:
        """Removes everything of the sandbox's network; safe to repeat."""
        async with self._lock(sandbox_id):
            net = self._nets.pop(sandbox_id, None) or self._records().get(sandbox_id)
            if net is None:
                ns = self.netns_name(sandbox_id)
                await self._destroy_names(ns, None)
            else:
                await self._destroy(net)
                self.slots.release(net.slot)
        self._locks.pop(sandbox_id, None)

    async def attach(self, sandbox_id: str, saved: dict[str, Any],
                     policy: EgressPolicy | None = None) -> SandboxNetwork:
        """Takes over a sandbox's network after a hostd restart.

        Its rules and resolver are made again from `policy` (default: the saved
        one) and this hostd's configuration, so rules fixed in a newer hostd or
        a changed config apply to sandboxes that outlived the old one
        (`_reapply`: in one nft transaction, no traffic gap)."""
        net = SandboxNetwork.from_dict(saved)
        if policy is not None:
            net.policy = policy
        if net.sandbox_id != sandbox_id:
            raise NetworkError(f"saved network belongs to {net.sandbox_id}, not {sandbox_id}")
        async with self._lock(sandbox_id):
            ok = links.netns_exists(net.netns) and await asyncio.to_thread(
                links.link_exists, net.host_veth
            )
            if not ok:
                raise NetworkError(
                    f"network of sandbox {sandbox_id} is gone (netns {net.netns} or "
                    f"veth {net.host_veth} missing)"
                )
            self.slots.reserve(net.slot)
            self._dir(net.netns).mkdir(parents=True, exist_ok=True)
            await self._reapply(net)
            self._write_record(net)
            self._nets[sandbox_id] = net
            return net

    def get(self, sandbox_id: str) -> SandboxNetwork | None:
        return self._nets.get(sandbox_id)

    def list_leftovers(self) -> list[str]:
        """Sandbox ids (or, without a record, namespace/link names) with networking on this host."""
        found = set(self._records())
        known_ns = {n.netns for n in self._records().values()}
        known_links = {n.host_veth for n in self._records().values()}
        found.update(
            n for n in links.list_netns(self.config.name_prefix + "-") if n not in known_ns
        )
        found.update(
            n
            for n in links.list_links(self.config.veth_prefix)
            if n[len(self.config.veth_prefix) :].isdigit() and n not in known_links
        )
        return sorted(found)

    async def cleanup_orphans(self, keep_ids: set[str] | list[str]) -> list[str]:
        """Tears down every sandbox network not in keep_ids; returns what was removed."""
        keep = set(keep_ids)
        keep_ns = {self.netns_name(s) for s in keep}
        keep_links = {n.host_veth for n in self._nets.values() if n.sandbox_id in keep}
        keep_links |= {n.host_veth for n in self._records().values() if n.sandbox_id in keep}
        removed: list[str] = []
        for item in self.list_leftovers():
            if item in keep or item in keep_ns or item in keep_links:
                continue
            if item in self._records() or item in self._nets:
                await self.teardown(item)
            elif item.startswith(self.config.name_prefix + "-"):
                await self._destroy_names(item, None)
            else:
                await asyncio.to_thread(links.delete_link, item)
            removed.append(item)
        return removed

    # -- helpers ---------------------------------------------------------

    def _sandbox_rules(self, net: SandboxNetwork) -> str:
        a = addresses(self.config.pool, net.slot)
        c = self.config
        return nft.sandbox_rules(
            c.table,
            net.policy,
            a.guest_ip,
            a.gateway,
            a.host_veth_ip,
            dns_upstream=c.dns_upstream,
            limits=nft.RateLimits(c.new_conn_rate, c.new_conn_burst, c.dns_rate, c.dns_burst),
        )

    async def _reapply(self, net: SandboxNetwork) -> None:
        """The namespace's rules and resolver as this hostd makes them, in place.

        The table is replaced in one transaction (nft: add, delete, define), so
        no packet meets a namespace without rules; the addresses the resolver
        put into the dns sets are carried over, so connections to allowed
        domains go on. The resolver is restarted only when its configuration
        changed (or it is not running)."""
        t = self.config.table
        keep = ""
        for name in (nft.ALLOW_DNS_SET, nft.DENY_DNS_SET):
            keep += nft.add_elements(t, name, await nft.set_elements(t, name, net.netns))
        await nft.run_nft(self._sandbox_rules(net) + keep, netns=net.netns)
        conf, pid = self._conf(net.netns), self._pid(net.netns)
        running = resolver.running(conf, pid)
        try:
            old = conf.read_text()
        except OSError:
            old = ""
        if running and old == self._resolver_conf(net):
            return
        if running:
            log.info("%s: resolver configuration changed; restarting it", net.sandbox_id)
            await resolver.stop(conf, pid)
        await self._start_resolver(net)

    async def _ns_init(self, net: SandboxNetwork) -> None:
        """Turns on forwarding inside the namespace and loads its rules, in one process."""
        proc = await asyncio.create_subprocess_exec(
            "nsenter",
            f"--net={nft.NETNS_DIR}/{net.netns}",
            "sh",
            "-c",
            "echo 1 >/proc/sys/net/ipv4/ip_forward && "
            "{ echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6; } 2>/dev/null; "  # no IPv6: fine
            "exec nft -f -",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate(self._sandbox_rules(net).encode())
        if proc.returncode != 0:
            raise NetworkError(
                f"netns {net.netns}: rules failed: {(err or out).decode(errors='replace').strip()}"
            )

    def _resolver_conf(self, net: SandboxNetwork) -> str:
        return resolver.render_conf(
            table=self.config.table,
            policy=net.policy,
            listen=net.gateway,
            upstream=self.config.dns_upstream,
            pid_file=self._pid(net.netns),
        )

    async def _start_resolver(self, net: SandboxNetwork) -> None:
        conf, pid = self._conf(net.netns), self._pid(net.netns)
        conf.write_text(self._resolver_conf(net))
        await resolver.start(net.netns, conf, pid)

    async def _destroy(self, net: SandboxNetwork) -> None:
        await self._destroy_names(net.netns, net.host_veth)

    async def _destroy_names(self, ns: str, host_veth: str | None) -> None:
        await resolver.stop(self._conf(ns), self._pid(ns))
        if host_veth is not None:
            await asyncio.to_thread(links.delete_link, host_veth)
        await asyncio.to_thread(links.delete_netns, ns)
        shutil.rmtree(self._dir(ns), ignore_errors=True)


def _enable_forwarding(run_dir: Path) -> None:
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    run_dir.mkdir(parents=True, exist_ok=True)


def guest_address(net: SandboxNetwork) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(net.guest_ip)

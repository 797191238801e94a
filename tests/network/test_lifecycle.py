"""Set-up, teardown, failures, hostd restarts and leftovers: nothing may be left behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pyroute2 import NetNS

from hostd.network import (
    EgressPolicy,
    NetworkManager,
    PoolExhausted,
    SandboxNetwork,
    nft,
    resolver,
)
from hostd.network.nft import list_tables

from .conftest import HOSTS, Env, plug_standin, probe, run, test_config, unplug_standin


def _pid(mgr: NetworkManager, net: SandboxNetwork) -> int:
    return int((mgr.config.run_dir / net.netns / "dnsmasq.pid").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/cmdline").read_bytes() != b""


def _veth_gone(name: str) -> bool:
    return not Path(f"/sys/class/net/{name}").exists()


def test_teardown_leaves_nothing(env: Env) -> None:
    mgr = env.mgr
    net = run(mgr.setup("sbx_td", EgressPolicy(deny_out=["denied.test"])))
    pid = _pid(mgr, net)
    assert Path("/run/netns", net.netns).exists()
    assert not _veth_gone(net.host_veth)
    assert _alive(pid)
    with NetNS(net.netns) as ns:
        assert ns.link_lookup(ifname=net.tap)
    assert f"inet {mgr.config.table}" in run(list_tables(net.netns))
    assert net.slot in mgr.slots.in_use
    run(mgr.teardown("sbx_td"))
    assert not Path("/run/netns", net.netns).exists()
    assert _veth_gone(net.host_veth)
    assert not _alive(pid)
    assert not (mgr.config.run_dir / net.netns).exists()
    assert mgr.slots.in_use == frozenset()
    assert mgr.get("sbx_td") is None
    assert mgr.list_leftovers() == []
    run(mgr.teardown("sbx_td"))  # idempotent
    run(mgr.teardown("sbx_never_existed"))


def test_failed_setup_cleans_up(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure late in setup (the resolver, injected here) undoes everything before it."""

    async def boom(*a: object, **k: object) -> int:
        raise resolver.ResolverError("injected failure")

    monkeypatch.setattr(resolver, "start", boom)
    with pytest.raises(resolver.ResolverError, match="injected"):
        run(env.mgr.setup("sbx_fail", EgressPolicy()))
    assert env.mgr.list_leftovers() == []
    assert env.mgr.slots.in_use == frozenset()
    assert not Path("/run/netns", env.mgr.netns_name("sbx_fail")).exists()


def test_pool_exhaustion_and_slot_reuse(fake_inet: None) -> None:
    cfg = test_config()
    cfg.pool_cidr = "10.201.0.0/28"  # two slots
    mgr = NetworkManager(cfg)
    run(mgr.start())
    try:
        a = run(mgr.setup("sbx_p1", EgressPolicy()))
        b = run(mgr.setup("sbx_p2", EgressPolicy()))
        assert {a.slot, b.slot} == {0, 1} and a.guest_ip != b.guest_ip
        with pytest.raises(PoolExhausted):
            run(mgr.setup("sbx_p3", EgressPolicy()))
        assert sorted(mgr.list_leftovers()) == ["sbx_p1", "sbx_p2"]
        run(mgr.teardown("sbx_p1"))
        c = run(mgr.setup("sbx_p3", EgressPolicy()))
        assert c.slot == a.slot and c.guest_ip == a.guest_ip
    finally:
        run(mgr.stop(purge=True))
    assert mgr.list_leftovers() == []


def test_hostd_restart_reattaches(env: Env) -> None:
    s = env.sandbox("sbx_restart", EgressPolicy(allow_out=["allowed.test"]))
    saved = s.net.to_dict()
    # hostd dies (kill -9: nothing torn down) and its resolver dies too.
    os.kill(_pid(env.mgr, s.net), signal.SIGKILL)
    time.sleep(0.1)
    mgr2 = NetworkManager(test_config())
    run(mgr2.start())
    assert s.net.slot in mgr2.slots.in_use  # reserved from the record until attached
    assert mgr2.list_leftovers() == ["sbx_restart"]
    net = run(mgr2.attach("sbx_restart", saved))
    assert net == s.net
    r = probe(s.ns, [["dns", "allowed.test", net.gateway], ["http", HOSTS["allowed.test"], 80]])
    assert r[0] == [HOSTS["allowed.test"]] and r[1].startswith("inet "), r
    other = run(mgr2.setup("sbx_restart2", EgressPolicy()))
    assert other.slot != net.slot
    run(mgr2.teardown("sbx_restart2"))
    env.mgr = mgr2  # the env fixture purges through the new manager


def _ns_table(mgr: NetworkManager, net: SandboxNetwork) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", net.netns, "nft", "list", "table", "inet", mgr.config.table],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


def test_hostd_restart_reapplies_rules_from_the_stored_policy(env: Env) -> None:
    """The namespace keeps the rules of the hostd that made it until the next
    hostd attaches: that one makes them again from the stored policy (before:
    an older hostd's rules stayed until the policy changed)."""
    s = env.sandbox("sbx_reapply", EgressPolicy(allow_out=["allowed.test"]))
    r = probe(s.ns, [["dns", "allowed.test", s.net.gateway]])
    assert r[0] == [HOSTS["allowed.test"]], r  # the resolver put it into the allow set
    resolver_pid = _pid(env.mgr, s.net)
    # An older hostd's rule set: no anti-spoofing, forward open; the allow set
    # as the resolver filled it.
    t = env.mgr.config.table
    resolved = run(nft.set_elements(t, nft.ALLOW_DNS_SET, s.net.netns))
    assert resolved == [HOSTS["allowed.test"]]
    stale = (f"add table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n"
             f"  set {nft.ALLOW_DNS_SET} {{ type ipv4_addr; elements = {{ {resolved[0]} }} }}\n"
             "  chain forward { type filter hook forward priority filter; policy accept; }\n}\n")
    run(nft.run_nft(stale, netns=s.net.netns))
    assert "antispoof" not in _ns_table(env.mgr, s.net)
    # hostd killed -9 (nothing torn down); the next one attaches.
    mgr2 = NetworkManager(test_config())
    run(mgr2.start())
    env.mgr = mgr2  # the env fixture purges through the new manager
    net = run(mgr2.attach("sbx_reapply", s.net.to_dict(), EgressPolicy(allow_out=["allowed.test"])))
    table = _ns_table(mgr2, net)
    assert "chain antispoof" in table and "policy drop" in table, table
    # Unchanged resolver config: the same resolver, no restart (no DNS gap) ...
    assert _pid(mgr2, net) == resolver_pid
    # ... and the addresses it resolved so far are still allowed (open connections go on).
    r = probe(s.ns, [["http", HOSTS["allowed.test"], 80], ["http", HOSTS["other.test"], 80]])
    assert r[0].startswith("inet "), r
    assert not r[1].startswith("inet "), r  # the re-applied policy denies the rest
    # A policy that differs from the saved one (e.g. stored after a SetNetwork
    # the old hostd did not finish) wins, resolver included.
    net = run(mgr2.attach("sbx_reapply", net.to_dict(), EgressPolicy(allow_internet_access=False)))
    assert _pid(mgr2, net) != resolver_pid
    r = probe(s.ns, [["http", HOSTS["allowed.test"], 80]])
    assert not r[0].startswith("inet "), r


def test_attach_fails_when_network_is_gone(env: Env) -> None:
    net = run(env.mgr.setup("sbx_gone", EgressPolicy()))
    saved = net.to_dict()
    run(env.mgr.teardown("sbx_gone"))
    from hostd.network import NetworkError

    with pytest.raises(NetworkError, match="is gone"):
        run(env.mgr.attach("sbx_gone", saved))


def test_cleanup_orphans_keeps_only_live_sandboxes(env: Env) -> None:
    keep = run(env.mgr.setup("sbx_keep", EgressPolicy()))
    drop = run(env.mgr.setup("sbx_drop", EgressPolicy()))
    mgr2 = NetworkManager(test_config())
    run(mgr2.start())
    removed = run(mgr2.cleanup_orphans({"sbx_keep"}))
    assert removed == ["sbx_drop"]
    assert mgr2.list_leftovers() == ["sbx_keep"]
    assert _veth_gone(drop.host_veth) and not _veth_gone(keep.host_veth)
    run(mgr2.attach("sbx_keep", keep.to_dict()))
    env.mgr = mgr2


def test_concurrent_setups(env: Env) -> None:
    async def many() -> list[SandboxNetwork]:
        return await asyncio.gather(*(env.mgr.setup(f"sbx_c{i}", EgressPolicy()) for i in range(6)))

    nets = run(many())
    assert len({n.slot for n in nets}) == 6
    assert len({n.guest_ip for n in nets}) == 6
    s = plug_standin(nets[3])
    try:
        assert probe(s.ns, [["http", HOSTS["other.test"], 80]])[0].startswith("inet ")
    finally:
        unplug_standin(s)

"""Egress policy with real traffic between namespaces.

The guest is a stand-in namespace plugged where the VM's tap would be (see
conftest); test_vm_network.py repeats the key cases with a real microVM.
"""

from __future__ import annotations

from hostd.network import EgressPolicy

from .conftest import DNS_IP, HOSTS, INET_IP, Env, probe, run

A, D, OT = HOSTS["allowed.test"], HOSTS["denied.test"], HOSTS["other.test"]


def ok_http(result: str, addr: str) -> bool:
    return result.startswith(f"inet {addr} ")


def test_default_reaches_fake_internet(env: Env) -> None:
    s = env.sandbox("sbx_default")
    gw = s.net.gateway
    r = probe(
        s.ns,
        [
            ["http", A, 80],
            ["http", OT, 80],
            ["dns", "other.test", gw],
            ["udp", INET_IP, 7],
            ["icmp", INET_IP],
        ],
    )
    assert ok_http(r[0], A) and ok_http(r[1], OT), r
    assert r[2] == [OT], r
    assert r[3] == "echo:ping", r
    assert r[4] == "reply", r


def test_internet_off_reaches_nothing(env: Env) -> None:
    s = env.sandbox("sbx_off", EgressPolicy(allow_internet_access=False))
    gw = s.net.gateway
    r = probe(
        s.ns,
        [
            ["http", A, 80],
            ["udp", INET_IP, 7],
            ["icmp", INET_IP],
            ["dns", "allowed.test", gw],
            ["dns", "allowed.test", DNS_IP],
            ["icmp", gw],
        ],
    )
    assert r[0].startswith("error:"), r
    assert r[1].startswith("error:"), r
    assert r[2].startswith("error:"), r
    # DNS is answered at once by the sandbox's resolver, REFUSED, and not forwarded
    assert r[3] == "rcode:5" and r[4] == "rcode:5", r
    assert r[5].startswith("error:"), r


def test_allow_out_cidr_denies_everything_else(env: Env) -> None:
    s = env.sandbox("sbx_allowcidr", EgressPolicy(allow_out=["198.18.1.0/24"]))
    r = probe(s.ns, [["http", A, 80], ["http", D, 80], ["http", OT, 80], ["udp", INET_IP, 7]])
    assert ok_http(r[0], A), r
    assert all(x.startswith("error:") for x in r[1:]), r


def test_allow_out_domain_with_internet_off(env: Env) -> None:
    s = env.sandbox(
        "sbx_allowdom", EgressPolicy(allow_internet_access=False, allow_out=["allowed.test"])
    )
    gw = s.net.gateway
    # Before resolving, the address is not allowed; the resolver lets it in.
    before = probe(s.ns, [["http", A, 80]])
    assert before[0].startswith("error:"), before
    r = probe(
        s.ns,
        [
            ["dns", "allowed.test", gw],
            ["http", A, 80],
            ["dns", "other.test", gw],
            ["http", OT, 80],
            ["dns", "allowed.test", "198.51.100.53"],
        ],
    )
    assert r[0] == [A], r
    assert ok_http(r[1], A), r
    assert r[2] == "rcode:5", r  # REFUSED: names outside the allow list are not resolved
    assert r[3].startswith("error:"), r
    # DNS sent to any other server is answered by the sandbox's resolver.
    assert r[4] == [A], r


def test_deny_out_domain_all_else_allowed(env: Env) -> None:
    s = env.sandbox("sbx_denydom", EgressPolicy(deny_out=["denied.test"]))
    gw = s.net.gateway
    r = probe(
        s.ns, [["dns", "denied.test", gw], ["http", D, 80], ["http", A, 80], ["http", OT, 80]]
    )
    assert r[0] == [D], r
    assert r[1].startswith("error:"), r
    assert ok_http(r[2], A) and ok_http(r[3], OT), r


def test_deny_out_cidr_all_else_allowed(env: Env) -> None:
    s = env.sandbox("sbx_denycidr", EgressPolicy(deny_out=["198.19.0.0/16", D]))
    r = probe(s.ns, [["http", OT, 80], ["http", D, 80], ["http", A, 80], ["icmp", OT]])
    assert r[0].startswith("error:") and r[1].startswith("error:"), r
    assert r[3].startswith("error:"), r
    assert ok_http(r[2], A), r


def test_deny_beats_allow(env: Env) -> None:
    pol = EgressPolicy(allow_out=["198.18.0.0/15", "other.test"], deny_out=[D, "other.test"])
    s = env.sandbox("sbx_denywins", pol)
    gw = s.net.gateway
    r = probe(s.ns, [["http", A, 80], ["http", D, 80], ["dns", "other.test", gw], ["http", OT, 80]])
    assert ok_http(r[0], A), r
    assert r[1].startswith("error:"), r
    assert r[2] == [OT], r
    assert r[3].startswith("error:"), r


def test_policy_update_on_running_sandbox(env: Env) -> None:
    s = env.sandbox("sbx_update")
    assert ok_http(probe(s.ns, [["http", A, 80]])[0], A)
    run(env.mgr.update("sbx_update", EgressPolicy(allow_internet_access=False)))
    r = probe(s.ns, [["http", A, 80], ["dns", "allowed.test", s.net.gateway]])
    assert r[0].startswith("error:") and isinstance(r[1], str), r
    run(env.mgr.update("sbx_update", EgressPolicy(deny_out=["allowed.test"])))
    r = probe(s.ns, [["http", OT, 80], ["dns", "allowed.test", s.net.gateway], ["http", A, 80]])
    assert ok_http(r[0], OT) and r[1] == [A] and r[2].startswith("error:"), r
    run(env.mgr.update("sbx_update", EgressPolicy()))
    assert ok_http(probe(s.ns, [["http", A, 80]])[0], A)
    assert env.mgr.get("sbx_update").policy == EgressPolicy()  # type: ignore[union-attr]

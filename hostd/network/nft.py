"""nftables rules: the host's table (NAT, isolation) and one table per sandbox namespace.

Rules are rendered as nft scripts and loaded with ``nft -f -`` (run inside a
sandbox namespace through ``nsenter``). Every load replaces the whole table in
one transaction, so a policy update never leaves a half-applied rule set.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass

from .policy import DEFAULT_DENIED_NETS, EgressPolicy

NETNS_DIR = "/run/netns"
NS_VETH = "veth0"
TAP = "tap0"
ALLOW_DNS_SET = "allow_dns"
DENY_DNS_SET = "deny_dns"


class NftError(RuntimeError):
    """nft refused a rule set; the message carries nft's own error."""


async def _nft(args: list[str], netns: str | None, stdin: bytes | None = None,
               ) -> tuple[int, bytes, bytes]:
    """(exit code, stdout, stderr) of `nft *args` in the root namespace or in netns."""
    argv = ["nft", *args]
    if netns is not None:
        argv = ["nsenter", f"--net={NETNS_DIR}/{netns}", *argv]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    return proc.returncode or 0, out, err


async def run_nft(script: str, netns: str | None = None) -> None:
    """Loads an nft script in the root namespace or in netns."""
    rc, out, err = await _nft(["-f", "-"], netns, script.encode())
    if rc != 0:
        where = f" in netns {netns}" if netns else ""
        raise NftError(f"nft failed{where}: {(err or out).decode(errors='replace').strip()}")


async def list_tables(netns: str | None = None) -> list[str]:
    """``family name`` of every table (for leftover checks)."""
    rc, out, err = await _nft(["list", "tables"], netns)
    if rc != 0:
        raise NftError(f"nft list tables failed: {err.decode(errors='replace').strip()}")
    return [line.removeprefix("table ").strip() for line in out.decode().splitlines() if line]


async def set_elements(table: str, name: str, netns: str) -> list[str]:
    """The addresses in set `name` of `inet table` in netns ([] when there is none)."""
    rc, out, _ = await _nft(["-j", "list", "set", "inet", table, name], netns)
    if rc != 0:
        return []
    found: list[str] = []
    for item in json.loads(out or b"{}").get("nftables", []):
        for elem in item.get("set", {}).get("elem", []):
            if isinstance(elem, str):
                found.append(elem)
    return found


def add_elements(table: str, name: str, addrs: list[str]) -> str:
    return f"add element inet {table} {name} {{ {', '.join(addrs)} }}\n" if addrs else ""


def _replace(family: str, table: str, body: str) -> str:
    # "add" makes "delete" safe when the table does not exist yet; all three
    # lines are one transaction.
    return f"add table {family} {table}\ndelete table {family} {table}\n{body}"


def delete_table_script(family: str, table: str) -> str:
    return f"add table {family} {table}\ndelete table {family} {table}\n"


def host_rules(table: str, veth_prefix: str, pool: ipaddress.IPv4Network, uplink: str) -> str:
    """The root namespace's rules.

    Sandbox traffic may only be forwarded to the uplink (masqueraded there);
    never to another sandbox, another host interface or the host itself.
    Traffic towards a sandbox is forwarded only when it answers the sandbox.
    The host's own processes (the port proxy) reach guests directly: that is
    output, not forward, and the sandbox's own table admits it.
    """
    v = f'"{veth_prefix}*"'
    nat = f'    ip saddr {pool} oifname "{uplink}" masquerade\n' if uplink else ""
    to_uplink = f'iifname {v} oifname != "{uplink}" drop' if uplink else f"iifname {v} drop"
    return _replace(
        "inet",
        table,
        f"""table inet {table} {{
  chain forward {{
    type filter hook forward priority filter - 5; policy accept;
    iifname {v} oifname {v} drop
    {to_uplink}
    oifname {v} ct state established,related accept
    oifname {v} drop
  }}
  chain input {{
    type filter hook input priority filter - 5; policy accept;
    iifname {v} ct state established,related accept
    iifname {v} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
{nat}  }}
}}
""",
    )


def _elements(nets: Iterable[ipaddress.IPv4Network]) -> str:
    items = [str(n) for n in nets]
    return f"    elements = {{ {', '.join(items)} }}\n" if items else ""


@dataclass(frozen=True)
class RateLimits:
    """Per-sandbox limits (per second, burst on top); 0: no limit."""

    new_conn_rate: int = 0
    new_conn_burst: int = 0
    dns_rate: int = 0
    dns_burst: int = 0


def _limit(name: str, rate: int, burst: int) -> str:
    if rate <= 0:
        return ""
    return f"  limit {name} {{ rate over {rate}/second burst {max(burst, 1)} packets }}\n"


def _over(name: str, rate: int) -> str:
    return f'limit name "{name}" drop' if rate > 0 else ""


def sandbox_rules(
    table: str,
    policy: EgressPolicy,
    guest_ip: ipaddress.IPv4Address,
    gateway: ipaddress.IPv4Address,
    host_veth_ip: ipaddress.IPv4Address,
    *,
    dns_upstream: str = "",
    limits: RateLimits = RateLimits(),
) -> str:
    """The rules inside one sandbox's namespace (its egress policy).

    Every packet the guest sends (not only new connections) is checked, so a
    policy update also cuts connections opened before it. The guest's DNS,
    whatever server it asks, is redirected to the resolver on its gateway,
    which adds the addresses of allowed/denied domains to the dns sets.

    Anti-spoofing comes first (prerouting, before the DNS redirect): a packet
    from the tap with any source but the guest's address is dropped on every
    path, the resolver included, so a forged query cannot make the resolver
    answer (reflect) to someone else. The namespace's own output is limited
    to the guest and to the DNS upstream, as a second line behind it.
    """
    dns = f'iifname "{TAP}" ip daddr {gateway} meta l4proto {{ tcp, udp }} th dport 53'
    # before the conntrack accept: a guest's queries from one socket are one
    # "established" flow, and each of them counts
    dns_limit = (
        f"    {dns} {_over('dns_queries', limits.dns_rate)}\n" if limits.dns_rate > 0 else ""
    )
    dns_rule = f"    {dns} accept\n"
    egress = f"    ip daddr @deny_net drop\n    ip daddr @{DENY_DNS_SET} drop\n"
    if policy.blocks_everything:
        egress += "    drop\n"
    else:
        egress += "    ip daddr @allow_private accept\n    ip daddr @default_denied drop\n"
        if policy.allowlist_mode:
            egress += (
                f"    ip daddr @allow_net accept\n    ip daddr @{ALLOW_DNS_SET} accept\n    drop\n"
            )
        else:
            egress += "    accept\n"
    new_conn = (
        f'    iifname "{TAP}" oifname "{NS_VETH}" ct state new '
        f"{_over('new_conns', limits.new_conn_rate)}\n"
        if limits.new_conn_rate > 0
        else ""
    )
    upstream = (
        f'    oifname "{NS_VETH}" ip daddr {ipaddress.IPv4Address(dns_upstream)} '
        "meta l4proto { tcp, udp } th dport 53 accept\n"
        if dns_upstream
        else ""
    )
    return _replace(
        "inet",
        table,
        f"""table inet {table} {{
  set allow_net {{
    type ipv4_addr; flags interval; auto-merge;
{_elements(policy.allow_nets)}  }}
  set deny_net {{
    type ipv4_addr; flags interval; auto-merge;
{_elements(policy.deny_nets)}  }}
  set allow_private {{
    type ipv4_addr; flags interval; auto-merge;
{_elements(policy.allow_private_nets)}  }}
  set default_denied {{
    type ipv4_addr; flags interval; auto-merge;
{_elements(DEFAULT_DENIED_NETS)}  }}
  set {ALLOW_DNS_SET} {{ type ipv4_addr; }}
  set {DENY_DNS_SET} {{ type ipv4_addr; }}
{_limit("new_conns", limits.new_conn_rate, limits.new_conn_burst)}\
{_limit("dns_queries", limits.dns_rate, limits.dns_burst)}\
  chain antispoof {{
    type filter hook prerouting priority raw; policy accept;
    iifname "{TAP}" meta nfproto ipv6 drop
    iifname "{TAP}" ip saddr != {guest_ip} drop
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{TAP}" ip daddr != {gateway} meta l4proto {{ tcp, udp }} th dport 53 \
      dnat ip to {gateway}
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    iifname "lo" accept
{dns_limit}    ct state established,related accept
{dns_rule}  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    iifname "{TAP}" ip saddr != {guest_ip} drop
    iifname "{TAP}" ct direction reply ct state established accept
{new_conn}    iifname "{TAP}" oifname "{NS_VETH}" jump egress
    iifname "{NS_VETH}" oifname "{TAP}" ct state established,related accept
    iifname "{NS_VETH}" oifname "{TAP}" ip saddr {host_veth_ip} ct state new accept
  }}
  chain output {{
    type filter hook output priority filter; policy accept;
    oifname "{TAP}" ip daddr != {guest_ip} drop
    oifname "{NS_VETH}" ct state established,related accept
{upstream}    oifname "{NS_VETH}" drop
  }}
  chain egress {{
{egress}  }}
}}
""",
    )

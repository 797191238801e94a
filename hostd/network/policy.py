"""Egress policy: what a sandbox may reach, validated once at the edge.

Entries are IPv4 addresses, IPv4 CIDRs or domain names (a domain covers its
subdomains; a leading ``*.`` is accepted and means the same). Sandboxes have
IPv4 only, so IPv6 entries are refused rather than silently ignored.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")

# Destinations no sandbox reaches unless allow_out lists them (or a part of
# them) as an address/CIDR: link-local (cloud instance metadata at
# 169.254.169.254) and the private and carrier-grade NAT ranges, where a
# node's neighbours and internal services live. IPv6 (fc00::/7, fe80::/10)
# is dropped altogether, so it needs no list here.
DEFAULT_DENIED_NETS: tuple[ipaddress.IPv4Network, ...] = tuple(
    ipaddress.IPv4Network(n)
    for n in ("169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)


def parse_entry(entry: str) -> ipaddress.IPv4Network | str:
    """An IPv4 network or a normalised domain name; ValueError naming the entry."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"invalid network entry {entry!r}: empty")
    text = entry.strip().lower()
    if text[0].isdigit() or ":" in text:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            net = None
        if net is not None:
            if net.version != 4:
                raise ValueError(
                    f"invalid network entry {entry!r}: IPv6 is not supported (sandboxes are IPv4)"
                )
            assert isinstance(net, ipaddress.IPv4Network)
            return net
        if "/" in text or ":" in text or re.fullmatch(r"[0-9.]+", text):
            raise ValueError(f"invalid network entry {entry!r}: not an IPv4 address or CIDR")
    name = text[2:] if text.startswith("*.") else text
    name = name.rstrip(".")
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(x) for x in labels):
        raise ValueError(
            f"invalid network entry {entry!r}: not an IPv4 address, CIDR or domain name"
        )
    if labels[-1].isdigit():
        raise ValueError(f"invalid network entry {entry!r}: not a valid domain name")
    return name


@dataclass(frozen=True)
class EgressPolicy:
    """A sandbox's outbound rules.

    - ``allow_internet_access=False`` with an empty ``allow_out``: nothing leaves.
    - a non-empty ``allow_out``: only those destinations (whatever
      ``allow_internet_access`` says).
    - ``deny_out`` always wins over ``allow_out``.
    - ``DEFAULT_DENIED_NETS`` (link-local and private ranges) are denied
      unless an ``allow_out`` address/CIDR lies inside one of them; a domain
      in ``allow_out`` that resolves into them stays denied (no DNS rebinding
      into the node's network), and so does ``0.0.0.0/0``.
    """

    allow_internet_access: bool = True
    allow_out: list[str] = field(default_factory=list)
    deny_out: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for entry in [*self.allow_out, *self.deny_out]:
            parse_entry(entry)

    @staticmethod
    def _split(entries: list[str]) -> tuple[list[ipaddress.IPv4Network], list[str]]:
        nets: list[ipaddress.IPv4Network] = []
        domains: list[str] = []
        for e in entries:
            parsed = parse_entry(e)
            if isinstance(parsed, str):
                if parsed not in domains:
                    domains.append(parsed)
            else:
                nets.append(parsed)
        return nets, domains

    @property
    def allow_nets(self) -> list[ipaddress.IPv4Network]:
        return self._split(self.allow_out)[0]

    @property
    def allow_domains(self) -> list[str]:
        return self._split(self.allow_out)[1]

    @property
    def deny_nets(self) -> list[ipaddress.IPv4Network]:
        return self._split(self.deny_out)[0]

    @property
    def deny_domains(self) -> list[str]:
        return self._split(self.deny_out)[1]

    @property
    def allowlist_mode(self) -> bool:
        """Only allow_out destinations may be reached."""
        return bool(self.allow_out)

    @property
    def allow_private_nets(self) -> list[ipaddress.IPv4Network]:
        """allow_out addresses/CIDRs that open a part of ``DEFAULT_DENIED_NETS``."""
        return [n for n in self.allow_nets if any(n.subnet_of(d) for d in DEFAULT_DENIED_NETS)]

    @property
    def blocks_everything(self) -> bool:
        """Nothing may leave: internet off without allow_out, or 0.0.0.0/0 denied."""
        if any(n.prefixlen == 0 for n in self.deny_nets):
            return True
        return not self.allow_internet_access and not self.allow_out

    def to_dict(self) -> dict[str, Any]:
        return {
            "allow_internet_access": self.allow_internet_access,
            "allow_out": list(self.allow_out),
            "deny_out": list(self.deny_out),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EgressPolicy:
        return cls(
            allow_internet_access=bool(d.get("allow_internet_access", True)),
            allow_out=list(d.get("allow_out", [])),
            deny_out=list(d.get("deny_out", [])),
        )

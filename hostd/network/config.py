"""Node-wide network settings, with defaults that work on one machine."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path


def default_uplink() -> str:
    """The interface of the host's IPv4 default route ("" when there is none)."""
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return ""
    for line in lines:
        cols = line.split()
        if len(cols) > 2 and cols[1] == "00000000" and cols[7] == "00000000":
            return cols[0]
    return ""


def _nameservers(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 2 and cols[0] == "nameserver":
            out.append(cols[1])
    return out


def default_dns_upstream() -> str:
    """The host's first non-loopback IPv4 nameserver.

    A loopback resolver (systemd-resolved's 127.0.0.53) cannot be reached from
    a sandbox's namespace, so its own upstream list is used instead.
    """
    for path in (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf")):
        for ns in _nameservers(path):
            try:
                addr = ipaddress.ip_address(ns)
            except ValueError:
                continue
            if addr.version == 4 and not addr.is_loopback:
                return ns
    return ""


@dataclass
class NetworkConfig:
    """Settings of hostd's sandbox networking.

    ``name_prefix`` names the sandbox namespaces (``<prefix>-<short id>``),
    the host's nftables table and the state directory; ``veth_prefix`` (at
    most 5 characters) starts every host-side veth name. Two hostd instances
    (or a test and a real hostd) on one machine must differ in both and in
    ``pool_cidr``.

    The rate limits apply to each sandbox on its own (0: no limit): new
    connections the guest opens (TCP, UDP flows, ICMP) and DNS queries to its
    resolver, per second with a burst allowance, so one sandbox cannot flood
    the uplink or the upstream resolver. Packets over the limit are dropped.
    """

    enabled: bool = True
    pool_cidr: str = "10.200.0.0/16"
    uplink: str = field(default_factory=default_uplink)
    dns_upstream: str = field(default_factory=default_dns_upstream)
    proxy_listen: str = "127.0.0.1:50070"
    proxy_domain: str = "localhost"
    name_prefix: str = "moru"
    veth_prefix: str = "mv"
    run_dir: Path = Path("/run/moru/net")
    new_conn_rate: int = 200
    new_conn_burst: int = 400
    dns_rate: int = 50
    dns_burst: int = 100
    proxy_host: str = field(init=False, default="")
    proxy_port: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        pool = ipaddress.ip_network(self.pool_cidr, strict=True)
        if pool.version != 4 or pool.prefixlen > 28:
            raise ValueError(f"pool_cidr {self.pool_cidr!r}: need an IPv4 network of /28 or larger")
        if not 1 <= len(self.veth_prefix) <= 5 or not self.veth_prefix.isalnum():
            raise ValueError(f"veth_prefix {self.veth_prefix!r}: 1-5 letters or digits")
        if not self.name_prefix.replace("-", "").isalnum():
            raise ValueError(f"name_prefix {self.name_prefix!r}: letters, digits and '-'")
        self.run_dir = Path(self.run_dir)
        for name in ("new_conn_rate", "new_conn_burst", "dns_rate", "dns_burst"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} {value!r}: a whole number >= 0 (0: no limit)")
        if self.dns_upstream:
            ipaddress.IPv4Address(self.dns_upstream)
        self.proxy_host, self.proxy_port = parse_listen(self.proxy_listen)

    @property
    def pool(self) -> ipaddress.IPv4Network:
        net = ipaddress.ip_network(self.pool_cidr)
        assert isinstance(net, ipaddress.IPv4Network)
        return net

    @property
    def table(self) -> str:
        """nftables table name, in the host and in each sandbox namespace."""
        return self.name_prefix.replace("-", "_")


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"proxy_listen {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)

"""Netlink work through pyroute2: namespaces, the veth pair, the tap, addresses, routes.

These calls block (netlink round trips, a helper process for the namespace
socket), so the manager runs them in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from .nft import NETNS_DIR, NS_VETH, TAP
from .slots import GUEST_PREFIX, SlotAddresses

SYS_NET = "/sys/class/net"
ENOENT = 2
ENODEV = 19


def netns_exists(name: str) -> bool:
    return Path(NETNS_DIR, name).exists()


def list_netns(prefix: str) -> list[str]:
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def list_links(prefix: str) -> list[str]:
    """Root-namespace interfaces whose name starts with prefix.

    Read from sysfs, not netlink: pyroute2's synchronous sockets cannot be
    used from a thread running an event loop, and this is called from one.
    """
    return sorted(n for n in os.listdir(SYS_NET) if n.startswith(prefix))


def link_exists(name: str) -> bool:
    return os.path.exists(os.path.join(SYS_NET, name))


def create(ns: str, host_veth: str, a: SlotAddresses, mac: str) -> None:
    """Makes the namespace with its veth pair (host end addressed and routed) and tap."""
    netns.create(ns)
    with IPRoute() as ip:
        ip.link("add", ifname=host_veth, kind="veth", peer={"ifname": NS_VETH, "net_ns_fd": ns})
        idx = ip.link_lookup(ifname=host_veth)[0]
        ip.addr("add", index=idx, address=str(a.host_veth_ip), prefixlen=30)
        ip.link("set", index=idx, state="up")
        ip.route("add", dst=str(a.guest_net), gateway=str(a.ns_veth_ip), oif=idx)
    with NetNS(ns) as nsr:
        lo = nsr.link_lookup(ifname="lo")[0]
        nsr.link("set", index=lo, state="up")
        v = nsr.link_lookup(ifname=NS_VETH)[0]
        nsr.addr("add", index=v, address=str(a.ns_veth_ip), prefixlen=30)
        nsr.link("set", index=v, state="up")
        nsr.route("add", dst="0.0.0.0/0", gateway=str(a.host_veth_ip))
        nsr.link("add", ifname=TAP, kind="tuntap", mode="tap")
        t = nsr.link_lookup(ifname=TAP)[0]
        nsr.addr("add", index=t, address=str(a.gateway), prefixlen=GUEST_PREFIX)
        nsr.link("set", index=t, state="up")


def delete_link(name: str) -> None:
    """Deletes a root-namespace link (a veth takes its peer along); absent is fine."""
    with IPRoute() as ip:
        for idx in ip.link_lookup(ifname=name):
            try:
                ip.link("del", index=idx)
            except NetlinkError as e:
                if e.code not in (ENOENT, ENODEV):
                    raise


def delete_netns(name: str) -> None:
    if netns_exists(name):
        with contextlib.suppress(FileNotFoundError):
            netns.remove(name)


def ns_has_links(ns: str, names: list[str]) -> bool:
    with NetNS(ns) as nsr:
        return all(nsr.link_lookup(ifname=n) for n in names)

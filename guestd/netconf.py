"""An interface's MAC, address, state and default route set over rtnetlink, in-process.

Init configures a restored guest's network (a ready snapshot's clone gets its
own MAC, address and route). With busybox `ip` that was 5-6 processes, each a
fork and exec that a just-restored TCG guest runs with a cold translation
cache: 250-400 ms of Init. These are the same netlink requests `ip` sends,
from guestd itself.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR, RTM_NEWROUTE = 16, 20, 21, 22, 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_REPLACE, NLM_F_CREATE = 0x100, 0x400
IFLA_ADDRESS = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_OIF, RTA_GATEWAY = 4, 5
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1
IFF_UP = 0x1
HEADER = struct.Struct("=LHHLL")  # nlmsghdr: len, type, flags, seq, pid
IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg


class NetlinkError(OSError):
    """The kernel refused a request (errno and what was asked)."""


def _attr(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return struct.pack("=HH", size, kind) + data + bytes(-size % 4)


def _attrs(body: bytes) -> dict[int, bytes]:
    out = {}
    while len(body) >= 4:
        size, kind = struct.unpack_from("=HH", body)
        if size < 4:
            break
        out[kind] = body[4:size]
        body = body[(size + 3) & ~3 :]
    return out


class Rtnl:
    """One NETLINK_ROUTE socket; each request waits for the kernel's answer."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)  # fmt: skip
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, kind: int, flags: int, body: bytes, what: str) -> list[tuple[int, bytes]]:
        """Sends one message; returns the (type, body) of the answers (a dump's parts)."""
        self.seq += 1
        msg = HEADER.pack(HEADER.size + len(body), kind, NLM_F_REQUEST | flags, self.seq, 0)
        self.sock.send(msg + body)
        got: list[tuple[int, bytes]] = []
        while True:
            data = self.sock.recv(65536)
            while len(data) >= HEADER.size:
                size, mtype, _, seq, _ = HEADER.unpack_from(data)
                part, data = data[HEADER.size : size], data[(size + 3) & ~3 :]
                if seq != self.seq:
                    continue
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", part)[0]
                    if code:
                        raise NetlinkError(code, f"{what}: {os.strerror(code)}")
                    return got
                if mtype == NLMSG_DONE:
                    return got
                got.append((mtype, part))
            if not flags & NLM_F_DUMP and not flags & NLM_F_ACK:
                return got

    def set_link(self, index: int, *, mac: str | None = None, up: bool = False) -> None:
        body = IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP if up else 0)
        if mac:
            body += _attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
        self.request(RTM_NEWLINK, NLM_F_ACK, body, f"setting link {index}")

    def addresses(self, index: int, family: int) -> list[tuple[str, int]]:
        """(address, prefix length) of the interface's addresses of `family`."""
        out = []
        for _, part in self.request(RTM_GETADDR, NLM_F_DUMP, IFADDR.pack(family, 0, 0, 0, 0),
                                    "listing addresses"):  # fmt: skip
            fam, plen, _, _, idx = IFADDR.unpack_from(part)
            if idx != index or fam != family:
                continue
            attrs = _attrs(part[IFADDR.size :])
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw:
                out.append((socket.inet_ntop(fam, raw), plen))
        return out

    def _addr(self, kind: int, flags: int, index: int, iface: ipaddress.IPv4Interface
              | ipaddress.IPv6Interface, what: str) -> None:  # fmt: skip
        fam = socket.AF_INET if iface.version == 4 else socket.AF_INET6
        raw = iface.ip.packed
        body = IFADDR.pack(fam, iface.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index)
        body += _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
        self.request(kind, NLM_F_ACK | flags, body, what)

    def only_address(self, index: int, address: str) -> None:
        """`address` (with its prefix) the interface's one address of its family."""
        want = ipaddress.ip_interface(address)
        fam = socket.AF_INET if want.version == 4 else socket.AF_INET6
        have = self.addresses(index, fam)
        for ip, plen in have:
            if (ip, plen) != (str(want.ip), want.network.prefixlen):
                old = ipaddress.ip_interface(f"{ip}/{plen}")
                if old.is_link_local:
                    continue  # the kernel's own IPv6 link-local address stays
                self._addr(RTM_DELADDR, 0, index, old, f"removing address {old}")
        if (str(want.ip), want.network.prefixlen) not in have:
            self._addr(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, index, want,
                       f"adding address {want}")  # fmt: skip

    def default_route(self, index: int, gateway: str) -> None:
        """The default route via `gateway` on the interface (replacing any)."""
        gw = ipaddress.ip_address(gateway)
        fam = socket.AF_INET if gw.version == 4 else socket.AF_INET6
        body = RTMSG.pack(fam, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE,
                          RTN_UNICAST, 0)  # fmt: skip
        body += _attr(RTA_GATEWAY, gw.packed) + _attr(RTA_OIF, struct.pack("=I", index))
        self.request(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body,
                     f"default route via {gateway}")  # fmt: skip


def configure(iface: str, address: str, gateway: str = "", mac: str = "") -> None:
    """What `ip link set address` + `ip addr flush/add` + `ip link set up` + `ip route
    replace default` did; idempotent. NetlinkError names the step the kernel refused."""
    try:
        index = socket.if_nametoindex(iface)
    except OSError:
        raise NetlinkError(errno.ENODEV, f"no interface {iface}") from None
    with Rtnl() as nl:
        if mac:
            nl.set_link(index, mac=mac)
        nl.only_address(index, address)
        nl.set_link(index, up=True)
        if gateway:
            nl.default_route(index, gateway)

"""Netlink work through pyroute2: namespaces, the veth pair, the tap, addresses, routes.

These calls block (netlink round trips, a helper process for the namespace
socket), so the manager runs them in a worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from .nft import NETNS_DIR, NS_VETH, TAP
from .slots import GUEST_PREFIX, SlotAddresses

SYS_NET = "/sys/class/net"
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")
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


def in_own_thread(fn: Callable[[], T]) -> T:
    """Runs fn in a fresh thread that exits afterwards.

    `create` switches its thread's network namespace for a moment; a thread
    of its own means no pooled thread could ever be left in the wrong one.
    """
    box: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=run, name="moru-netlink")
    t.start()
    t.join()
    if err:
        raise err[0]
    return box[0]


def _oserror(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def _enter(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise _oserror("setns")


def create_netns(name: str) -> None:
    """Like `ip netns add`, without forking: unshare this thread, bind-mount, switch back.

    pyroute2's netns.create forks a helper (tens of ms from a big process);
    this takes well under a millisecond. Call only via `in_own_thread`.
    """
    os.makedirs(NETNS_DIR, exist_ok=True)
    path = os.path.join(NETNS_DIR, name)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444))
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise _oserror("unshare")
        try:
            src = b"/proc/thread-self/ns/net"
            if _libc.mount(src, path.encode(), None, MS_BIND, None) != 0:
                raise _oserror(f"bind-mount {path}")
        finally:
            _enter(own)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    finally:
        os.close(own)


@contextlib.contextmanager
def _inside(name: str) -> Iterator[None]:
    """This thread inside netns name for the block (ioctls such as the tap's need it)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
        try:
            _enter(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _enter(own)
    finally:
        os.close(own)


def create(ns: str, host_veth: str, a: SlotAddresses, mac: str) -> None:
    """Makes the namespace with its veth pair (host end addressed and routed) and tap.

    Call only via `in_own_thread` (it switches the thread's namespace briefly).
    """
    create_netns(ns)
    with IPRoute() as ip:
        ip.link("add", ifname=host_veth, kind="veth", peer={"ifname": NS_VETH, "net_ns_fd": ns})
        idx = ip.link_lookup(ifname=host_veth)[0]
        ip.addr("add", index=idx, address=str(a.host_veth_ip), prefixlen=30)
        ip.link("set", index=idx, state="up")
        ip.route("add", dst=str(a.guest_net), gateway=str(a.ns_veth_ip), oif=idx)
    with _inside(ns), IPRoute() as nsr:
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

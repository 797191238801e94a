"""Address slots carved from the pool: one /29 per sandbox.

Slot ``i`` owns ``pool + 8*i .. pool + 8*i + 7``:

- ``+1/30`` host end of the veth pair (root namespace)
- ``+2/30`` namespace end of the veth pair
- ``+5/30`` the tap inside the namespace: the guest's gateway and resolver
- ``+6/30`` the guest

Released slots go to the back of the queue so an address is not handed out
again while conntrack entries or ARP caches may still remember it.
"""

from __future__ import annotations

import collections
import ipaddress
from dataclasses import dataclass

SLOT_SIZE = 8
GUEST_PREFIX = 30


@dataclass(frozen=True)
class SlotAddresses:
    slot: int
    host_veth_ip: ipaddress.IPv4Address
    ns_veth_ip: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address
    guest_ip: ipaddress.IPv4Address
    guest_net: ipaddress.IPv4Network

    @property
    def mac(self) -> str:
        """A stable locally administered MAC for the guest's eth0."""
        b = self.slot.to_bytes(3, "big")
        return "02:6d:72:" + ":".join(f"{x:02x}" for x in b)


def addresses(pool: ipaddress.IPv4Network, slot: int) -> SlotAddresses:
    base = pool.network_address + SLOT_SIZE * slot
    if slot < 0 or base + SLOT_SIZE - 1 > pool.broadcast_address:
        raise ValueError(f"slot {slot} is outside pool {pool}")
    return SlotAddresses(
        slot=slot,
        host_veth_ip=base + 1,
        ns_veth_ip=base + 2,
        gateway=base + 5,
        guest_ip=base + 6,
        guest_net=ipaddress.IPv4Network(f"{base + 4}/{GUEST_PREFIX}"),
    )


class PoolExhausted(RuntimeError):
    """Every address slot of the pool is in use; raise the pool size or kill sandboxes."""


class SlotPool:
    """Hands out slot numbers; not thread-safe (hostd uses it from its event loop)."""

    def __init__(self, pool: ipaddress.IPv4Network) -> None:
        self.pool = pool
        self.size = pool.num_addresses // SLOT_SIZE
        self._never_used = 0
        self._released: collections.deque[int] = collections.deque()
        self._used: set[int] = set()

    def acquire(self) -> int:
        while self._never_used < self.size:
            slot = self._never_used
            self._never_used += 1
            if slot not in self._used:
                self._used.add(slot)
                return slot
        for _ in range(len(self._released)):
            slot = self._released.popleft()
            if slot not in self._used:
                self._used.add(slot)
                return slot
        raise PoolExhausted(f"no free address slot in {self.pool} ({self.size} slots in use)")

    def reserve(self, slot: int) -> None:
        """Marks a slot taken (a sandbox re-attached after a hostd restart)."""
        if not 0 <= slot < self.size:
            raise ValueError(f"slot {slot} is outside pool {self.pool}")
        self._used.add(slot)

    def release(self, slot: int) -> None:
        if slot in self._used:
            self._used.discard(slot)
            self._released.append(slot)

    @property
    def in_use(self) -> frozenset[int]:
        return frozenset(self._used)

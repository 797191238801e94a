"""Sandbox networking: a namespace with veth and tap per sandbox, NAT, egress policy, port proxy.

See docs/network.md for the layout, the rules and their limits.
"""

from .config import NetworkConfig
from .manager import NetworkError, NetworkManager, SandboxNetwork
from .policy import EgressPolicy
from .proxy import PortProxy, ProxyTarget
from .slots import PoolExhausted

__all__ = [
    "EgressPolicy",
    "NetworkConfig",
    "NetworkError",
    "NetworkManager",
    "PoolExhausted",
    "PortProxy",
    "ProxyTarget",
    "SandboxNetwork",
]

"""Where hostd is and how to talk to it: address, TLS, API key, channels.

Resolution order for each setting: the call's keyword argument, then the
environment (`MORU_HOSTD`, `MORU_API_KEY`, `MORU_HOSTD_TLS`, `MORU_HOSTD_CA`),
then the default (the local socket `unix:/run/moru/hostd.sock`, no key).

Channels are cached per event loop and address: a grpc.aio channel belongs to
the loop that made it, and one channel multiplexes every call to a hostd.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

# End of a grpc.aio stream (grpc-stubs does not declare it).
EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]

DEFAULT_HOSTD = "unix:/run/moru/hostd.sock"
SANDBOX_HEADER = "sandbox-id"
TOKEN_HEADER = "x-moru-access-token"
DEFAULT_REQUEST_TIMEOUT = 60.0
# Create boots a VM; under TCG on a loaded machine that took minutes in tests.
CREATE_TIMEOUT = 600.0

# No client keepalive pings: hostd's default policy answers pings every 30 s
# during a minutes-long Create with GOAWAY "too_many_pings" (seen in tests).
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.enable_retries", 1),
]


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ConnectionConfig:
    """How to reach hostd. Build with `ConnectionConfig.resolve(...)`."""

    address: str = DEFAULT_HOSTD
    api_key: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT

    @classmethod
    def resolve(
        cls,
        *,
        hostd: str | None = None,
        api_key: str | None = None,
        tls: bool | None = None,
        request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
    ) -> ConnectionConfig:
        """Keyword arguments first, then the MORU_* environment, then defaults."""
        address = hostd or os.environ.get("MORU_HOSTD") or DEFAULT_HOSTD
        use_tls = _truthy(os.environ.get("MORU_HOSTD_TLS")) if tls is None else tls
        if address.startswith("https://"):
            address, use_tls = address.removeprefix("https://"), True if tls is None else tls
        elif address.startswith("http://"):
            address = address.removeprefix("http://")
        elif address.startswith("/"):
            address = "unix:" + address
        ca = os.environ.get("MORU_HOSTD_CA")
        return cls(
            address=address,
            api_key=api_key if api_key is not None else (os.environ.get("MORU_API_KEY") or None),
            tls=use_tls,
            root_certificates=Path(ca).read_bytes() if ca and use_tls else None,
            request_timeout=request_timeout,
        )

    def with_overrides(
        self, *, hostd: str | None = None, api_key: str | None = None
    ) -> ConnectionConfig:
        """This config with a different address or key (for calls by id)."""
        out = self
        if hostd:
            out = replace(ConnectionConfig.resolve(hostd=hostd), api_key=self.api_key)
        if api_key is not None:
            out = replace(out, api_key=api_key)
        return out

    def metadata(
        self, sandbox_id: str | None = None, access_token: str | None = None
    ) -> tuple[tuple[str, str], ...]:
        """Call metadata: API key, and for guest calls the sandbox and its token."""
        md: list[tuple[str, str]] = []
        if self.api_key:
            md.append(("authorization", f"Bearer {self.api_key}"))
        if sandbox_id:
            md.append((SANDBOX_HEADER, sandbox_id))
        if access_token:
            md.append((TOKEN_HEADER, access_token))
        return tuple(md)


_channels: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, bool, bytes | None], grpc.aio.Channel]
] = weakref.WeakKeyDictionary()


def channel(config: ConnectionConfig) -> grpc.aio.Channel:
    """The running loop's channel to `config.address` (created on first use)."""
    loop = asyncio.get_running_loop()
    per_loop = _channels.setdefault(loop, {})
    key = (config.address, config.tls, config.root_certificates)
    ch = per_loop.get(key)
    if ch is None:
        if config.tls:
            creds = grpc.ssl_channel_credentials(root_certificates=config.root_certificates)
            ch = grpc.aio.secure_channel(config.address, creds, options=CHANNEL_OPTIONS)
        else:
            ch = grpc.aio.insecure_channel(config.address, options=CHANNEL_OPTIONS)
        per_loop[key] = ch
    return ch


async def close_channels() -> None:
    """Closes the running loop's channels (the sync facade's loop at exit)."""
    loop = asyncio.get_running_loop()
    for ch in _channels.pop(loop, {}).values():
        await ch.close(None)

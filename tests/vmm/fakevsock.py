"""A stand-in for vhost-device-vsock's hybrid socket: `CONNECT <port>` then an echo.

Used by the fast relay/dialer tests; the real device is exercised by the VM
tests (tests/vmm/test_qemu.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path


class FakeHybridVsock:
    """Listens on `path`; ports in `ports` answer `OK <n>` and echo, others are refused."""

    def __init__(self, path: Path, ports: set[int], greeting: bytes = b"") -> None:
        self.path = path
        self.ports = ports
        self.greeting = greeting  # sent right after OK, in the same write
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._handle, str(self.path))

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            line = await r.readline()
            parts = line.decode().split()
            if len(parts) != 2 or parts[0] != "CONNECT" or int(parts[1]) not in self.ports:
                return  # the device just closes the connection
            w.write(b"OK 1073741824\n" + self.greeting)
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
            w.write_eof()
        except (ConnectionError, ValueError):
            pass
        finally:
            w.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

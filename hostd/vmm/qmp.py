"""A minimal asyncio QMP client: enough to stop, continue, query and quit a VM.

One short-lived connection per operation keeps hostd free of long-lived
per-VM state that would need reconnecting after a restart; QMP accepts one
client at a time, so operations on one VM are serialised by the caller.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any


class QmpError(RuntimeError):
    """QMP refused a command or the monitor went away; the message says which."""


class QmpClient:
    """One QMP session on a unix socket. Use `async with QmpClient.connect(path)`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}

    @classmethod
    async def connect(cls, path: Path, timeout: float = 5.0) -> QmpClient:  # noqa: ASYNC109
        """Connects, reads the greeting and enters command mode."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
        except (OSError, TimeoutError) as e:
            raise QmpError(f"cannot connect to QMP socket {path}: {e}") from e
        client = cls(reader, writer)
        try:
            async with asyncio.timeout(timeout):
                client.greeting = await client._read()
            if "QMP" not in client.greeting:
                raise QmpError(f"unexpected QMP greeting: {client.greeting}")
            async with asyncio.timeout(timeout):
                await client.execute("qmp_capabilities")
        except (OSError, TimeoutError, ValueError) as e:
            await client.close()
            raise QmpError(f"QMP handshake on {path} failed: {e!r}") from e
        except BaseException:
            await client.close()
            raise
        return client

    async def _read(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise QmpError("QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Runs command and returns its "return" value; events seen meanwhile are queued."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._writer.write(json.dumps(msg).encode() + b"\n")
            await self._writer.drain()
        except OSError as e:
            raise QmpError(f"QMP {command}: {e!r}") from e
        while True:
            try:
                reply = await self._read()
            except (OSError, ValueError) as e:
                raise QmpError(f"QMP {command}: {e!r}") from e
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")
            return reply.get("return")

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass

    async def __aenter__(self) -> QmpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def qmp_command(
    path: Path,
    command: str,
    arguments: dict[str, Any] | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109
) -> Any:
    """Connects, runs one command, disconnects."""
    client = await QmpClient.connect(path, timeout)
    async with client:
        async with asyncio.timeout(timeout):
            return await client.execute(command, arguments)

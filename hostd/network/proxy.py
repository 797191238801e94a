"""The port proxy: ``{port}-{sandbox_id}.{domain}`` -> the guest's ``ip:port``.

One TCP listener on the host serves both kinds of traffic:

- plain HTTP (websocket upgrades included): the first request's Host header
  picks the sandbox and port; the connection is then spliced byte for byte,
  so keep-alive and upgrades just work, and it stays bound to that sandbox.
  When the sandbox has a traffic token (allow_public_traffic false) that first
  request must carry ``x-moru-traffic-token`` or it gets 403.
- TLS: the ClientHello's SNI picks the target and the bytes go through
  untouched (TLS is not terminated). A sandbox that demands a traffic token
  cannot be reached this way, since the header is inside the encryption.

Errors on the HTTP path get a short text body saying what was wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-moru-traffic-token"
MAX_HEAD = 64 * 1024
_ID = r"[A-Za-z0-9_-]{1,64}"


@dataclass(frozen=True)
class ProxyTarget:
    guest_ip: str
    traffic_token: str | None = None


class _Reject(Exception):
    def __init__(self, status: int, reason: str, body: str) -> None:
        super().__init__(body)
        self.status, self.reason, self.body = status, reason, body


def parse_sni(hello: bytes) -> str | None:
    """The server name of a TLS ClientHello record (None when absent or malformed)."""
    try:
        if hello[0] != 0x16 or hello[5] != 0x01:
            return None
        p = 5 + 4 + 2 + 32  # record hdr, handshake hdr, version, random
        p += 1 + hello[p]  # session id
        p += 2 + int.from_bytes(hello[p : p + 2], "big")  # cipher suites
        p += 1 + hello[p]  # compression methods
        end = p + 2 + int.from_bytes(hello[p : p + 2], "big")
        p += 2
        while p + 4 <= end:
            etype = int.from_bytes(hello[p : p + 2], "big")
            elen = int.from_bytes(hello[p + 2 : p + 4], "big")
            p += 4
            if etype == 0:  # server_name: list len(2), type(1), name len(2), name
                nlen = int.from_bytes(hello[p + 3 : p + 5], "big")
                return hello[p + 5 : p + 5 + nlen].decode("ascii")
            p += elen
    except (IndexError, UnicodeDecodeError):
        return None
    return None


class PortProxy:
    """Routes HTTP(S) connections for exposed sandbox ports; runs in hostd's event loop."""

    def __init__(
        self,
        resolve: Callable[[str], ProxyTarget | None],
        listen_host: str = "127.0.0.1",
        listen_port: int = 50070,
        domain: str = "localhost",
        connect_timeout: float = 5.0,
        head_timeout: float = 30.0,
    ) -> None:
        self._resolve = resolve
        self._host = listen_host
        self._port = listen_port
        self.domain = domain.lower().strip(".")
        self._host_re = re.compile(
            rf"^(\d{{1,5}})-({_ID})\.{re.escape(self.domain)}\.?(?::\d{{1,5}})?$", re.IGNORECASE
        )
        self._connect_timeout = connect_timeout
        self._head_timeout = head_timeout
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (useful with listen_port=0)."""
        if self._server is None:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    def host_for(self, port: int, sandbox_id: str) -> str:
        return f"{port}-{sandbox_id}.{self.domain}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_conn, self._host, self._port, reuse_address=True
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _parse_host(self, host: str) -> tuple[int, str]:
        m = self._host_re.match(host.strip())
        if not m:
            raise _Reject(
                400,
                "Bad Request",
                f"host {host!r} is not of the form <port>-<sandbox_id>.{self.domain}\n",
            )
        port = int(m.group(1))
        if not 1 <= port <= 65535:
            raise _Reject(400, "Bad Request", f"port {port} in host {host!r} is out of range\n")
        return port, m.group(2)

    def _target(self, host: str) -> tuple[ProxyTarget, int, str]:
        port, sid = self._parse_host(host)
        target = self._resolve(sid)
        if target is None:
            raise _Reject(404, "Not Found", f"sandbox {sid} not found\n")
        return target, port, sid

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("proxy connection failed")
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self._head_timeout):
                first = await reader.readexactly(1)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            return
        if first == b"\x16":
            await self._serve_tls(first, reader, writer)
            return
        try:
            async with asyncio.timeout(self._head_timeout):
                head = first + await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await self._reply(writer, _Reject(431, "Request Header Fields Too Large", "too big\n"))
            return
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            return
        try:
            headers = _headers(head)
            host = headers.get("host")
            if host is None:
                raise _Reject(400, "Bad Request", "missing Host header\n")
            target, port, sid = self._target(host)
            if target.traffic_token is not None:
                given = headers.get(TOKEN_HEADER, "")
                if not hmac.compare_digest(given.encode(), target.traffic_token.encode()):
                    raise _Reject(
                        403,
                        "Forbidden",
                        f"sandbox {sid} requires a valid {TOKEN_HEADER} header\n",
                    )
            up_r, up_w = await self._connect(target, port, sid)
        except _Reject as rej:
            await self._reply(writer, rej)
            return
        up_w.write(head)
        await _splice(reader, writer, up_r, up_w)

    async def _serve_tls(
        self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            async with asyncio.timeout(self._head_timeout):
                rest = await reader.readexactly(4)
            size = int.from_bytes(rest[2:4], "big")
            async with asyncio.timeout(self._head_timeout):
                body = await reader.readexactly(size)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            return
        hello = first + rest + body
        sni = parse_sni(hello)
        if sni is None:
            return
        try:
            target, port, sid = self._target(sni)
            if target.traffic_token is not None:
                return  # the token header cannot be checked inside TLS
            up_r, up_w = await self._connect(target, port, sid)
        except _Reject:
            return
        up_w.write(hello)
        await _splice(reader, writer, up_r, up_w)

    async def _connect(
        self, target: ProxyTarget, port: int, sid: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self._connect_timeout):
                return await asyncio.open_connection(target.guest_ip, port)
        except (OSError, TimeoutError) as e:
            raise _Reject(
                502,
                "Bad Gateway",
                f"cannot connect to port {port} of sandbox {sid}: {e or 'timed out'}\n",
            ) from e

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, rej: _Reject) -> None:
        body = rej.body.encode()
        writer.write(
            f"HTTP/1.1 {rej.status} {rej.reason}\r\ncontent-type: text/plain\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")
    if len(lines[0].split(" ")) != 3:
        raise _Reject(400, "Bad Request", "malformed request line\n")
    out: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _Reject(400, "Bad Request", f"malformed header line {line[:80]!r}\n")
        out.setdefault(name.strip().lower(), value.strip())
    return out


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(256 * 1024):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        dst.close()


async def _splice(
    cr: asyncio.StreamReader,
    cw: asyncio.StreamWriter,
    ur: asyncio.StreamReader,
    uw: asyncio.StreamWriter,
) -> None:
    try:
        await asyncio.gather(_pump(cr, uw), _pump(ur, cw))
    finally:
        uw.close()
        with contextlib.suppress(Exception):
            await uw.wait_closed()

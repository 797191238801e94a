"""The /metrics, /healthz and /readyz HTTP endpoint, served on hostd's event loop.

Why asyncio-native rather than prometheus_client's start_http_server
thread: the live collector walks the manager's dicts, which only the event
loop mutates. Scraping on the loop gives a consistent snapshot with no
locks and no "dict changed size during iteration"; the server's lifetime is
an async context like every other hostd listener. The cost is that a scrape
runs on the loop: benchmarks/bench_metrics.py measures it (about a
millisecond with 20 sandboxes), well under a guest call's round trip.

A deliberately small HTTP/1.1 server: GET/HEAD, one request per
connection, bounded headers, a read timeout. gzip when the scraper accepts
it; OpenMetrics when asked for it (prometheus_client's choose_encoder).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("hostd.observability")

MAX_HEAD = 16 * 1024
READ_TIMEOUT = 10.0
GZIP_MIN = 1024


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


# Readiness: a list of checks; ready when all pass.
ReadinessProbe = Callable[[], Awaitable[list[Check]]]


def parse_listen(addr: str) -> tuple[str, int]:
    """Parses host:port, [v6]:port or :port (all interfaces) into (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics_listen: {addr!r} is not host:port (e.g. 127.0.0.1:9464)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class MetricsServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: ReadinessProbe,
        on_render: Callable[[float], None] | None = None,
    ) -> None:
        self._registry = registry
        self._readiness = readiness
        self._on_render = on_render
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    @contextlib.asynccontextmanager
    async def serving(self, listen: str) -> AsyncIterator[MetricsServer]:
        host, port = parse_listen(listen)
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        try:
            yield self
        finally:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            if len(head) > MAX_HEAD:
                return
            status, ctype, body, extra = await self._respond(head)
            method = head.split(b" ", 1)[0]
            hdrs = [
                f"HTTP/1.1 {status}",
                f"Content-Type: {ctype}",
                f"Content-Length: {len(body)}",
                "Connection: close",
                *extra,
            ]
            writer.write(("\r\n".join(hdrs) + "\r\n\r\n").encode("latin-1"))
            if method != b"HEAD":
                writer.write(body)
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, head: bytes) -> tuple[str, str, bytes, list[str]]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return "400 Bad Request", "text/plain", b"bad request\n", []
        method, target, _ = parts
        headers = {}
        for ln in lines[1:]:
            k, sep, v = ln.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n", ["Allow: GET, HEAD"]
        path = target.split("?", 1)[0]
        if path == "/metrics":
            encoder, ctype = choose_encoder(headers.get("accept", ""))
            t0 = time.perf_counter()
            body = encoder(self._registry)  # on the loop: this is how long it blocks
            if self._on_render is not None:
                self._on_render(time.perf_counter() - t0)
            extra = []
            if len(body) >= GZIP_MIN and "gzip" in headers.get("accept-encoding", ""):
                body = gzip.compress(body, compresslevel=1)
                extra.append("Content-Encoding: gzip")
            return "200 OK", ctype, body, extra
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n", []
        if path == "/readyz":
            try:
                checks = await self._readiness()
            except Exception as e:
                log.exception("readiness probe failed")
                checks = [Check("probe", False, repr(e))]
            ok = all(c.ok for c in checks)
            body = json.dumps(
                {"ready": ok, "checks": [c.__dict__ for c in checks]}, indent=1
            ).encode()
            return ("200 OK" if ok else "503 Service Unavailable"), "application/json", body, []
        return "404 Not Found", "text/plain", b"not found: try /metrics, /healthz, /readyz\n", []

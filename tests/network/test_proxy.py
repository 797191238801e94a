"""The port proxy: HTTP, websocket and TLS (by SNI) to a stand-in guest's servers."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from hostd.network import PortProxy, ProxyTarget

from .conftest import HELPER, Env, StandIn, spawn_in, stop_proc

TOKEN = "tok-" + os.urandom(8).hex()


class ProxyThread:
    """A PortProxy running on its own event loop thread (tests are synchronous)."""

    def __init__(self, targets: dict[str, ProxyTarget]) -> None:
        self.loop = asyncio.new_event_loop()
        self.proxy = PortProxy(targets.get, "127.0.0.1", 0, "localhost")
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(5)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def guest(env: Env) -> Iterator[tuple[StandIn, StandIn, ProxyThread]]:
    pub = env.sandbox("sbx_pub")
    priv = env.sandbox("sbx_priv")
    servers = [
        spawn_in(s.ns, sys.executable, HELPER, "serve", "guest", s.net.guest_ip)
        for s in (pub, priv)
    ]
    targets = {
        "sbx_pub": ProxyTarget(pub.net.guest_ip, None),
        "sbx_priv": ProxyTarget(priv.net.guest_ip, TOKEN),
    }
    px = ProxyThread(targets)
    try:
        yield pub, priv, px
    finally:
        px.close()
        for p in servers:
            stop_proc(p)


def request(port: int, host: str, path: str = "/", headers: str = "") -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(
            next(
                (
                    x.split(b":")[1]
                    for x in head.split(b"\r\n")
                    if x.lower().startswith(b"content-length")
                ),
                b"0",
            )
        )
        while len(body) < length:
            body += s.recv(4096)
        return int(head.split(b" ")[1]), body.decode()


def test_http_routes_by_host_and_checks_token(
    guest: tuple[StandIn, StandIn, ProxyThread],
) -> None:
    pub, priv, px = guest
    port = px.proxy.port
    status, body = request(port, f"8080-sbx_pub.localhost:{port}", "/hello")
    assert status == 200 and body.startswith(f"guest {pub.net.guest_ip} /hello"), body
    # curl resolves *.localhost to loopback by itself: the URL users type works.
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", f"http://8080-sbx_pub.localhost:{port}/curl"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith(f"guest {pub.net.guest_ip} /curl"), out
    status, body = request(port, f"8080-sbx_priv.localhost:{port}")
    assert status == 403 and "x-moru-traffic-token" in body, body
    status, body = request(
        port, f"8080-sbx_priv.localhost:{port}", headers="x-moru-traffic-token: bad\r\n"
    )
    assert status == 403, body
    status, body = request(
        port, f"8080-sbx_priv.localhost:{port}", "/t", headers=f"X-Moru-Traffic-Token: {TOKEN}\r\n"
    )
    assert status == 200 and body.startswith(f"guest {priv.net.guest_ip} /t"), body


def test_http_errors_are_clear(guest: tuple[StandIn, StandIn, ProxyThread]) -> None:
    _, _, px = guest
    port = px.proxy.port
    status, body = request(port, "8080-sbx_nope.localhost")
    assert status == 404 and "sbx_nope" in body, body
    status, body = request(port, "sbx_pub.localhost")
    assert status == 400 and "<port>-<sandbox_id>.localhost" in body, body
    status, body = request(port, "8080-sbx_pub.example.org")
    assert status == 400, body
    status, body = request(port, "99999-sbx_pub.localhost")
    assert status == 400 and "out of range" in body, body
    status, body = request(port, "9-sbx_pub.localhost")
    assert status == 502 and "port 9 of sandbox sbx_pub" in body, body


def _ws_roundtrip(port: int, host: str, extra: str = "") -> tuple[str, bytes]:
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(1)
            if not chunk:
                break
            head += chunk
        status = head.split(b"\r\n")[0].decode()
        if " 101 " not in status:
            return status, b""
        mask = os.urandom(4)
        msg = b"hello over ws"
        s.sendall(
            bytes([0x81, 0x80 | len(msg)])
            + mask
            + bytes(c ^ mask[i % 4] for i, c in enumerate(msg))
        )
        frame = s.recv(2)
        payload = b""
        while len(payload) < frame[1]:
            payload += s.recv(frame[1] - len(payload))
        return status, payload


def test_websocket_through_proxy(guest: tuple[StandIn, StandIn, ProxyThread]) -> None:
    _, _, px = guest
    port = px.proxy.port
    status, payload = _ws_roundtrip(port, "8081-sbx_pub.localhost")
    assert " 101 " in status and payload == b"echo:hello over ws", (status, payload)
    status, _ = _ws_roundtrip(port, "8081-sbx_priv.localhost")
    assert " 403 " in status, status
    status, payload = _ws_roundtrip(
        port, "8081-sbx_priv.localhost", f"x-moru-traffic-token: {TOKEN}\r\n"
    )
    assert payload == b"echo:hello over ws", (status, payload)


def _client_hello(sni: str) -> bytes:
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def _send_raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def test_tls_passthrough_by_sni(guest: tuple[StandIn, StandIn, ProxyThread]) -> None:
    """The guest's raw echo server on 8443 gets the ClientHello untouched (TLS not terminated)."""
    _, _, px = guest
    hello = _client_hello("8443-sbx_pub.localhost")
    assert _send_raw(px.proxy.port, hello) == hello
    # A sandbox demanding the traffic token cannot be reached through TLS.
    assert _send_raw(px.proxy.port, _client_hello("8443-sbx_priv.localhost")) == b""
    assert _send_raw(px.proxy.port, _client_hello("8443-sbx_nope.localhost")) == b""

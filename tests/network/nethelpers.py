"""Test-side programs run inside test namespaces (via nsenter): servers and probes.

    python nethelpers.py serve ROLE ADDR...   # HTTP :80/:8080, UDP echo :7, TCP sink :5001,
                                              # websocket echo :8081, raw echo :8443
    python nethelpers.py probe JSON           # runs checks, prints JSON results
                                              # (http, dns, udp, icmp, tcp, tcpsend,
                                              # dnsfrom, dnsburst, udpburst)
    python nethelpers.py listen ADDR PORT     # UDP: prints each sender ("from IP:PORT")

Only addresses inside the test's own namespaces are ever contacted.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode()
            hdrs = {
                k.strip().lower(): v.strip()
                for k, _, v in (x.partition(":") for x in head.decode().split("\r\n")[1:] if x)
            }
            path = line.split(" ")[1]
            if path.startswith("/bytes/"):
                body = b"x" * int(path.split("/")[2])
            else:
                body = f"{name} {path} token={hdrs.get('x-moru-traffic-token', '')}\n".encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _http_handler(
    name: str,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _http(r, w, name)

    return handle


async def _ws(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        key = next(
            x.split(":", 1)[1].strip()
            for x in head.split("\r\n")
            if x.lower().startswith("sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        writer.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode()
        )
        while True:
            b0, b1 = await reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", await reader.readexactly(2))[0]
            mask = await reader.readexactly(4) if b1 & 0x80 else b"\0\0\0\0"
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(await reader.readexactly(n)))
            if b0 & 0x0F == 8:
                break
            reply = b"echo:" + data
            writer.write(bytes([0x81, len(reply)]) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, StopIteration):
        pass
    finally:
        writer.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    n = 0
    try:
        while data := await reader.read(1 << 20):
            n += len(data)
        writer.write(str(n).encode())
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.t.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]


async def serve(role: str, addrs: list[str]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for a in addrs:
        name = f"{role} {a}"
        port = 80 if role == "inet" else 8080
        servers.append(await asyncio.start_server(_http_handler(name), a, port))
        servers.append(await asyncio.start_server(_sink, a, 5001))
        servers.append(await asyncio.start_server(_ws, a, 8081))
        servers.append(await asyncio.start_server(_echo, a, 8443))
        await loop.create_datagram_endpoint(_UdpEcho, local_addr=(a, 7))
    print("ready", flush=True)
    await asyncio.Event().wait()


def _dns_packet(name: str, qid: int) -> bytes:
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return q + struct.pack(">HH", 1, 1)


def _dns_from(name: str, server: str, src: str, sport: int) -> str:
    """Sends one query with source src:sport (an address the sender added to itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, sport))
        s.sendto(_dns_packet(name, 7), (server, 53))
    return "sent"


def _burst(kind: str, target: str, count: int, timeout: float) -> int:
    """How many of `count` requests were answered, all sent before any is read.

    kind "dns": queries for allowed.test to the resolver `target`, from one
    socket; kind "udp": pings to the echo server `target`, each from its own
    socket (a new flow each).
    """
    n_socks = count if kind == "udp" else 1
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n_socks)]
    try:
        for i in range(count):
            if kind == "dns":
                socks[0].sendto(_dns_packet("allowed.test", i), (target, 53))
            else:
                socks[i].sendto(b"ping", (target, 7))
        got, deadline = 0, time.monotonic() + timeout
        for s in socks:
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    s.recv(4096)
                except OSError:
                    break
                got += 1
                if kind == "udp":
                    break
        return got
    finally:
        for s in socks:
            s.close()


def _dns_query(name: str, server: str, timeout: float) -> list[str] | str:
    q = _dns_packet(name, os.getpid() & 0xFFFF)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(q, (server, 53))
        resp = s.recv(4096)
    except OSError as e:
        return f"error:{type(e).__name__}"
    finally:
        s.close()
    rcode = resp[3] & 0x0F
    if rcode:
        return f"rcode:{rcode}"
    ancount = struct.unpack(">H", resp[6:8])[0]
    p = len(q)
    out = []
    for _ in range(ancount):
        if resp[p] & 0xC0 == 0xC0:
            p += 2
        else:
            while resp[p]:
                p += resp[p] + 1
            p += 1
        rtype, _cls, _ttl, rdlen = struct.unpack(">HHIH", resp[p : p + 10])
        p += 10
        if rtype == 1:
            out.append(socket.inet_ntoa(resp[p : p + 4]))
        p += rdlen
    return out


def _http_get(ip: str, port: int, timeout: float) -> str:
    try:
        with socket.create_connection((ip, port), timeout=timeout) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {ip}\r\n\r\n".encode())
            data = s.recv(4096).decode(errors="replace")
            return data.split("\r\n\r\n", 1)[1].strip() if "\r\n\r\n" in data else "error:short"
    except OSError as e:
        return f"error:{type(e).__name__}"


def _udp(ip: str, port: int, timeout: float) -> str:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(b"ping", (ip, port))
        return s.recv(100).decode()
    except OSError as e:
        return f"error:{type(e).__name__}"
    finally:
        s.close()


def _icmp(ip: str, timeout: float) -> str:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(timeout)
    ident = os.getpid() & 0xFFFF
    body = struct.pack(">BBHHH", 8, 0, 0, ident, 1) + b"moru"
    csum = 0
    for i in range(0, len(body), 2):
        csum += (body[i] << 8) + body[i + 1]
    csum = (csum >> 16) + (csum & 0xFFFF)
    csum = ~(csum + (csum >> 16)) & 0xFFFF
    pkt = body[:2] + struct.pack(">H", csum) + body[4:]
    try:
        s.sendto(pkt, (ip, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data, addr = s.recvfrom(1024)
            if addr[0] == ip and data[20] == 0:
                return "reply"
        return "error:timeout"
    except OSError as e:
        return f"error:{type(e).__name__}"
    finally:
        s.close()


def _tcp_send(ip: str, port: int, nbytes: int) -> dict[str, float]:
    chunk = b"\0" * (1 << 20)
    t0 = time.perf_counter()
    with socket.create_connection((ip, port), timeout=30) as s:
        left = nbytes
        while left > 0:
            s.sendall(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
        s.shutdown(socket.SHUT_WR)
        got = int(s.recv(100))
    dt = time.perf_counter() - t0
    return {"bytes": got, "seconds": dt}


def probe(checks: list[list[object]]) -> list[object]:
    out: list[object] = []
    for c in checks:
        kind, args = c[0], c[1:]
        t = 1.5
        if kind == "http":
            out.append(_http_get(str(args[0]), int(args[1]), t))  # type: ignore[call-overload]
        elif kind == "dns":
            out.append(_dns_query(str(args[0]), str(args[1]), t))
        elif kind == "udp":
            out.append(_udp(str(args[0]), int(args[1]), t))  # type: ignore[call-overload]
        elif kind == "icmp":
            out.append(_icmp(str(args[0]), t))
        elif kind == "tcp":
            try:
                socket.create_connection((str(args[0]), int(args[1])), timeout=t).close()  # type: ignore[call-overload]
                out.append("connected")
            except OSError as e:
                out.append(f"error:{type(e).__name__}")
        elif kind == "dnsfrom":
            out.append(_dns_from(str(args[0]), str(args[1]), str(args[2]), int(args[3])))  # type: ignore[call-overload]
        elif kind in ("dnsburst", "udpburst"):
            out.append(_burst(kind[:-5], str(args[0]), int(args[1]), 3.0))  # type: ignore[call-overload]
        elif kind == "tcpsend":
            out.append(_tcp_send(str(args[0]), int(args[1]), int(args[2])))  # type: ignore[call-overload]
        else:
            raise SystemExit(f"unknown check {kind}")
    return out


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(serve(sys.argv[2], sys.argv[3:]))
    elif sys.argv[1] == "listen":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((sys.argv[2], int(sys.argv[3])))
        print("ready", flush=True)
        while True:
            _, sender = sock.recvfrom(4096)
            print(f"from {sender[0]}:{sender[1]}", flush=True)
    elif sys.argv[1] == "probe":
        print(json.dumps(probe(json.loads(sys.argv[2]))))

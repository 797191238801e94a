"""The hybrid-vsock dialer and relay against a stand-in device (fast; no VM).

The stand-in (fakevsock.FakeHybridVsock) speaks the device's handshake and
echoes; the real vhost-device-vsock is covered by tests/vmm/test_qemu.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import uvloop
from fakevsock import FakeHybridVsock

from hostd.vsock import VsockError, VsockRelay, dial, wait_ready


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="mt"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run(fn: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await asyncio.wait_for(fn(), 30)

    uvloop.run(main())


def test_dial_keeps_bytes_sent_with_the_ok_line(sockdir: Path) -> None:
    async def main() -> None:
        dev = FakeHybridVsock(sockdir / "v.sock", {50051}, greeting=b"HELLO")
        await dev.start()
        r, w = await dial(sockdir / "v.sock", 50051, 2)
        assert await r.readexactly(5) == b"HELLO"
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        w.close()
        await dev.close()

    run(main)


def test_dial_refused_port_and_missing_socket(sockdir: Path) -> None:
    async def main() -> None:
        dev = FakeHybridVsock(sockdir / "v.sock", {50051})
        await dev.start()
        with pytest.raises(VsockError, match="port 7"):
            await dial(sockdir / "v.sock", 7, 2)
        with pytest.raises(VsockError, match=r"nope\.sock"):
            await dial(sockdir / "nope.sock", 50051, 2)
        await dev.close()

    run(main)


def test_wait_ready_is_bounded_and_stops_when_the_vm_dies(sockdir: Path) -> None:
    async def main() -> None:
        t = time.monotonic()
        with pytest.raises(TimeoutError, match="not ready"):
            await wait_ready(sockdir / "v.sock", 50051, time.monotonic() + 0.3)
        assert time.monotonic() - t < 1.5
        with pytest.raises(VsockError, match="gone"):
            await wait_ready(sockdir / "v.sock", 50051, time.monotonic() + 30, alive=lambda: False)

        # Becomes ready once the device appears.
        dev = FakeHybridVsock(sockdir / "v.sock", {50051})
        starter = asyncio.get_running_loop().call_later(
            0.2, lambda: asyncio.ensure_future(dev.start())
        )
        await wait_ready(sockdir / "v.sock", 50051, time.monotonic() + 5)
        starter.cancel()
        await dev.close()

    run(main)


def test_relay_pumps_both_ways_many_connections(sockdir: Path) -> None:
    async def main() -> None:
        dev = FakeHybridVsock(sockdir / "v.sock", {50051}, greeting=b"G")
        await dev.start()
        relay = VsockRelay(sockdir / "g.sock", sockdir / "v.sock", 50051)
        await relay.start()
        assert relay.target == f"unix:{sockdir / 'g.sock'}"

        async def one(size: int) -> None:
            payload = os.urandom(size)
            r, w = await asyncio.open_unix_connection(str(relay.path))
            assert await r.readexactly(1) == b"G"

            async def send() -> None:
                for i in range(0, size, 1 << 16):
                    w.write(payload[i : i + (1 << 16)])
                    await w.drain()
                w.write_eof()  # half close: the echo must still come back

            async with asyncio.TaskGroup() as tg:
                tg.create_task(send())
                got = await r.readexactly(size)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            assert await r.read() == b""  # the device closed after our EOF
            w.close()

        await asyncio.gather(one(16 << 20), one(1 << 20), one(1))
        await relay.close()
        assert not relay.path.exists()
        await dev.close()

    run(main)


def test_relay_closes_client_when_guest_refuses(sockdir: Path) -> None:
    async def main() -> None:
        dev = FakeHybridVsock(sockdir / "v.sock", set())
        await dev.start()
        relay = VsockRelay(sockdir / "g.sock", sockdir / "v.sock", 50051)
        await relay.start()
        r, w = await asyncio.open_unix_connection(str(relay.path))
        w.write(b"data before the guest side exists")
        assert await r.read() == b""
        assert relay.connections == 0
        w.close()
        await relay.close()
        await dev.close()

    run(main)


def test_relay_close_drops_live_connections(sockdir: Path) -> None:
    async def main() -> None:
        dev = FakeHybridVsock(sockdir / "v.sock", {50051})
        await dev.start()
        relay = VsockRelay(sockdir / "g.sock", sockdir / "v.sock", 50051)
        await relay.start()
        r, w = await asyncio.open_unix_connection(str(relay.path))
        w.write(b"x")
        assert await r.readexactly(1) == b"x"
        assert relay.connections == 1
        await relay.close()
        assert await r.read() == b""
        assert relay.connections == 0
        w.close()
        await dev.close()

    run(main)

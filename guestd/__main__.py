"""`guestd --listen ADDR [--guest]`: the command line (see guestd.server)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from guestd.server import Config, Guestd, parse_listen
from guestd.sigdefaults import catch_inherited_ignores


def _args(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(prog="guestd", description="moru's in-guest agent (gRPC)")
    p.add_argument("--listen", action="append", default=[],
                   help="unix:/PATH, tcp:HOST:PORT or vsock:PORT (repeatable)")
    p.add_argument("--guest", action="store_true",
                   help="run as the guest's agent: Init sets hostname/clock, Shutdown powers off")
    p.add_argument("--output-buffer-bytes", type=int, default=1024 * 1024,
                   help="output kept per process stream for Connect replay (default 1 MiB)")
    p.add_argument("--keepalive-seconds", type=float, default=15.0,
                   help="keepalive event interval on quiet streams (default 15)")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    if not a.listen:
        p.error("--listen is required")
    for addr in a.listen:
        try:
            parse_listen(addr)
        except ValueError as exc:
            p.error(str(exc))
    if a.output_buffer_bytes < 4096:
        p.error("--output-buffer-bytes: at least 4096")
    if a.keepalive_seconds <= 0:
        p.error("--keepalive-seconds: must be > 0")
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return Config(listen=a.listen, guest_mode=a.guest,
                  output_buffer_bytes=a.output_buffer_bytes,
                  keepalive_seconds=a.keepalive_seconds)


async def _serve(cfg: Config) -> None:
    await Guestd(cfg).run()


def main(argv: list[str] | None = None) -> None:
    cfg = _args(argv)
    catch_inherited_ignores()
    try:
        import uvloop
    except ImportError:  # optional in the guest image
        asyncio.run(_serve(cfg))
        return
    uvloop.run(_serve(cfg))


if __name__ == "__main__":
    main()

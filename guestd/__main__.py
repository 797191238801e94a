"""`guestd --listen ADDR [--guest]`: the command line (see guestd.server).

Parsed by hand, not with argparse: in a TCG guest, importing argparse (and
gettext with it) costs about half a second of guest CPU on every boot, for
five options.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import NoReturn

from guestd.server import Config, Guestd, parse_listen
from guestd.sigdefaults import catch_inherited_ignores

USAGE = """\
usage: guestd --listen ADDR [--listen ADDR ...] [--data-listen ADDR] [--guest]
              [--output-buffer-bytes N] [--keepalive-seconds S] [--log-level LEVEL]

moru's in-guest agent (gRPC)

options:
  --listen ADDR            unix:/PATH, tcp:HOST:PORT or vsock:PORT (repeatable)
  --data-listen ADDR       the data listener for Filesystem.OpenRead/OpenWrite
                           (same forms; default: none)
  --guest                  run as the guest's agent: Init sets hostname/clock,
                           Shutdown powers off
  --output-buffer-bytes N  output kept per process stream for Connect replay
                           (default 1 MiB)
  --keepalive-seconds S    keepalive event interval on quiet streams (default 15)
  --log-level LEVEL        DEBUG, INFO (default), WARNING or ERROR
"""
_VALUED = ("--listen", "--data-listen", "--output-buffer-bytes", "--keepalive-seconds",
           "--log-level")


def _error(msg: str) -> NoReturn:
    sys.stderr.write(f"{USAGE.split(chr(10) + chr(10))[0]}\nguestd: error: {msg}\n")
    raise SystemExit(2)


def _number(opt: str, text: str, kind: type[int] | type[float]) -> float:
    try:
        return kind(text)
    except ValueError:
        _error(f"{opt}: invalid {kind.__name__} value: {text!r}")


def _args(argv: list[str] | None) -> Config:
    args = list(sys.argv[1:] if argv is None else argv)
    listen: list[str] = []
    data_listen = ""
    guest = False
    buffer_bytes, keepalive, level = 1024 * 1024, 15.0, "INFO"
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE)
            raise SystemExit(0)
        if arg == "--guest":
            guest = True
            continue
        opt, eq, value = arg.partition("=")
        if opt not in _VALUED:
            _error(f"unrecognized argument: {arg}")
        if not eq:
            if not args:
                _error(f"{opt}: expected one argument")
            value = args.pop(0)
        if opt == "--listen":
            listen.append(value)
        elif opt == "--data-listen":
            data_listen = value
        elif opt == "--output-buffer-bytes":
            buffer_bytes = int(_number(opt, value, int))
        elif opt == "--keepalive-seconds":
            keepalive = _number(opt, value, float)
        else:
            level = value.upper()
    if not listen:
        _error("--listen is required")
    for opt, addr in [*(("--listen", a) for a in listen),
                      *([("--data-listen", data_listen)] if data_listen else [])]:
        try:
            parse_listen(addr)
        except ValueError as exc:
            _error(str(exc).replace("--listen", opt, 1))
    if buffer_bytes < 4096:
        _error("--output-buffer-bytes: at least 4096")
    if keepalive <= 0:
        _error("--keepalive-seconds: must be > 0")
    if not isinstance(logging.getLevelName(level), int):
        _error(f"--log-level: unknown level {level!r}")
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return Config(listen=listen, data_listen=data_listen, guest_mode=guest,
                  output_buffer_bytes=buffer_bytes, keepalive_seconds=keepalive)


async def _serve(cfg: Config) -> None:
    await Guestd(cfg).run()


def main(argv: list[str] | None = None) -> None:
    cfg = _args(argv)
    catch_inherited_ignores()
    if cfg.guest_mode:
        from guestd.limits import protect_self

        protect_self()
    try:
        import uvloop
    except ImportError:  # optional in the guest image
        asyncio.run(_serve(cfg))
        return
    uvloop.run(_serve(cfg))


if __name__ == "__main__":
    main()

"""The `moru` CLI's terminal, logs, volume and template-build commands.

Split from moru/cli.py (tables, create/list/exec/...), which registers these
through `add_commands`.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from moru._cli_output import print_json, size, table
from moru._connection import ConnectionConfig, channel
from moru._errors import NotFoundException, translate
from moru._loop import iterate, run
from moru._models import to_datetime
from moru._volume import Volume
from moru_proto.host.v1 import sandbox_pb2 as pb
from moru_proto.host.v1 import sandbox_pb2_grpc

Out = Callable[[Any], None]
CONSOLE_TAIL = 64 * 1024
ANCHOR = 512  # bytes of the last console window looked for in the next one


def _stub(args: argparse.Namespace) -> tuple[Any, ConnectionConfig]:
    config = ConnectionConfig.resolve(hostd=args.hostd, api_key=args.api_key)
    return sandbox_pb2_grpc.SandboxServiceStub(channel(config)), config


def _console(args: argparse.Namespace) -> bytes:
    async def get() -> bytes:
        stub, config = _stub(args)
        with translate(f"reading the console of {args.sandbox_id}", address=config.address):
            resp = await stub.GetConsoleLog(
                pb.GetConsoleLogRequest(sandbox_id=args.sandbox_id, tail_bytes=CONSOLE_TAIL),
                metadata=config.metadata(),
                timeout=config.request_timeout,
            )
        return bytes(resp.data)

    return run(get())


def _new_part(prev: bytes, cur: bytes) -> bytes:
    """What `cur` (a later tail of the same log) has that `prev` had not."""
    if not prev:
        return cur
    anchor = prev[-ANCHOR:]
    at = cur.rfind(anchor)
    return cur[at + len(anchor) :] if at >= 0 else cur


def _event_line(ev: pb.SandboxEvent) -> str:
    kind = pb.EventType.Name(ev.type).removeprefix("EVENT_TYPE_").lower()
    reason = pb.EventReason.Name(ev.reason).removeprefix("EVENT_REASON_").lower()
    when = f"{to_datetime(ev.time):%H:%M:%S}"
    msg = f": {ev.message}" if ev.message else ""
    return f"[moru {when}] sandbox {kind} ({reason}){msg}\n"


def cmd_logs(args: argparse.Namespace, progress: Any) -> int:
    """The guest's console (kernel, init, guestd); with -f, follows it and
    prints lifecycle events until the sandbox ends."""
    out = sys.stdout.buffer
    ended = threading.Event()

    def events() -> None:
        async def stream() -> Any:
            stub, config = _stub(args)
            call = stub.WatchEvents(
                pb.WatchEventsRequest(sandbox_id=args.sandbox_id), metadata=config.metadata()
            )
            async for ev in call:
                yield ev

        with contextlib.suppress(Exception):
            for ev in iterate(stream()):
                sys.stdout.write(_event_line(ev))
                sys.stdout.flush()
                if ev.type in (pb.EVENT_TYPE_KILLED, pb.EVENT_TYPE_PAUSED):
                    break
        ended.set()

    if args.follow:  # subscribed first, so no event between the two is missed
        threading.Thread(target=events, name="moru-logs-events", daemon=True).start()
    seen = _console(args)
    out.write(seen)
    out.flush()
    while args.follow and not ended.wait(1.0):
        try:
            cur = _console(args)
        except NotFoundException:
            ended.wait(5.0)  # gone: let the event stream print why
            break
        new = _new_part(seen, cur)
        if new:
            out.write(new)
            out.flush()
        seen = cur
    return 0


def cmd_connect(args: argparse.Namespace, progress: Any) -> int:
    from moru._cli_terminal import connect

    return connect(args.sandbox_id, args.hostd, args.api_key)


def _conn(args: argparse.Namespace) -> dict[str, Any]:
    return {"hostd": args.hostd, "api_key": args.api_key}


def _volume_rows(vols: list[Any]) -> list[tuple[Any, ...]]:
    return [
        (
            v.volume_id,
            v.name,
            f"{v.size_mb} MB",
            size(v.used_bytes),
            v.attached_to or "-",
            f"{v.created_at:%Y-%m-%d %H:%M}",
        )
        for v in vols
    ]


def _print_volumes(args: argparse.Namespace, vols: list[Any]) -> None:
    if args.json:
        print_json(vols)
    else:
        print(
            table(
                ["VOLUME ID", "NAME", "SIZE", "USED", "ATTACHED TO", "CREATED"], _volume_rows(vols)
            )
        )


def cmd_volume_create(args: argparse.Namespace, progress: Any) -> int:
    vol = Volume.create(args.name, args.size_mb, **_conn(args))
    if args.json:
        _print_volumes(args, [vol])
    else:
        print(vol.volume_id)
    return 0


def cmd_volume_list(args: argparse.Namespace, progress: Any) -> int:
    _print_volumes(args, Volume.list(**_conn(args)))
    return 0


def cmd_volume_info(args: argparse.Namespace, progress: Any) -> int:
    _print_volumes(args, [Volume.get(args.volume_id, **_conn(args))])
    return 0


def cmd_volume_delete(args: argparse.Namespace, progress: Any) -> int:
    ok = True
    for vid in args.volume_ids:
        deleted = Volume.delete(vid, **_conn(args))
        ok = ok and deleted
        print(f"{vid}: {'deleted' if deleted else 'not found'}")
    return 0 if ok else 1


def cmd_template_build(args: argparse.Namespace, progress: Any) -> int:
    """Builds on this node with moru-images (a cache hit when nothing changed);
    its stage lines become the progress line on a terminal."""
    cmd = [
        sys.executable,
        "-c",
        "import sys; from images.cli import main; sys.exit(main())",
        "build",
        *args.recipes,
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []

    def follow() -> int:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if progress.enabled:
                progress.update(f"building: {line.strip()[:100]}")
            else:
                sys.stderr.write(line)
        return proc.wait()

    code: int = progress.run(f"building {' '.join(args.recipes)}", follow)
    if code != 0:
        if progress.enabled:
            sys.stderr.write("".join(lines[-30:]))
        print(f"moru: template build failed (exit {code})", file=sys.stderr)
        return code
    done = [line.strip() for line in lines if re.match(r"\S+: (built|cached) in ", line)]
    for line in done or [f"built in {time.monotonic() - t0:.1f}s"]:
        print(line.removeprefix("[moru-images] "))
    return 0


def add_commands(
    common: argparse.ArgumentParser,
    sub: Any,
    sandbox: Any,
    template: Any,
) -> None:
    """Registers these commands on the `moru` parser's groups."""
    c = sandbox.add_parser("connect", parents=[common], help="interactive shell in the sandbox")
    c.add_argument("sandbox_id")
    c.set_defaults(fn=cmd_connect)

    lg = sandbox.add_parser("logs", parents=[common], help="the guest console; -f follows it")
    lg.add_argument("sandbox_id")
    lg.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="keep printing, with lifecycle events, until the sandbox ends",
    )
    lg.set_defaults(fn=cmd_logs)

    tb = template.add_parser("build", parents=[common], help="build templates on this node")
    tb.add_argument(
        "recipes", nargs="+", metavar="RECIPE", help="template name or recipe .toml path"
    )
    tb.set_defaults(fn=cmd_template_build)

    vp = sub.add_parser("volume", help="persistent volumes")
    vs = vp.add_subparsers(dest="action", required=True)
    vc = vs.add_parser("create", parents=[common], help="a new volume; prints its id")
    vc.add_argument("name")
    vc.add_argument("--size-mb", type=int, default=1024)
    vc.set_defaults(fn=cmd_volume_create)
    vs.add_parser("list", parents=[common], help="volumes on the node").set_defaults(
        fn=cmd_volume_list
    )
    vi = vs.add_parser("info", parents=[common], help="one volume")
    vi.add_argument("volume_id")
    vi.set_defaults(fn=cmd_volume_info)
    vd = vs.add_parser("delete", parents=[common], help="delete volumes and their data")
    vd.add_argument("volume_ids", nargs="+", metavar="volume_id")
    vd.set_defaults(fn=cmd_volume_delete)

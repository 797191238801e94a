"""`moru`: sandboxes from the shell, through the same SDK users call.

    moru sandbox create|list|info|kill|exec|connect|logs|metrics|timeout|pause|resume|
                 upload|download
    moru template list|build
    moru volume create|list|info|delete

Readable tables by default, `--json` everywhere. Progress (on stderr, only on
a terminal unless --progress) for the slow parts: create, resume, transfers.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TypeVar

from moru._cli_more import add_commands
from moru._cli_output import CountingReader as _CountingReader
from moru._cli_output import Progress, table
from moru._cli_output import ago as _ago
from moru._cli_output import left as _left
from moru._cli_output import print_json as _print_json
from moru._cli_output import size as _size
from moru._errors import CommandExitException, SandboxException, TimeoutException
from moru._models import SandboxInfo
from moru._sandbox import Sandbox

T = TypeVar("T")


def _meta(m: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(m.items())) or "-"


def _info_rows(info: SandboxInfo) -> list[tuple[str, Any]]:
    return [
        ("sandbox_id", info.sandbox_id),
        ("template", info.template_id),
        ("state", info.state),
        ("started", f"{info.started_at:%Y-%m-%d %H:%M:%S %Z} ({_ago(info.started_at)})"),
        ("ends", f"{info.end_at:%Y-%m-%d %H:%M:%S %Z} ({_left(info.end_at)} left)"),
        ("cpus", info.cpu_count),
        ("memory", f"{info.memory_mb} MB"),
        ("disk", f"{info.disk_mb} MB"),
        ("internet", "allowed" if info.allow_internet_access else "blocked"),
        ("guest_ip", info.guest_ip or "-"),
        ("secure", "yes" if info.secure else "no"),
        ("metadata", _meta(info.metadata)),
    ]


# -- commands -------------------------------------------------------------------


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"moru: {flag} {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def _conn(args: argparse.Namespace) -> dict[str, Any]:
    return {"hostd": args.hostd, "api_key": args.api_key}


def cmd_create(args: argparse.Namespace, progress: Progress) -> int:
    network: dict[str, Any] | None = None
    if args.allow_out or args.deny_out:
        network = {"allow_out": args.allow_out or [], "deny_out": args.deny_out or []}
    sbx = progress.run(
        f"creating a sandbox from {args.template!r}",
        lambda: Sandbox.create(
            args.template,
            timeout=args.timeout,
            metadata=_pairs(args.metadata, "--metadata"),
            envs=_pairs(args.env, "--env"),
            allow_internet_access=not args.no_internet,
            network=network,
            secure=not args.insecure,
            **_conn(args),
        ),
    )
    info = sbx.get_info()
    if args.json:
        _print_json(info)
    else:
        print(info.sandbox_id)
    return 0


def cmd_list(args: argparse.Namespace, progress: Progress) -> int:
    infos = list(
        Sandbox.list(
            metadata=_pairs(args.metadata, "--metadata") or None,
            state=args.state or None,
            **_conn(args),
        )
    )
    if args.json:
        _print_json(infos)
        return 0
    rows = [
        (
            i.sandbox_id,
            i.template_id,
            i.state,
            _ago(i.started_at),
            _left(i.end_at),
            i.cpu_count,
            f"{i.memory_mb} MB",
            _meta(i.metadata),
        )
        for i in infos
    ]
    print(
        table(
            ["SANDBOX ID", "TEMPLATE", "STATE", "STARTED", "LEFT", "CPUS", "MEMORY", "METADATA"],
            rows,
        )
    )
    return 0


def cmd_info(args: argparse.Namespace, progress: Progress) -> int:
    info = Sandbox.get_info(args.sandbox_id, **_conn(args))
    if args.json:
        _print_json(info)
    else:
        print(table(["FIELD", "VALUE"], _info_rows(info)))
    return 0


def cmd_kill(args: argparse.Namespace, progress: Progress) -> int:
    if args.all == bool(args.sandbox_ids):
        raise SystemExit("moru: sandbox kill: give sandbox ids or --all (not both)")
    ids = args.sandbox_ids
    if args.all:
        meta = _pairs(args.metadata, "--metadata") or None
        ids = [i.sandbox_id for i in Sandbox.list(metadata=meta, **_conn(args))]
    results = {sid: Sandbox.kill(sid, **_conn(args)) for sid in ids}
    if args.json:
        _print_json([{"sandbox_id": k, "killed": v} for k, v in results.items()])
    else:
        for sid, killed in results.items():
            print(f"{sid}: {'killed' if killed else 'not found'}")
    return 0 if all(results.values()) else 1


def cmd_exec(args: argparse.Namespace, progress: Progress) -> int:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise SystemExit("moru: sandbox exec: give a command, e.g. `moru sandbox exec ID -- ls /`")
    cmd = argv[0] if len(argv) == 1 else " ".join(_quote(a) for a in argv)
    sbx = Sandbox.connect(args.sandbox_id, **_conn(args))
    if args.background:
        return _exec_background(sbx, cmd, args)

    def out(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    def err(s: str) -> None:
        sys.stderr.write(s)
        sys.stderr.flush()

    stream = not args.json
    try:
        r = sbx.commands.run(
            cmd,
            envs=_pairs(args.env, "--env") or None,
            cwd=args.cwd,
            user=args.user,
            timeout=args.timeout,
            on_stdout=out if stream else None,
            on_stderr=err if stream else None,
        )
        code, result = 0, r
    except CommandExitException as e:
        code, result = (e.exit_code if e.exit_code >= 0 else 128 + 9), e.result
    if args.json:
        _print_json(result)
    return code


def _exec_background(sbx: Sandbox, cmd: str, args: argparse.Namespace) -> int:
    """Starts the command and leaves it running; prints its pid."""
    handle = sbx.commands.run(
        cmd,
        envs=_pairs(args.env, "--env") or None,
        cwd=args.cwd,
        user=args.user,
        background=True,
        timeout=args.timeout,
    )
    pid = handle.pid
    handle.disconnect()
    if args.json:
        _print_json({"sandbox_id": sbx.sandbox_id, "pid": pid})
    else:
        print(pid)
    return 0


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


def cmd_metrics(args: argparse.Namespace, progress: Progress) -> int:
    samples = Sandbox.get_metrics(args.sandbox_id, **_conn(args))
    if args.last:
        samples = samples[-args.last :]
    if args.json:
        _print_json(samples)
        return 0
    rows = [
        (
            f"{m.timestamp:%H:%M:%S}",
            f"{m.cpu_used_pct:.1f}%",
            f"{_size(m.mem_used)} / {_size(m.mem_total)}",
            f"{_size(m.disk_used)} / {_size(m.disk_total)}",
        )
        for m in samples
    ]
    print(table(["TIME", "CPU", "MEMORY", "DISK"], rows))
    return 0


def cmd_timeout(args: argparse.Namespace, progress: Progress) -> int:
    Sandbox.set_timeout(args.sandbox_id, args.seconds, **_conn(args))
    info = Sandbox.get_info(args.sandbox_id, **_conn(args))
    if args.json:
        _print_json(info)
    else:
        print(f"{info.sandbox_id}: ends {info.end_at:%Y-%m-%d %H:%M:%S %Z} ({_left(info.end_at)})")
    return 0


def cmd_pause(args: argparse.Namespace, progress: Progress) -> int:
    progress.run(
        f"pausing {args.sandbox_id}", lambda: Sandbox.beta_pause(args.sandbox_id, **_conn(args))
    )
    info = Sandbox.get_info(args.sandbox_id, **_conn(args))
    if args.json:
        _print_json(info)
    else:
        print(f"{info.sandbox_id}: {info.state}")
    return 0


def cmd_resume(args: argparse.Namespace, progress: Progress) -> int:
    sbx = progress.run(
        f"resuming {args.sandbox_id}",
        lambda: Sandbox.connect(args.sandbox_id, args.timeout, **_conn(args)),
    )
    info = sbx.get_info()
    if args.json:
        _print_json(info)
    else:
        print(f"{info.sandbox_id}: {info.state}")
    return 0


def cmd_upload(args: argparse.Namespace, progress: Progress) -> int:
    sbx = Sandbox.connect(args.sandbox_id, **_conn(args))
    total = os.path.getsize(args.local)
    with open(args.local, "rb") as f:
        reader = _CountingReader(f, total, progress, f"uploading {args.local}")
        entry = progress.run(
            f"uploading {args.local}",
            lambda: sbx.files.write(args.remote, reader),  # type: ignore[arg-type]
        )
    if args.json:
        _print_json(entry)
    else:
        print(f"{entry.path}: {_size(entry.size)}")
    return 0


def cmd_download(args: argparse.Namespace, progress: Progress) -> int:
    sbx = Sandbox.connect(args.sandbox_id, **_conn(args))
    total = sbx.files.get_info(args.remote).size

    def fetch() -> int:
        done = 0
        tmp = args.local + ".part"
        with open(tmp, "wb") as f:
            for piece in sbx.files.read(args.remote, format="stream"):
                f.write(piece)
                done += len(piece)
                progress.update(f"downloading {args.remote} {_size(done)}/{_size(total)}")
        os.replace(tmp, args.local)
        return done

    n = progress.run(f"downloading {args.remote}", fetch)
    if args.json:
        _print_json({"path": args.local, "size": n})
    else:
        print(f"{args.local}: {_size(n)}")
    return 0


def cmd_template_list(args: argparse.Namespace, progress: Progress) -> int:
    tpls = Sandbox.list_templates(**_conn(args))
    if args.json:
        _print_json(tpls)
        return 0
    rows = [
        (
            t.template_id,
            t.vcpus,
            f"{t.memory_mb} MB",
            f"{t.disk_mb} MB",
            _size(t.rootfs_bytes),
            t.kernel_version,
            f"{t.built_at:%Y-%m-%d %H:%M}",
            t.content_hash[:12],
        )
        for t in tpls
    ]
    print(table(["TEMPLATE", "CPUS", "MEMORY", "DISK", "ROOTFS", "KERNEL", "BUILT", "HASH"], rows))
    return 0


# -- parser ---------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument(
        "--hostd", help="hostd address (default: $MORU_HOSTD or unix:/run/moru/hostd.sock)"
    )
    common.add_argument("--api-key", help="hostd API key (default: $MORU_API_KEY)")
    common.add_argument(
        "--progress", action="store_true", help="show progress even when stderr is not a terminal"
    )

    p = argparse.ArgumentParser(prog="moru", description="moru sandboxes from the shell.")
    sub = p.add_subparsers(dest="group", required=True)
    sb = sub.add_parser("sandbox", help="create, inspect and control sandboxes")
    ss = sb.add_subparsers(dest="action", required=True)

    c = ss.add_parser("create", parents=[common], help="boot a sandbox; prints its id")
    c.add_argument("template", nargs="?", default="base")
    c.add_argument("--timeout", type=int, default=300, help="seconds until it is killed")
    c.add_argument("--metadata", "-m", action="append", metavar="KEY=VALUE")
    c.add_argument("--env", "-e", action="append", metavar="KEY=VALUE")
    c.add_argument("--no-internet", action="store_true", help="block outbound traffic")
    c.add_argument("--allow-out", action="append", metavar="DEST")
    c.add_argument("--deny-out", action="append", metavar="DEST")
    c.add_argument("--insecure", action="store_true", help="no access token for guest calls")
    c.set_defaults(fn=cmd_create)

    ls = ss.add_parser("list", parents=[common], help="running, paused and error sandboxes")
    ls.add_argument("--metadata", "-m", action="append", metavar="KEY=VALUE")
    ls.add_argument("--state", action="append", choices=["running", "paused", "error"])
    ls.set_defaults(fn=cmd_list)

    i = ss.add_parser("info", parents=[common], help="one sandbox in detail")
    i.add_argument("sandbox_id")
    i.set_defaults(fn=cmd_info)

    k = ss.add_parser("kill", parents=[common], help="kill sandboxes")
    k.add_argument("sandbox_ids", nargs="*", metavar="sandbox_id")
    k.add_argument("--all", action="store_true", help="every running, paused and error sandbox")
    k.add_argument(
        "--metadata",
        "-m",
        action="append",
        metavar="KEY=VALUE",
        help="with --all: only those whose metadata holds every pair",
    )
    k.set_defaults(fn=cmd_kill)

    e = ss.add_parser("exec", parents=[common], help="run a command; exits with its exit code")
    e.add_argument("sandbox_id")
    e.add_argument("--cwd")
    e.add_argument("--user")
    e.add_argument("--env", "-e", action="append", metavar="KEY=VALUE")
    e.add_argument("--timeout", type=float, default=0, help="the command's own timeout (0: none)")
    e.add_argument(
        "--background",
        "-b",
        action="store_true",
        help="start it, print its pid and leave it running",
    )
    e.add_argument("command", nargs=argparse.REMAINDER)
    e.set_defaults(fn=cmd_exec)

    m = ss.add_parser("metrics", parents=[common], help="resource samples")
    m.add_argument("sandbox_id")
    m.add_argument("--last", type=int, default=0, help="only the last N samples")
    m.set_defaults(fn=cmd_metrics)

    t = ss.add_parser("timeout", parents=[common], help="kill it SECONDS from now")
    t.add_argument("sandbox_id")
    t.add_argument("seconds", type=int)
    t.set_defaults(fn=cmd_timeout)

    pa = ss.add_parser("pause", parents=[common], help="pause (filesystem kept)")
    pa.add_argument("sandbox_id")
    pa.set_defaults(fn=cmd_pause)

    r = ss.add_parser("resume", parents=[common], help="resume a paused sandbox")
    r.add_argument("sandbox_id")
    r.add_argument("--timeout", type=int, default=None, help="new timeout in seconds")
    r.set_defaults(fn=cmd_resume)

    up = ss.add_parser("upload", parents=[common], help="copy a local file in")
    up.add_argument("sandbox_id")
    up.add_argument("local")
    up.add_argument("remote")
    up.set_defaults(fn=cmd_upload)

    dn = ss.add_parser("download", parents=[common], help="copy a file out")
    dn.add_argument("sandbox_id")
    dn.add_argument("remote")
    dn.add_argument("local")
    dn.set_defaults(fn=cmd_download)

    tp = sub.add_parser("template", help="templates built on the node")
    ts = tp.add_subparsers(dest="action", required=True)
    tl = ts.add_parser("list", parents=[common], help="one line per template")
    tl.set_defaults(fn=cmd_template_list)
    add_commands(common, sub, ss, ts)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    progress = Progress(enabled=(sys.stderr.isatty() or args.progress) and not args.json)
    try:
        code: int = args.fn(args, progress)
        return code
    except TimeoutException as e:
        print(f"moru: timeout: {e}", file=sys.stderr)
        return 124
    except SandboxException as e:
        print(f"moru: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`moru-hostd`: run the node daemon, check the machine, look at templates."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hostd.config import ConfigError, load


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moru-hostd",
        description="moru node daemon: boots microVM sandboxes and serves the host API over gRPC.",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="TOML config file (default: /etc/moru/hostd.toml if present); MORU_* env overrides it",
    )
    p.add_argument(
        "-o",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. -o max_sandboxes=8 -o network.enabled=false",
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon (foreground; notifies systemd when ready)")
    s.add_argument("--listen", help="gRPC unix socket, e.g. unix:/run/moru/hostd.sock")
    s.add_argument("--state-dir", help="store and per-sandbox run dirs (default /var/lib/moru)")
    s.add_argument("--images-dir", help="built templates (default /var/lib/moru/images)")
    s.add_argument("--api-key", help="require `authorization: Bearer KEY` on every call")
    s.add_argument("--no-network", action="store_true", help="sandboxes without networking")
    sub.add_parser(
        "doctor", help="check KVM/TCG, qemu, vhost-device-vsock, cgroups, nftables, images"
    )
    sub.add_parser("config", help="print the effective configuration as JSON")
    t = sub.add_parser("template", help="templates built on this node")
    tsub = t.add_subparsers(dest="template_command", required=True)
    tsub.add_parser("list", help="one line per template")
    show = tsub.add_parser("show", help="a template's manifest as JSON")
    show.add_argument("name")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"-o {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    for flag, key in (
        ("listen", "listen"),
        ("state_dir", "state_dir"),
        ("images_dir", "images_dir"),
        ("api_key", "api_key"),
    ):
        val = getattr(args, flag, None)
        if val:
            out[key] = val
    if getattr(args, "no_network", False):
        out["network.enabled"] = "false"
    return out


def main(argv: list[str] | None = None) -> int:
    # Before grpc loads: its fork handlers crash children that run Python
    # between fork and exec (the VMM driver's cgroup-joining pre-exec hook).
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    args = _parser().parse_args(argv)
    try:
        config = load(args.config, _overrides(args))
    except ConfigError as e:
        print(f"moru-hostd: config: {e}", file=sys.stderr)
        return 2
    from hostd.observability import install_logging

    install_logging(config.log_level, config.log_json)
    if args.command == "serve":
        from hostd.sdnotify import notify
        from hostd.server import run

        def ready() -> None:
            notify("READY=1")

        run(config, ready=ready)
        return 0
    if args.command == "doctor":
        from hostd.doctor import report, run_checks

        text, ok = report(run_checks(config))
        print(text)
        return 0 if ok else 1
    if args.command == "config":
        print(json.dumps(asdict(config), indent=2))
        return 0
    from images.manifest import TemplateNotFound, list_manifests, load_manifest

    if args.template_command == "list":
        for m in list_manifests(config.images_path):
            d = m.defaults
            print(
                f"{m.name:<16} {m.content_hash[:12]}  vcpus={d.vcpus} memory={d.memory_mb}MB"
                f" disk={d.disk_mb}MB  kernel {m.kernel_version}"
            )
        return 0
    try:
        print(load_manifest(args.name, config.images_path).to_json())
    except TemplateNotFound as e:
        print(f"moru-hostd: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`moru-images`: build, list and show guest templates.

  moru-images build NAME|RECIPE.toml ... [--force]
  moru-images list
  moru-images show NAME
All take --images-dir (default $MORU_IMAGES_DIR or /var/lib/moru/images).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from images.build import Builder
from images.errors import BuildError
from images.manifest import TemplateNotFound, images_dir, list_manifests, load_manifest
from images.recipe import known_templates


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moru-images", description="Build moru guest images.")
    p.add_argument(
        "--images-dir",
        type=Path,
        default=None,
        help="image cache (default: $MORU_IMAGES_DIR or /var/lib/moru/images)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build templates (a cache hit when nothing changed)")
    b.add_argument("names", nargs="+", metavar="NAME", help="template name or recipe .toml path")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.add_argument(
        "--update-kernel",
        action="store_true",
        help="ask apt for the newest linux-image-cloud-amd64 instead of the cached one",
    )
    b.add_argument(
        "--recipes-dir",
        type=Path,
        action="append",
        default=[],
        help="extra directory of recipes, searched before the built-in ones",
    )
    sub.add_parser("list", help="list built templates and known recipes")
    s = sub.add_parser("show", help="print a built template's manifest as JSON")
    s.add_argument("name")
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root: Path = (args.images_dir or images_dir()).resolve()
    try:
        if args.cmd == "build":
            dirs = tuple(d.resolve() for d in args.recipes_dir)
            builder = Builder(root, dirs, update_kernel=args.update_kernel)
            for name in args.names:
                r = builder.build(name, force=args.force)
                m = r.manifest
                state = "cached" if r.cache_hit else "built"
                print(f"{m.name}: {state} in {r.seconds:.1f}s  hash {m.content_hash[:16]}  "
                      f"kernel {m.kernel_version}  rootfs {m.rootfs}")  # fmt: skip
        elif args.cmd == "list":
            built = {m.name: m for m in list_manifests(root)}
            for name in sorted(set(built) | set(known_templates())):
                if name not in built:
                    print(f"{name:<16} (not built)")
                else:
                    m = built[name]
                    used = Path(m.rootfs).stat().st_blocks * 512 if Path(m.rootfs).exists() else 0
                    print(f"{name:<16} {m.content_hash[:16]}  {m.kernel_version}  "
                          f"disk {m.rootfs_bytes >> 20} MiB ({used >> 20} MiB used)  "
                          f"vcpus {m.defaults.vcpus} mem {m.defaults.memory_mb} MiB")  # fmt: skip
        elif args.cmd == "show":
            print(json.dumps(asdict(load_manifest(args.name, root)), indent=2, sort_keys=True))
    except (BuildError, TemplateNotFound) as e:
        print(f"moru-images: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The JS SDK's added cost per call and stream throughput, next to the Python SDK's.

    /opt/moru/venv/bin/python benchmarks/bench_sdk_js.py [--runs N] [--mb M]

Needs the JS SDK built (`npm run build` in js/). Uses the hostd at $MORU_HOSTD
(with $MORU_API_KEY) when set; otherwise starts a private one and stops it
afterwards. One sandbox serves every measurement, in the same run:
  * the Python SDK vs raw Python gRPC (benchmarks/bench_sdk.py's figures);
  * the JS SDK vs raw generated grpc-js calls of the same requests
    (js/bench/bench-sdk.mjs): commands.run('true') ratio <= 1.2, file
    upload/download throughput ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from bench_sdk import bench, sandbox_on_hostd

REPO = Path(__file__).resolve().parents[1]
JS = REPO / "js"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="file transfers per side")
    ap.add_argument("--template", default="base")
    args = ap.parse_args()
    if not (JS / "dist" / "esm" / "index.js").is_file():
        print("build the JS SDK first: (cd js && npm run build)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with sandbox_on_hostd(args.template) as (sbx, address, key):
        print("-- Python SDK")
        ok = bench(sbx, address, key, args)
        print("-- JS SDK (same sandbox)", flush=True)
        env = {**os.environ, "MORU_HOSTD": address, "MORU_API_KEY": key}
        js = subprocess.run(
            ["node", "bench/bench-sdk.mjs", sbx.sandbox_id, str(args.runs), str(args.mb),
             str(args.rounds)],
            cwd=JS,
            env=env,
        )
        ok = ok and js.returncode == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

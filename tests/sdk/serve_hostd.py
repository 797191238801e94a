"""A real hostd for a test run outside pytest (the JS SDK's suite), cleaned up after.

Starts a hostd with networking (own socket, state dir, cgroup root, netns
names, proxy port; shared image cache) exactly as the Python SDK tests do,
plus a TCP listener with TLS on 127.0.0.1 (a throwaway CA and server
certificate made for this run). Prints one JSON line {"hostd": "unix:...",
"api_key": ..., "tls_hostd": "127.0.0.1:PORT", "tls_ca": path, "tls_other_ca":
path} on stdout, then serves until stdin closes or SIGTERM arrives, and
removes everything it made.
Exits non-zero when something was left behind.

    python tests/sdk/serve_hostd.py    # with the worktree first on PYTHONPATH
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hostd"))

from hostd_fixture import API_KEY, _close, _free_port, _start
from throwaway_tls import make_tls_files


def main() -> int:
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    certs = Path(tempfile.mkdtemp(dir="/tmp", prefix="moru-js-tls"))
    try:
        serve(stop, certs)
    finally:
        shutil.rmtree(certs, ignore_errors=True)
    return 0


def serve(stop: threading.Event, certs: Path) -> None:
    tls = make_tls_files(certs)
    tcp = f"127.0.0.1:{_free_port()}"
    h = _start(network=True, tcp_listen=tcp, tls_cert=str(tls.cert), tls_key=str(tls.key))
    try:
        found = {
            "hostd": f"unix:{h.sock}",
            "api_key": API_KEY,
            "tls_hostd": tcp,
            "tls_ca": str(tls.ca),
            "tls_other_ca": str(tls.other_ca),
        }
        print(json.dumps(found), flush=True)

        def until_stdin_closes() -> None:
            sys.stdin.read()
            stop.set()

        threading.Thread(target=until_stdin_closes, daemon=True).start()
        stop.wait()
    finally:
        _close(h, "js-hostd")


if __name__ == "__main__":
    sys.exit(main())

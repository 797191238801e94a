"""A real hostd for a test run outside pytest (the JS SDK's suite), cleaned up after.

Starts a hostd with networking (own socket, state dir, cgroup root, netns
names, proxy port; shared image cache) exactly as the Python SDK tests do,
prints one JSON line {"hostd": "unix:...", "api_key": ...} on stdout, then
serves until stdin closes or SIGTERM arrives, and removes everything it made.
Exits non-zero when something was left behind.

    python tests/sdk/serve_hostd.py    # with the worktree first on PYTHONPATH
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hostd"))

from hostd_fixture import API_KEY, _close, _start


def main() -> int:
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    h = _start(network=True)
    try:
        print(json.dumps({"hostd": f"unix:{h.sock}", "api_key": API_KEY}), flush=True)

        def until_stdin_closes() -> None:
            sys.stdin.read()
            stop.set()

        threading.Thread(target=until_stdin_closes, daemon=True).start()
        stop.wait()
    finally:
        _close(h, "js-hostd")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real hostd (tests/hostd/hostd_framework.Hostd) with /metrics on a loopback port and JSON logs.

hostd/server.py wires hostd.observability in (interceptor, obs.serve) and
hostd/cli.py calls install_logging, so this is plain `moru-hostd serve`.
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "hostd"))

import grpc  # noqa: E402
import hostd_framework as hf  # noqa: E402

from .promtext import metrics, scrape  # noqa: E402

pb = hf.pb
wait_for = hf.wait_for
our_pids = hf.our_pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ObsHostd(hf.Hostd):  # type: ignore[misc]
    def __init__(self, **config: Any) -> None:
        port = free_port()
        super().__init__(metrics_listen=f"127.0.0.1:{port}", log_json=True, **config)
        self.metrics_url = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 60.0) -> float:
        t = super().start(timeout)

        def up() -> bool:
            try:
                return scrape(f"{self.metrics_url}/healthz")[0] == 200
            except OSError:
                return False

        wait_for(up, 30, 0.1, "metrics endpoint")
        return float(t)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return metrics(self.metrics_url)

    def run_dir(self, sandbox_id: str) -> Path:
        return Path(self.state) / "sandboxes" / sandbox_id

    def vmm_pid(self, sandbox_id: str) -> int:
        for pid in our_pids(str(self.run_dir(sandbox_id))):
            try:
                if Path(f"/proc/{pid}/comm").read_text().startswith("qemu"):
                    return int(pid)
            except OSError:
                continue
        raise AssertionError(f"no VMM process for {sandbox_id}")


class EventWatcher:
    """Collects WatchEvents in a thread; `stop()` cancels the stream."""

    def __init__(self, h: ObsHostd, sandbox_id: str = "") -> None:
        self.events: list[Any] = []
        self._call = h.sandboxes.WatchEvents(
            pb.WatchEventsRequest(sandbox_id=sandbox_id), metadata=h.md()
        )
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self) -> None:
        try:
            for ev in self._call:
                self.events.append(ev)
        except grpc.RpcError:
            pass

    def of(self, sandbox_id: str) -> list[tuple[str, str]]:
        return [
            (pb.EventType.Name(e.type), pb.EventReason.Name(e.reason))
            for e in list(self.events)
            if e.sandbox_id == sandbox_id
        ]

    def stop(self) -> None:
        self._call.cancel()
        self._t.join(10)

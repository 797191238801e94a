"""The durable record of every sandbox on this node (SQLite, WAL).

A row holds everything needed to find a sandbox's VM again after hostd
restarts (kill -9 included): the VM spec, tokens, network policy, timers.
Rows are written before the VM starts (state creating), so a crash in the
middle of Create leaves a row that the next start cleans up.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hostd.state import State

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    sandbox_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    state TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sandboxes_order ON sandboxes (created_at, sandbox_id);
"""


@dataclass
class SandboxRecord:
    sandbox_id: str
    template_id: str
    state: State
    created_at: float  # unix seconds; also the list order
    started_at: float
    # Unix seconds when the reaper kills it; meaningless while paused.
    end_at: float
    # Seconds left on the clock when paused (the clock stops while paused).
    paused_remaining: float = 0.0
    # Paused to disk: no VM processes; memory and devices are in run_dir/mem.snap.
    # Rows written before this field existed read as False (in-place pause).
    paused_to_disk: bool = False
    vcpus: int = 2
    memory_mb: int = 512
    disk_mb: int = 2048
    metadata: dict[str, str] = field(default_factory=dict)
    envs: dict[str, str] = field(default_factory=dict)
    secure: bool = True
    access_token: str = ""
    traffic_token: str = ""
    allow_internet_access: bool = True
    allow_out: list[str] = field(default_factory=list)
    deny_out: list[str] = field(default_factory=list)
    allow_public_traffic: bool = True
    volume_id: str = ""
    volume_mount_path: str = ""
    hostname: str = ""
    # The VM: what VmSpec needs to re-attach.
    kernel: str = ""
    initramfs: str = ""
    rootfs: str = ""
    kernel_cmdline: str = ""
    run_dir: str = ""
    guestd_port: int = 50051
    accel: str = "auto"
    # The sandbox network as set up (guest_ip, netns, tap, mac, ...), if any.
    network: dict[str, Any] = field(default_factory=dict)
    # Why the sandbox is in state error (hostd.health); empty otherwise.
    error: str = ""

    def to_json(self) -> str:
        d = asdict(self)
        d["state"] = self.state.value
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SandboxRecord:
        d = json.loads(text)
        d["state"] = State(d["state"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


class Store:
    """Synchronous on purpose: each call is one short local transaction (~0.1 ms)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, rec: SandboxRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO sandboxes (sandbox_id, created_at, state, data) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(sandbox_id) DO UPDATE SET state=excluded.state, data=excluded.data",
                (rec.sandbox_id, rec.created_at, rec.state.value, rec.to_json()),
            )

    def get(self, sandbox_id: str) -> SandboxRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM sandboxes WHERE sandbox_id = ?", (sandbox_id,)
            ).fetchone()
        return SandboxRecord.from_json(row[0]) if row else None

    def delete(self, sandbox_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM sandboxes WHERE sandbox_id = ?", (sandbox_id,))

    def all(self) -> list[SandboxRecord]:
        """Every row, in creation order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT data FROM sandboxes ORDER BY created_at, sandbox_id"
            ).fetchall()
        return [SandboxRecord.from_json(r[0]) for r in rows]

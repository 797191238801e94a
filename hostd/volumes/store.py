"""The durable record of volumes (SQLite, WAL), in its own file next to hostd's store.

`attached_to` is the lock that keeps a volume to one sandbox at a time: it is
taken with a conditional UPDATE, so two concurrent Creates cannot both win,
and it survives a hostd restart (a paused sandbox keeps its volume).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    volume_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size_mb INTEGER NOT NULL,
    created_at REAL NOT NULL,
    attached_to TEXT NOT NULL DEFAULT ''
);
"""


@dataclass(frozen=True)
class VolumeRecord:
    volume_id: str
    name: str
    size_mb: int
    created_at: float
    attached_to: str = ""


_COLS = "volume_id, name, size_mb, created_at, attached_to"


class NameTaken(Exception):
    """Another volume already has this name."""


class VolumeStore:
    """Synchronous on purpose: each call is one short local transaction."""

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

    def insert(self, rec: VolumeRecord) -> None:
        try:
            with self._lock:
                self._db.execute(
                    f"INSERT INTO volumes ({_COLS}) VALUES (?, ?, ?, ?, ?)",
                    (rec.volume_id, rec.name, rec.size_mb, rec.created_at, rec.attached_to),
                )
        except sqlite3.IntegrityError as e:
            raise NameTaken(rec.name) from e

    def get(self, volume_id: str) -> VolumeRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLS} FROM volumes WHERE volume_id = ?", (volume_id,)
            ).fetchone()
        return VolumeRecord(*row) if row else None

    def all(self) -> list[VolumeRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLS} FROM volumes ORDER BY created_at, volume_id"
            ).fetchall()
        return [VolumeRecord(*r) for r in rows]

    def attach(self, volume_id: str, sandbox_id: str) -> bool:
        """Marks the volume attached to sandbox_id; False when another sandbox holds it."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE volumes SET attached_to = ? WHERE volume_id = ?"
                " AND (attached_to = '' OR attached_to = ?)",
                (sandbox_id, volume_id, sandbox_id),
            )
        return cur.rowcount == 1

    def detach(self, volume_id: str, sandbox_id: str) -> bool:
        """Frees the volume if sandbox_id holds it; False otherwise."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE volumes SET attached_to = '' WHERE volume_id = ? AND attached_to = ?",
                (volume_id, sandbox_id),
            )
        return cur.rowcount == 1

    def detach_sandbox(self, sandbox_id: str) -> list[str]:
        """Frees every volume sandbox_id holds; returns their ids."""
        with self._lock:
            rows = self._db.execute(
                "SELECT volume_id FROM volumes WHERE attached_to = ?", (sandbox_id,)
            ).fetchall()
            self._db.execute(
                "UPDATE volumes SET attached_to = '' WHERE attached_to = ?", (sandbox_id,)
            )
        return [r[0] for r in rows]

    def delete_if_free(self, volume_id: str) -> bool:
        """Deletes the row unless attached; False when attached (or gone)."""
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM volumes WHERE volume_id = ? AND attached_to = ''", (volume_id,)
            )
        return cur.rowcount == 1

"""The results ledger: every finished training, recorded the moment it finishes, keyed by what determines it.

A key is the SHA-256 of the resolved training config (data, model, train, eval sections, |D| and stop rule
included) and the version of the science code (a hash of diffmem/*.py). A repeat of a sweep, or another
sweep that needs the same (config, |D|) — the base config recurs in every factor's grid — reads the answer
instead of training again. SQLite, one INSERT per training in a transaction: a record is whole or absent.
"""
from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
import time
from pathlib import Path

from diffmem.config import ConfigError

LEDGER_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trainings (
    key TEXT PRIMARY KEY, best_mem_ratio REAL NOT NULL, images_seen INTEGER NOT NULL,
    planned_images INTEGER NOT NULL, train_seconds REAL NOT NULL, size INTEGER NOT NULL,
    config TEXT NOT NULL, code_version TEXT NOT NULL, finished_at REAL NOT NULL);
"""


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """Hash of the science package's sources: a change to diffmem/ makes old records inapplicable."""
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).resolve().parent.parent / "diffmem").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def training_key(resolved_config: dict) -> str:
    text = json.dumps(resolved_config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{code_version()}\n{text}".encode()).hexdigest()


class Ledger:
    """A SQLite file of finished trainings. Picklable (it holds only the path), so a Tune searcher can carry it."""

    def __init__(self, path: str | Path):
        self.path = str(Path(path).resolve())
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('version', ?)", (str(LEDGER_VERSION),))
            version = db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()[0]
        if version != str(LEDGER_VERSION):
            raise ConfigError(f"ledger {self.path} has format version {version}, this code writes "
                              f"{LEDGER_VERSION}; pass another --ledger path")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)   # trials on one node write concurrently

    def get(self, key: str) -> dict | None:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM trainings WHERE key = ?", (key,)).fetchone()
        return dict(row) if row else None

    def put(self, key: str, resolved_config: dict, metrics: dict, train_seconds: float) -> None:
        """Record one finished training (the first record of a key wins: they are equal by construction)."""
        with self._connect() as db:   # the context manager commits, or rolls back on error
            db.execute("INSERT OR IGNORE INTO trainings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (key, float(metrics["best_mem_ratio"]), int(metrics["images_seen"]),
                        int(metrics["planned_images"]), float(train_seconds), int(resolved_config["data"]["size"]),
                        json.dumps(resolved_config, sort_keys=True), code_version(), time.time()))

    def __len__(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM trainings").fetchone()[0]

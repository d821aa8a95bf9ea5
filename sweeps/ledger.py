"""The results ledger: every finished training, recorded the moment it finishes, keyed by what determines it.

A key is the SHA-256 of everything a training's result depends on: the resolved training config (data, model,
train, eval sections, |D| and stop rule included), the version of the science code (a hash of diffmem/*.py),
and the context the config does not name (`key_context`): a fingerprint of the data actually loaded (a hash
of the dataset's arrays, diffmem.data.fingerprint), the device type the training runs on (cpu or cuda;
train.device 'auto' is resolved first, see sweeps.trainable.trial_config) and the torch version. A repeat of a
sweep, or another sweep that needs the same (config, |D|) — the base config recurs in every factor's grid —
reads the answer instead of training again. SQLite, one INSERT per training in a transaction: a record is
whole or absent.

A ledger is only ever created at a path where no file exists. A file that is there must be a whole diffmem
ledger of this version; an empty (0-byte), truncated or foreign file is refused with one line (ConfigError),
never taken for a new ledger.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from diffmem.config import ConfigError

LEDGER_VERSION = 4   # 2: the key holds the data fingerprint, device type and torch version (column `context`)
#                      3: best_num_samples, the samples behind best_mem_ratio (the adaptive evaluation may stop early)
#                      4: train_seconds renamed step_seconds (the time inside training steps; a version-3 ledger is
#                         renamed in place when opened, its records kept)
# best_mem_ratio's 95 % interval is not a column: the ratio is copies / best_num_samples, so
# sweeps.results.interval_of gives back the very interval the training reported, and a ledger-answered trial
# shows the same interval as a trained one.
SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE trainings (
    key TEXT PRIMARY KEY, best_mem_ratio REAL NOT NULL, best_num_samples INTEGER NOT NULL,
    images_seen INTEGER NOT NULL,
    planned_images INTEGER NOT NULL, step_seconds REAL NOT NULL, size INTEGER NOT NULL,
    config TEXT NOT NULL, context TEXT NOT NULL, code_version TEXT NOT NULL, finished_at REAL NOT NULL);
"""
SQLITE_MAGIC = b"SQLite format 3\0"
NEW_PATH = "pass a --ledger path where no file exists (a new ledger is only ever created there)"


V3_STEP_COLUMN = "train_seconds"   # version 3's name of the column step_seconds


def _upgrade_from_3(db: sqlite3.Connection) -> None:
    """Version 3 -> 4 in one write transaction: the column train_seconds is step_seconds (what it always held).
    The version is read again under the write lock, so two processes opening the ledger at once upgrade it once."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()[0] == "3":
            db.execute(f"ALTER TABLE trainings RENAME COLUMN {V3_STEP_COLUMN} TO step_seconds")
            db.execute("UPDATE meta SET value = '4' WHERE name = 'version'")
        db.commit()
    except BaseException:
        db.rollback()
        raise


def recorded_step_seconds(path: str | None) -> list[float]:
    """The time inside training steps of each training a ledger holds, read-only (--status): a version 3 ledger
    is read as it is, not upgraded; empty if there is no ledger or it cannot be read."""
    if not path or not Path(path).is_file():
        return []
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            version = db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()
            column = V3_STEP_COLUMN if version == ("3",) else "step_seconds"
            return [float(s) for (s,) in db.execute(f"SELECT {column} FROM trainings")]
    except sqlite3.Error:
        return []


SCIENCE = Path(__file__).resolve().parent.parent / "diffmem"


@functools.lru_cache(maxsize=None)
def code_version(package: Path = SCIENCE) -> str:
    """Hash of the science package's code: a change to what diffmem/ runs makes old records inapplicable. Each
    module is hashed as its syntax tree without docstrings, so comments, docstrings and line wrapping do not
    retire a ledger; any change to a statement, a name or a constant does (the tree's text is the Python
    version's own, so a ledger is shared between machines on one minor version of Python)."""
    digest = hashlib.sha256()
    for path in sorted(Path(package).glob("*.py")):
        tree = ast.parse(path.read_bytes(), filename=str(path))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        digest.update(path.name.encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return digest.hexdigest()[:16]


def key_context(cfg) -> dict:
    """What determines a training besides its config, as seen by this process: the fingerprint of the data it
    loads, the device type and the torch version. train.device 'auto' is resolved here as diffmem.train does;
    sweeps resolve it from the trial's resources before (sweeps.trainable.trial_config), so the driver's lookup
    and the trial agree on any machine."""
    import torch

    from diffmem.data import fingerprint
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"data": fingerprint(cfg.data), "device": device, "torch": torch.__version__}


def training_key(resolved_config: dict, context: dict) -> str:
    text = json.dumps({"config": resolved_config, "context": context}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{code_version()}\n{text}".encode()).hexdigest()


class Ledger:
    """A SQLite file of finished trainings. Picklable (it holds only the path), so a Tune searcher can carry it.

    Opening creates a new ledger where no file exists, and otherwise checks the file without writing to it: a
    diffmem ledger of this version, whole (SQLite's quick_check). Anything else is a ConfigError of one line."""

    def __init__(self, path: str | Path):
        self.path = str(Path(path).expanduser().resolve())
        if not os.path.lexists(self.path):
            self._create()
        self._check()

    def _create(self) -> None:
        """Built under a temporary name and linked into place, so no other process ever sees a half-made
        ledger, and one that appeared meanwhile is kept. A place where none can be made is one line."""
        try:
            self._build()
        except (OSError, sqlite3.Error) as e:
            why = getattr(e, "strerror", None) or str(e)
            raise ConfigError(f"ledger {self.path} cannot be created ({why}); pass a --ledger path in a folder "
                              f"you can write") from None

    def _build(self) -> None:
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.new")
        try:
            with closing(sqlite3.connect(tmp)) as db:
                with db:
                    db.executescript(SCHEMA)
                    db.execute("INSERT INTO meta VALUES ('version', ?)", (str(LEDGER_VERSION),))
            try:
                os.link(tmp, target)           # fails if the path exists: never over another file
            except FileExistsError:
                pass
            except OSError:                    # a file system without hard links
                if not os.path.lexists(target):
                    os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def _check(self) -> None:
        path = Path(self.path)
        if path.is_dir():
            raise ConfigError(f"ledger {path} is a folder, not a ledger file; {NEW_PATH}")
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                magic = f.read(len(SQLITE_MAGIC))
        except OSError as e:
            raise ConfigError(f"ledger {path} cannot be read ({e.strerror}); fix its permissions or "
                              f"{NEW_PATH}") from None
        if size == 0:
            raise ConfigError(f"ledger {path} is empty (0 bytes), not a diffmem ledger: truncated by a crash or a "
                              f"copy? Restore it from a backup, or {NEW_PATH}")
        if magic != SQLITE_MAGIC:
            raise ConfigError(f"ledger {path} is not a SQLite file, so not a diffmem ledger; {NEW_PATH}")
        damaged = f"restore it from a backup, or {NEW_PATH}"
        try:
            with closing(self._connect()) as db:
                db.execute("BEGIN")   # a read transaction: no writer changes the file while it is checked
                tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not {"meta", "trainings"} <= tables:
                    raise ConfigError(f"ledger {path} is a SQLite file but not a diffmem ledger (no meta and "
                                      f"trainings tables); {NEW_PATH}")
                row = db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()
                if row is None:
                    raise ConfigError(f"ledger {path} is a SQLite file but not a diffmem ledger (no version); "
                                      f"{NEW_PATH}")
                if row[0] == "3":
                    db.rollback()
                    try:
                        _upgrade_from_3(db)
                    except sqlite3.OperationalError as e:   # a file (or folder) this process cannot write
                        if "readonly" not in str(e) and "unable to open" not in str(e):
                            raise
                        raise ConfigError(f"ledger {path} has format version 3, which this code upgrades in place "
                                          f"(its column {V3_STEP_COLUMN} becomes step_seconds), but cannot write it "
                                          f"(SQLite: {e}); make it writable once, or {NEW_PATH}") from None
                    db.execute("BEGIN")
                    row = db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()
                if row[0] != str(LEDGER_VERSION):
                    raise ConfigError(f"ledger {path} has format version {row[0]}, this code writes "
                                      f"{LEDGER_VERSION}; pass another --ledger path")
                short = _truncated_by(path, db)
                if short:
                    raise ConfigError(f"ledger {path} is truncated ({short}); {damaged}")
                problems = [r for (r,) in db.execute("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise ConfigError(f"ledger {path} is damaged (SQLite: {problems[0]}); {damaged}")
                db.rollback()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e):
                raise ConfigError(f"ledger {path} is damaged or truncated (SQLite: {e}); {damaged}") from None
            raise ConfigError(f"ledger {path} stayed locked by another process for 60 s; try again once that one "
                              f"is done") from None
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"ledger {path} is damaged or truncated (SQLite: {e}); {damaged}") from None

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)   # trials on one node write concurrently

    def get(self, key: str) -> dict | None:
        with closing(self._connect()) as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM trainings WHERE key = ?", (key,)).fetchone()
        return dict(row) if row else None

    def put(self, key: str, resolved_config: dict, context: dict, metrics: dict, step_seconds: float) -> None:
        """Record one finished training (the first record of a key wins: they are equal by construction)."""
        with closing(self._connect()) as db, db:   # the inner one commits, or rolls back on error
            db.execute("INSERT OR IGNORE INTO trainings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (key, float(metrics["best_mem_ratio"]), int(metrics["best_num_samples"]),
                        int(metrics["images_seen"]),
                        int(metrics["planned_images"]), float(step_seconds), int(resolved_config["data"]["size"]),
                        json.dumps(resolved_config, sort_keys=True), json.dumps(context, sort_keys=True),
                        code_version(), time.time()))

    def __len__(self) -> int:
        with closing(self._connect()) as db:
            return db.execute("SELECT COUNT(*) FROM trainings").fetchone()[0]


def _truncated_by(path: Path, db: sqlite3.Connection) -> str:
    """'' if the file is as long as SQLite's page count says (the header's, where it is valid), else what is
    missing. Asked of SQLite inside the caller's read transaction, with the file's size from stat: opening and
    closing the file here would drop this process's POSIX locks on it, SQLite's read lock among them, and let a
    writer commit while quick_check reads (a healthy ledger then looked damaged to a training finishing beside
    another: bench/driver.py found it)."""
    size = os.stat(path).st_size
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    if size < 100:
        return f"{size} bytes, less than a SQLite header"
    if size < pages * page_size:
        return f"{size} of {pages * page_size} bytes"
    if size % page_size:
        return f"{size} bytes, not a whole number of {page_size}-byte pages"
    return ""

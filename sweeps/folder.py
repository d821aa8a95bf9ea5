"""The sweep folder: where everything of a sweep lies (SweepFolder, README "What a sweep leaves where"), how its
files are written (atomic_write), where this driver's folder is now (sweep_here), and its life before the sweep
starts: made (make_output), checked for what the sweep will write (its ledger, --storage), and removed again
if the sweep is refused before it began (unmake_output). No Ray, no torch."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from diffmem.config import ConfigError

if TYPE_CHECKING:   # annotations only: sweeps.spec imports this module
    from sweeps.spec import Sweep

# The sweep folder (SweepFolder): OUTPUT/sweep.json, sweep.log, ledger.sqlite (unless --ledger), tensorboard/,
# tune/ (Tune's), train/ (Ray Train's runs of DDP trainings; with --storage URI, tune/ and train/ are there,
# sweeps/storage.py), and the results (sweeps/results.py). TENSORBOARD is also a trial's own run folder's name.
SPEC_FILE = "sweep.json"
LOG_FILE = "sweep.log"
LEDGER_FILE = "ledger.sqlite"
TENSORBOARD = "tensorboard"
SUMMARY_RUN = "summary"   # tensorboard/summary: the sweep's own TensorBoard run (sweeps/tblog.py)
TUNE_NAME = "tune"
TRAIN_NAME = "train"


class SweepFolder:
    """Every path of a sweep's output folder (README, "What a sweep leaves where"), named here and nowhere else."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    spec = property(lambda self: self.root / SPEC_FILE)
    log = property(lambda self: self.root / LOG_FILE)
    ledger = property(lambda self: self.root / LEDGER_FILE)   # the sweep's own; --ledger names another
    tensorboard = property(lambda self: self.root / TENSORBOARD)
    summary_run = property(lambda self: self.root / TENSORBOARD / SUMMARY_RUN)
    emm_csv = property(lambda self: self.root / "emm.csv")
    trials_csv = property(lambda self: self.root / "trials.csv")
    emm_md = property(lambda self: self.root / "emm.md")
    emm_png = property(lambda self: self.root / "emm.png")
    curves_png = property(lambda self: self.root / "curves.png")

    def results(self) -> list[Path]:
        """The result files written so far (what a tracker keeps of the sweep)."""
        return [p for p in (self.emm_csv, self.trials_csv, self.emm_md, self.emm_png, self.curves_png) if p.is_file()]


def atomic_write(path: Path, write) -> None:
    """write(temporary path), then rename it to `path`: a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


_here: dict = {"output": None, "storage": None}


def sweep_here(output: str, storage: str | None = None) -> None:
    """Where this driver's sweep folder is (and its --storage), set before Tune starts or restores the sweep: the
    searcher, its generator and the callbacks come back from tune/tuner.pkl holding where the folder was made,
    and read this instead, so a moved or copied folder resumes."""
    _here.update(output=output, storage=storage)


def here() -> tuple[str | None, str | None]:
    """(sweep folder, --storage URI or None) of this driver (sweep_here)."""
    return _here["output"], _here["storage"]


def make_output(output: Path) -> list[Path]:
    """Create the output folder; returns the folders it created, deepest first. One line if it cannot."""
    created, folder = [], output
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    try:
        output.mkdir(parents=True, exist_ok=True)
        if not os.access(output, os.W_OK | os.X_OK):
            raise PermissionError(13, "read-only")
    except OSError as e:
        for folder in created:
            remove_empty(folder)
        raise ConfigError(f"--output {output} cannot be created or written ({e.strerror}); choose a folder you can "
                          f"write") from None
    return created


def remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def unmake_output(output: Path, spec: Sweep, created: list[Path], new_ledger: bool) -> None:
    """A new sweep refused once Ray answered (a cluster that can never place one of its trainings) leaves nothing
    behind, so the same command runs once the cluster is fixed; a ledger that was there before stays."""
    written = SweepFolder(output)
    for path in [written.spec, written.log] + ([Path(spec.ledger)] if new_ledger else []):
        path.unlink(missing_ok=True)
    for folder in created:
        remove_empty(folder)


def check_ledger_writable(path: str) -> None:
    """A sweep records every finished training in its ledger: the file (or the folder it is to be created in)
    must be writable, and SQLite writes its journal beside it."""
    ledger = Path(path)
    folder = ledger.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"ledger {ledger} cannot be created: {folder} is a file; pass another --ledger path")
    if ledger.exists() and not os.access(ledger, os.R_OK | os.W_OK):
        raise ConfigError(f"ledger {ledger} is read-only, and a sweep records every training in it; fix its "
                          f"permissions or pass another --ledger path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"ledger {ledger} is in a read-only folder ({folder}), and SQLite writes its journal beside "
                          f"it; pass a --ledger path in a folder you can write")


def check_storage(uri: str | None, packed: int) -> str | None:
    """--storage: a URI pyarrow opens, and no packs (a pack server writes its trainings' TensorBoard runs into
    the sweep folder)."""
    if uri is None:
        return None
    from sweeps.storage import check_uri
    if packed > 1:
        raise ConfigError("--pack-size > 1 needs the sweep folder on storage every node shares; drop --storage, "
                          "or --pack-size")
    return check_uri(uri)

"""What a sweep leaves on disk, and for how long (README "What a sweep leaves where").

A training writes its files into a temporary run folder of its own process (run_dir_of_this_process) and hands
each checkpoint to Tune, which keeps the latest in the trial's folder OUTPUT/tune/<trial>/checkpoint_* (and Ray
Train's in OUTPUT/train/train_<trial id>/ for a DDP training). A checkpoint is needed only while its training
may still resume; once the training finished, its result is in the ledger and nothing reads the checkpoint
again, so the sweep empties its folder (sweeps.progress.CheckpointPruner, sweeps.storage.empty_checkpoints).
Standard library only: the reaper uses this.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path


def run_dir_of_this_process(kind: str) -> Path:
    """A temporary folder for one training's files (its checkpoint before Tune takes it), named after this process:
    diffmem-<kind>-<pid>-*. A process killed with SIGKILL cannot remove it; the next training on the machine, the
    end of the sweep or the reaper of a killed driver does (remove_orphaned_run_dirs)."""
    remove_orphaned_run_dirs()
    return Path(tempfile.mkdtemp(prefix=f"diffmem-{kind}-{os.getpid()}-"))


def remove_orphaned_run_dirs(root: str | None = None) -> list[Path]:
    """Remove the run folders (run_dir_of_this_process) whose process is gone; returns them."""
    gone = []
    for path in Path(root or tempfile.gettempdir()).glob("diffmem-*-*-*"):
        match = re.fullmatch(r"diffmem-[a-z0-9]+-(\d+)-.+", path.name)
        if match and path.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True

"""What a sweep leaves on disk, and for how long (README "What a sweep leaves where").

A training writes its files into a temporary run folder of its own process (run_dir_of_this_process) and hands
each checkpoint to Tune, which keeps the latest in the trial's folder OUTPUT/tune/<trial>/checkpoint_* (and Ray
Train's in OUTPUT/train/train_<trial id>/ for a DDP training). A checkpoint is needed only while its training
may still resume; once the training finished, its result is in the ledger and nothing reads the checkpoint
again, so the sweep empties its folder (sweeps.progress.CheckpointPruner). Standard library only: the reaper uses this.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

CHECKPOINT_DIRS = "checkpoint_*"   # Tune's and Ray Train's name for a reported checkpoint's folder


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


def remove_checkpoints(folder: Path) -> int:
    """Empty the checkpoint folders directly in `folder` (a finished trial's); returns how many. The folders stay:
    a driver killed after a training finished but before Tune saved that, restores the trial on --resume from
    its latest checkpoint folder, and Tune refuses one that is gone; the restored trial then answers from the
    ledger before it reads anything there (sweeps.trainable._report_known)."""
    emptied = 0
    for checkpoint in Path(folder).glob(CHECKPOINT_DIRS):
        if checkpoint.is_dir():
            for entry in checkpoint.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
            emptied += 1
    return emptied

"""Where a sweep's Tune experiment lives (README "Running the paper's study on a cluster", item 3).

By default in the sweep folder: OUTPUT/tune (trial results and checkpoints) and OUTPUT/train (Ray Train's runs of
DDP trainings), which every node of a cluster must then reach at the same path. With --storage URI they live
on storage that every node reaches through one of pyarrow's file systems (s3://, gs://, abfs://, hdfs://, or
file:// on a mount), Ray Tune's own remote storage: URI/tune, URI/train, and URI/tensorboard for the trainings'
TensorBoard runs. The trials then write nothing into the sweep folder: the driver records each finished
training in the ledger and brings its TensorBoard run into OUTPUT/tensorboard (sweeps.progress.FromStorage).

A location is an absolute local path or a URI; everything here reads and writes both through pyarrow, so one
code path serves either.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING

from diffmem.config import ConfigError
from sweeps.folder import TUNE_NAME

if TYPE_CHECKING:   # annotations only
    from sweeps.spec import Sweep

CHECKPOINT_DIRS = "checkpoint_*"  # Tune's and Ray Train's name for a reported checkpoint's folder


def check_uri(uri: str) -> str:
    """A --storage URI that pyarrow opens, without a trailing slash; else one line naming the fix."""
    import pyarrow.fs as pafs
    if "://" not in uri:
        raise ConfigError(f"--storage {uri!r} is not a URI; give one every node reaches, e.g. s3://bucket/sweeps, "
                          f"gs://bucket/sweeps or file:///shared/sweeps (or leave --storage out to keep "
                          f"everything in --output)")
    try:
        pafs.FileSystem.from_uri(uri)
    except Exception as e:   # pyarrow raises ArrowInvalid, OSError or ValueError by scheme
        raise ConfigError(f"--storage {uri}: pyarrow cannot open it ({str(e).splitlines()[0][:160]}); give a URI "
                          f"of s3://, gs://, abfs://, hdfs:// or file://") from None
    return join(uri)   # without a trailing slash on its path


def root(storage: str | None, output) -> str:
    """Where Tune keeps the sweep's experiment (RunConfig.storage_path): the --storage URI, else the sweep folder."""
    return storage or str(Path(output).resolve())


def experiment(spec: Sweep, output) -> str:
    """The location of the sweep's Tune experiment (tuner.pkl, snapshots, a folder per trial)."""
    return join(root(spec.storage, output), TUNE_NAME)


def join(location: str, *parts: str) -> str:
    """parts appended to a location's path; a URI's options (s3://bucket/sweeps?endpoint_override=...) stay last."""
    path, mark, options = location.partition("?")
    return "/".join([path.rstrip("/"), *parts]) + mark + options


def filesystem(location: str):
    """(pyarrow file system, path in it) of a location: a URI, or an absolute local path."""
    import pyarrow.fs as pafs
    return pafs.FileSystem.from_uri(location)


def children(fs, path: str, pattern: str = "*", folders: bool = False) -> list[tuple[str, float | None]]:
    """(path, modification time) of the entries directly in `path` whose names match `pattern` (folders only,
    if `folders`), sorted by name; none if it is not a folder."""
    import pyarrow.fs as pafs
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except NotADirectoryError:
        return []
    found = [info for info in infos if fnmatch.fnmatch(info.base_name, pattern)
             and (not folders or info.type == pafs.FileType.Directory)]
    return [(info.path, info.mtime.timestamp() if info.mtime else None)
            for info in sorted(found, key=lambda i: i.base_name)]


def read_text(fs, path: str) -> str | None:
    """A file's text; None if it is not there."""
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


def upload(folder: Path, fs, path: str) -> None:
    """Copy a local folder's files to `path` (overwriting what was there)."""
    import pyarrow.fs as pafs
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(folder).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download(fs, path: str, folder: Path) -> bool:
    """Copy the files under `path` into a local folder; False if there is nothing there."""
    import pyarrow.fs as pafs
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return False
    Path(folder).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(Path(folder).resolve()), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return True


def empty_checkpoints(fs, path: str) -> int:
    """Empty the checkpoint folders directly in `path` (a finished trial's, or its Ray Train run); returns how
    many. The folders stay: a driver killed after a training finished but before Tune saved that restores the
    trial on --resume from its latest checkpoint folder, and Tune refuses one that is gone; the restored trial
    then answers from the ledger before it reads anything there (sweeps.trainable._report_known)."""
    import pyarrow.fs as pafs
    emptied = 0
    for checkpoint, _ in children(fs, path, CHECKPOINT_DIRS):
        if fs.get_file_info(checkpoint).type == pafs.FileType.Directory:
            fs.delete_dir_contents(checkpoint, missing_dir_ok=True)
            emptied += 1
    return emptied

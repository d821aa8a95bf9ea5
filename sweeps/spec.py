"""The sweep as data: its spec (OUTPUT/sweep.json, everything that defines it, read back whole and of this version
by --resume, --status and report.py), its folder's layout (README, "What a sweep leaves where"), and what every
trial of it gets (trial_settings). Written by sweeps/emm_search.py; no Ray, no torch."""
from __future__ import annotations

import json
import os
from pathlib import Path

from diffmem.config import ConfigError
from sweeps.curve import POINT, is_curve

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
RESULT_FILES = ("emm.csv", "trials.csv", "emm.md", "emm.png", "curves.png")


class SweepFolder:
    """Every path of a sweep's output folder (README, "What a sweep leaves where"), named here and nowhere else."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    spec = property(lambda self: self.root / SPEC_FILE)
    log = property(lambda self: self.root / LOG_FILE)
    ledger = property(lambda self: self.root / LEDGER_FILE)   # the sweep's own; --ledger names another
    tensorboard = property(lambda self: self.root / TENSORBOARD)
    summary_run = property(lambda self: self.root / TENSORBOARD / SUMMARY_RUN)
    tune = property(lambda self: self.root / TUNE_NAME)
    emm_csv = property(lambda self: self.root / "emm.csv")
    trials_csv = property(lambda self: self.root / "trials.csv")
    emm_md = property(lambda self: self.root / "emm.md")
    emm_png = property(lambda self: self.root / "emm.png")
    curves_png = property(lambda self: self.root / "curves.png")

    def results(self) -> list[Path]:
        """The result files written so far (what a tracker keeps of the sweep)."""
        return [self.root / name for name in RESULT_FILES if (self.root / name).is_file()]


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


SPEC_FORMAT = "diffmem.emm_search"   # sweep.json's "format": how a folder written by this tool is recognized
SPEC_VERSION = 2                     # 2: "format" added; ledger version 2 (data fingerprint, device, torch)
SPEC_KEYS = ("factor", "values", "grid_points", "base", "epsilon", "tolerance", "size_range", "allowed_sizes",
             "workers", "gpus_per_worker", "ddp", "max_failures", "max_concurrent", "ledger", "no_reuse", "config_file")


def pack_size(spec: dict) -> int:
    """Trainings packed per worker (--pack-size, sweep.pack_size; sweeps/packing.py); a sweep.json written before
    packing had one."""
    return spec.get("pack_size", 1)


def sweep_tracking(spec: dict) -> dict:
    """--wandb and --mlflow (sweeps/tracking.py); a sweep.json written before them had neither."""
    return {"wandb": None, "mlflow": None, **spec.get("tracking", {})}


def sweep_storage(spec: dict) -> str | None:
    """--storage: the URI of the sweep's Tune experiment (sweeps/storage.py); None: the sweep folder (a sweep.json
    written before --storage had none)."""
    return spec.get("storage")


def sweep_seeds(spec: dict) -> int:
    """Training seeds per grid point; a sweep.json written before --seeds had one."""
    return spec.get("seeds", 1)


# The types of the keys of sweep.json that --resume, --status and report.py read.
SPEC_TYPES = {"factor": str, "values": list, "grid_points": list, "base": dict, "epsilon": (int, float),
              "tolerance": (int, float), "size_range": list, "allowed_sizes": list, "workers": int,
              "gpus_per_worker": int, "max_failures": int, "max_concurrent": (int, type(None)), "ledger": str,
              "config_file": str}


def read_spec(output: Path, use: str = "resume") -> dict:
    """The sweep.json of a folder this tool wrote, whole and of this version; else one line (ConfigError).
    `--resume` checks it before Tune touches the folder: Tune's own files there (tuner.pkl, trial state) are
    pickles, and unpickling runs code. `use` ("resume", "status", "report") words the fix."""
    fix = "resume only a folder a sweep wrote (pass its --output folder)" if use == "resume" else \
        "pass the --output folder of a sweep"
    path = SweepFolder(output).spec
    if not path.is_file():
        raise ConfigError(f"{output} is not a sweep folder (no {SPEC_FILE}); pass the --output folder of a sweep")
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        spec, why = None, f"unreadable: {type(e).__name__}"
    else:
        why = "no diffmem format key"
    ours = isinstance(spec, dict) and (spec.get("format") == SPEC_FORMAT or (   # version 1 had no format key
        "format" not in spec and spec.get("version") == 1 and {"factor", "grid_points", "base"} <= set(spec)))
    if not ours:
        raise ConfigError(f"{path} was not written by diffmem's emm_search ({why}); {fix}")
    if spec.get("version") != SPEC_VERSION and use == "resume":   # --status and report.py only read the folder
        raise ConfigError(f"{path} was written by another version of emm_search (format {spec.get('version')}); "
                          f"start a new sweep")
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ConfigError(f"{path} is incomplete (no '{missing[0]}'); "
                          + ("start a new sweep" if use == "resume" else "it cannot be read"))
    wrong = [k for k, t in SPEC_TYPES.items() if not isinstance(spec[k], t) or isinstance(spec[k], bool)]
    if not wrong and not all(isinstance(p, dict) and "label" in p for p in spec["grid_points"]):
        wrong = ["grid_points"]
    seeds = sweep_seeds(spec)
    if not wrong and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        wrong = ["seeds"]
    storage = sweep_storage(spec)
    if not wrong and storage is not None and not (isinstance(storage, str) and "://" in storage):
        wrong = ["storage"]
    if wrong:
        raise ConfigError(f"{path} is damaged ('{wrong[0]}' is {json.dumps(spec[wrong[0]], default=str)[:60]}); "
                          + ("start a new sweep" if use == "resume" else "it cannot be read"))
    return spec


def write_spec(output: Path, spec: dict) -> None:
    output.mkdir(parents=True, exist_ok=True)
    atomic_write(SweepFolder(output).spec, lambda p: p.write_text(json.dumps(spec, indent=1, default=str)))


def pack_servers(spec: dict, trainings: int) -> int:
    """Pack servers for `trainings` at once: one per slot, each training up to pack_size (sweeps/packing.py)."""
    return -(-trainings // pack_size(spec))


def trial_points(spec: dict) -> list[dict]:
    """The grid points as the trials see them: a curve's trials are one grid point that differ only in |D|."""
    return [POINT] if is_curve(spec) else spec["grid_points"]


def trial_settings(spec: dict, output: Path, trainings: int = 1) -> dict:
    """What every trial of the sweep gets (sweeps.trainable) when `trainings` run at once; "no_reuse": never answer
    from the ledger."""
    return {"base": spec["base"], "epsilon": spec["epsilon"], "output": str(output.resolve()),
            "early_stop": not is_curve(spec), "workers": spec["workers"],
            "gpus_per_worker": spec["gpus_per_worker"], "threads_per_worker": 1, "ledger": spec["ledger"],
            "no_reuse": bool(spec["no_reuse"]), "max_failures": spec["max_failures"], "pack_size": pack_size(spec),
            "storage": sweep_storage(spec),
            "pack_servers": pack_servers(spec, trainings)}

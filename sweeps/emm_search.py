"""Find the effective model memorization (EMM) of every value of one factor, with Ray Tune.

    python sweeps/emm_search.py                          # random_labels on the embedded digits
    python sweeps/emm_search.py --factor width --values 8 16 32
    python sweeps/emm_search.py --config experiments/cifar10.yaml --address auto --gpus-per-trial 8 --factor depth
    python sweeps/emm_search.py --resume results/random_labels-20261129-101500
    python sweeps/emm_search.py --factor width --estimate   # trainings and core-/GPU-hours it would take

Everything is checked before Ray starts; bad input ends with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:      # `python sweeps/emm_search.py` from a checkout
    sys.path.insert(0, str(ROOT))

from diffmem.cli import DEFAULT_CONFIG, ArgumentParser, default_folder  # noqa: E402
from diffmem.config import (SEED_MAX, ConfigError, apply_overrides, check_machine, from_dict,  # noqa: E402
                            parse_override, parse_value, read_yaml, validate_with_data)
from sweeps.factors import FACTORS, get_factor, grid_points  # noqa: E402
from sweeps import curve  # noqa: E402
from sweeps.curve import is_curve  # noqa: E402
from sweeps import tracking  # noqa: E402
from sweeps.ray_cluster import check_address, check_local_capacity, metrics_url, start_ray, trial_resources  # noqa: E402
from sweeps.ledger import Ledger  # noqa: E402
from sweeps.spec import (SPEC_FILE, SPEC_FORMAT, SPEC_VERSION, TUNE_NAME, SweepFolder,  # noqa: E402
                         pack_servers, pack_size, read_spec, sweep_here, sweep_seeds, sweep_storage,
                         sweep_tracking, trial_points, trial_settings, write_spec)

PRESETS = ROOT / "experiments" / "presets"


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def given_flags(argv=None) -> set[str]:
    """The destinations of the flags argv names (a flag given with its default value counts too)."""
    p = build_parser()
    for action in p._actions:   # argparse has no public switch for this; SUPPRESS leaves a flag not given unset
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="emm_search.py", description="\n\n".join(__doc__.split("\n\n")[:2]))
    p.add_argument("--factor", default="random_labels", help="factor to sweep (default random_labels)")
    p.add_argument("--values", nargs="+", help="the factor's values (default: the config's, else the paper's)")
    p.add_argument("--list-factors", action="store_true", help="print every factor with its values and exit")
    p.add_argument("--status", metavar="DIR", help="print where the sweep in DIR stands (brackets, trainings "
                                                   "running and finished, time left) and exit")
    p.add_argument("--estimate", action="store_true",
                   help="print the trainings and the GPU-hours (core-hours on CPU) the sweep is expected to take "
                        "(the search simulated, training steps timed on this machine) and exit")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="experiment YAML (default experiments/digits.yaml)")
    p.add_argument("--preset", help="settings laid over the config, e.g. 'smoke' (experiments/presets/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.channels=32 (repeatable)")
    p.add_argument("--epsilon", type=float, default=0.1, help="memorized iff best ratio >= 1 - epsilon (0.1)")
    p.add_argument("--tolerance", type=float, default=0.1, help="stop a bracket at high/low <= 1 + tolerance")
    p.add_argument("--size-range", nargs=2, type=int, metavar=("LO", "HI"), help="initial |D| bracket")
    p.add_argument("--max-concurrent", type=int, help="trainings at once (default: what the machine holds)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="DDP workers per training on CPU (Ray Train)")
    p.add_argument("--gpus-per-trial", type=int, default=0, help="GPUs per training, one DDP worker each")
    p.add_argument("--address", help="an existing Ray cluster ('auto' or host:port); default: start a local one")
    p.add_argument("--no-dashboard", action="store_true", help="start the local cluster without the dashboard")
    p.add_argument("--output", help="output folder (default results/<factor>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted sweep from its output folder")
    p.add_argument("--seed", type=int, help="training seed (train.seed)")
    p.add_argument("--seeds", type=int, default=1,
                   help="training seeds per grid point (default 1): one search each, seed s trains with "
                        "train.seed + s; the EMM is their median, with their spread")
    p.add_argument("--storage", metavar="URI", help="keep Tune's trials (checkpoints, Ray Train runs) on storage "
                   "every node reaches, e.g. s3://bucket/sweeps (pyarrow's file systems); the ledger, TensorBoard and "
                   "results stay in --output. Default: all in --output")
    p.add_argument("--ledger", help="results ledger shared across sweeps (default OUTPUT/ledger.sqlite)")
    p.add_argument("--no-reuse", action="store_true", help="train again even what the ledger already holds")
    p.add_argument("--pack-size", type=int, metavar="K",
                   help="trainings packed per worker as one batched computation (diffmem/packed.py; default: the "
                        "config's sweep.pack_size, else 1)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a failed training from its checkpoint before its grid point is unresolved")
    p.add_argument("--wandb", metavar="PROJECT", help="also log every training, and the EMM table, as W&B runs "
                                                      "of PROJECT (pip install 'diffmem[tracking]')")
    p.add_argument("--mlflow", metavar="URI", help="also log every training, and the EMM table, as MLflow runs at "
                                                   "the tracking URI (sqlite:///path/mlflow.db or http://host:port)")
    return p


def list_factors(config_sweep: dict) -> str:
    lines = []
    for name, f in FACTORS.items():
        mine = (config_sweep.get("factors") or {}).get(name)
        lines.append(f"{name:17s} {f.description}\n{'':17s} paper: {list(f.paper_values)}"
                     + (f"\n{'':17s} this config: {mine}" if mine else ""))
    return "\n".join(lines)


def read_with_preset(config: str, preset: str | None) -> dict:
    """The config file as a dict, with experiments/presets/<preset>.yaml laid over it."""
    raw = read_yaml(config)
    if preset:
        path = PRESETS / f"{preset}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
            raise ConfigError(f"unknown preset '{preset}'; available: {known}")
        raw = _deep_merge(raw, read_yaml(path))
    return raw


def build_spec(args) -> dict:
    """Everything that defines the sweep, resolved and validated; saved as OUTPUT/sweep.json."""
    from diffmem.data import load_dataset   # torch: not imported by --status and --help
    raw = read_with_preset(args.config, args.preset)
    sweep = dict(raw.get("sweep") or {})
    unknown = set(sweep) - {"size_range", "size_step", "factors", "max_values", "pack_size"}
    if unknown:
        raise ConfigError(f"unknown key 'sweep.{sorted(unknown)[0]}'; sweep takes size_range, size_step, "
                          f"factors, max_values, pack_size")
    where = f"in {args.config}" + (f" with --preset {args.preset}" if args.preset else "")
    step = _sweep_int(sweep, "size_step", where)
    max_values = _sweep_int(sweep, "max_values", where)
    pack_size = args.pack_size if args.pack_size is not None else _sweep_int(sweep, "pack_size", where)
    # The numbers of the command line, before anything is loaded.
    if not 0 < args.epsilon < 1:
        raise ConfigError(f"--epsilon {args.epsilon} must be in (0, 1): memorized iff best ratio >= 1 - epsilon "
                          f"(default 0.1)")
    if not 0 < args.tolerance < math.inf:
        raise ConfigError(f"--tolerance {args.tolerance} must be a finite number > 0: a bracket closes at high/low "
                          f"<= 1 + tolerance (default 0.1)")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {args.max_concurrent} must be >= 1 (trainings at once; leave it out "
                          f"for what the machine holds)")
    if args.workers_per_trial < 1 or args.gpus_per_trial < 0 or args.max_failures < 0:
        raise ConfigError("--workers-per-trial must be >= 1, --gpus-per-trial >= 0 and --max-failures >= 0")
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds} must be >= 1 (training seeds per grid point, default 1)")
    if pack_size < 1:
        raise ConfigError(f"--pack-size {pack_size} must be >= 1 (trainings packed per worker; 1: one at a time)")
    if pack_size > 1 and (args.gpus_per_trial > 1 or args.workers_per_trial > 1):
        raise ConfigError(f"--pack-size {pack_size} packs trainings of one worker each; drop --workers-per-trial/"
                          f"--gpus-per-trial above 1 (DDP), or pack one training per worker (--pack-size 1)")
    if pack_size > 1 and args.address:
        raise ConfigError(f"--pack-size {pack_size} runs on a local sweep for now (its pack servers start with the "
                          f"local Ray); on a cluster, leave it out")
    overrides = dict(parse_override(o) for o in args.overrides)
    if args.seed is not None:
        overrides["train.seed"] = args.seed
    base_cfg = from_dict(apply_overrides(raw, overrides))       # the config itself loads
    if base_cfg.train.seed + args.seeds - 1 > SEED_MAX:
        raise ConfigError(f"--seeds {args.seeds} from train.seed={base_cfg.train.seed} goes past the largest seed "
                          f"2**63 - 1; use a smaller --seed")
    if base_cfg.train.device == "cuda" and not args.gpus_per_trial:
        raise ConfigError("train.device=cuda needs --gpus-per-trial N: a trial trains only on the GPUs it reserves "
                          "(or use train.device=auto)")
    if not args.address and not args.estimate:   # a local cluster is this machine
        check_machine(base_cfg)
    for key in ("path", "mix_path"):   # trials run in their own working directories
        if getattr(base_cfg.data, key):
            setattr(base_cfg.data, key, str(Path(getattr(base_cfg.data, key)).expanduser().resolve()))
    base = base_cfg.to_dict()

    factor = get_factor(args.factor)
    values = [parse_value(v, "--values") for v in args.values] if args.values else \
        list((sweep.get("factors") or {}).get(factor.name) or factor.paper_values)
    if max_values and not args.values and len(values) > max_values:
        k = max_values   # spread over the list, first and last included
        values = [values[round(i * (len(values) - 1) / max(k - 1, 1))] for i in range(k)]
    points = grid_points(factor, values, base_cfg)

    # Every grid point's config loads and its dataset exists; sizes must fit the smallest of them.
    available, resolved = [], {}
    source = "--values" if args.values else f"the {factor.name} values {where}"
    for point in points:
        cfg = from_dict(apply_overrides(base, point["overrides"]))
        dataset = load_dataset(cfg.data)
        validate_with_data(cfg, dataset.images.shape[-1], len(dataset.labels), dataset.name)
        available.append(len(dataset.labels))
        key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
        twins = ([resolved[key]] if key in resolved else []) + [v for v in resolved.values()
                                                                if _same_number(v, point["value"])]
        if twins:
            twin = twins[0]
            raise ConfigError(f"{source} {twin!r} and {point['value']!r} are the same {factor.name}; give each value "
                              f"once")
        resolved[key] = point["value"]
    max_size = min(available)
    if is_curve(factor.name):
        size_range = curve.size_range(values, max_size, step, args.seeds)
    else:
        size_range = search_size_range(args.size_range, sweep.get("size_range"), where, max_size, step)
    workers = args.gpus_per_trial or args.workers_per_trial
    if base_cfg.train.batch_size % workers:
        raise ConfigError(f"train.batch_size={base_cfg.train.batch_size} must be divisible by the {workers} "
                          f"workers per trial")
    if not args.address and not args.estimate:   # a local cluster must hold one training
        check_local_capacity(args.gpus_per_trial, args.workers_per_trial)
    return {"format": SPEC_FORMAT, "version": SPEC_VERSION, "factor": factor.name, "values": values,
            "grid_points": points,
            "base": base, "config_file": str(args.config), "preset": args.preset, "epsilon": args.epsilon,
            "tolerance": args.tolerance, "size_range": size_range,
            "allowed_sizes": list(range(step, max_size + 1, step)),
            "workers": workers, "gpus_per_worker": 1 if args.gpus_per_trial else 0,
            "ddp": args.gpus_per_trial > 0 or args.workers_per_trial > 1, "max_failures": args.max_failures,
            "max_concurrent": args.max_concurrent, "seeds": args.seeds, "pack_size": pack_size}


def search_size_range(given: list | None, configured, where: str, max_size: int, step: int) -> list[int]:
    """The |D| range an EMM search brackets in: --size-range, else the config's sweep.size_range, else all the
    dataset holds from one size step; one line if it cannot be searched."""
    size_range = given or configured or [step, max_size]
    size_range = list(size_range) if isinstance(size_range, (list, tuple)) else [size_range]
    if len(size_range) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size_range):
        raise ConfigError(f"sweep.size_range {size_range} {where} must be two integers [LO, HI]")
    lo, hi = size_range
    shown = f"sweep.size_range [{lo}, {hi}] {where}" if not given and configured else f"--size-range {lo} {hi}"
    if not 1 <= lo < hi:
        raise ConfigError(f"{shown} is impossible; give LO < HI, both >= 1")
    if hi > max_size:
        raise ConfigError(f"{shown} goes past the {max_size} images available; use HI <= {max_size}")
    if lo < step:
        raise ConfigError(f"{shown} starts below the size step {step} (class-balanced subsets); "
                          f"use LO >= {step}")
    return size_range


def _sweep_int(sweep: dict, key: str, where: str) -> int | None:
    """sweep.size_step or sweep.pack_size (default 1), or sweep.max_values (default none) of the config: an
    integer >= 1."""
    value = sweep.get(key, None if key == "max_values" else 1)
    if value is None and key == "max_values":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        what = {"size_step": "the |D| grid's spacing, e.g. the number of classes",
                "max_values": "how many of the factor's values to sweep",
                "pack_size": "trainings packed per worker"}[key]
        raise ConfigError(f"sweep.{key}={value!r} {where} must be an integer >= 1 ({what})")
    return value


def _same_number(a, b) -> bool:
    """8 and 8.0: one number in two spellings (True and 1 are not numbers here)."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return numbers and a == b


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_new_output(output: Path) -> None:
    """A new sweep writes only into a folder that does not exist yet or is empty: never among files it did not
    write. A folder a sweep wrote (its sweep.json, read_spec) is continued with --resume, not overwritten."""
    if not output.exists() and not output.is_symlink():
        return
    if not output.is_dir():
        raise ConfigError(f"--output {output} is a file, not a folder; choose a folder that does not exist yet")
    if SweepFolder(output).spec.exists():
        try:
            read_spec(output)
        except ConfigError as e:
            if "was not written by" in str(e):
                raise ConfigError(f"--output {output} holds a {SPEC_FILE} that diffmem did not write; choose a "
                                  f"folder that does not exist yet") from None
        raise ConfigError(f"{output} already holds a sweep; continue it with --resume {output} "
                          f"or choose another --output")
    try:
        entries = sorted(p.name for p in output.iterdir())
    except OSError as e:
        raise ConfigError(f"--output {output} cannot be read ({e.strerror}); choose a folder that does not exist "
                          f"yet") from None
    if entries:
        more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
        raise ConfigError(f"--output {output} already exists and was not written by diffmem (it holds "
                          f"{entries[0]}{more}); choose a folder that does not exist yet, or an empty one")


# What --resume would silently drop: the sweep's own settings (sweep.json) are what it continues with.
# --address and --no-dashboard only say how Ray starts. --max-concurrent is not honoured either: Tune restores
# its TuneConfig (max_concurrent_trials) and the searcher from the experiment's own files.
RESUME_FIXED = {"factor": "--factor", "values": "--values", "config": "--config", "preset": "--preset",
                "overrides": "--set", "seed": "--seed", "epsilon": "--epsilon", "tolerance": "--tolerance",
                "size_range": "--size-range", "max_concurrent": "--max-concurrent",
                "workers_per_trial": "--workers-per-trial", "gpus_per_trial": "--gpus-per-trial",
                "max_failures": "--max-failures", "ledger": "--ledger", "no_reuse": "--no-reuse",
                "output": "--output", "seeds": "--seeds", "pack_size": "--pack-size", "wandb": "--wandb",
                "mlflow": "--mlflow", "storage": "--storage"}


def check_resume_flags(output: Path, spec: dict, given: set[str]) -> None:
    """--resume continues a sweep as it was started: a flag that would change it is refused, with the sweep's value."""
    own = {"factor": spec["factor"], "values": spec["values"], "config": spec.get("config_file"),
           "preset": spec.get("preset"), "overrides": "its config in sweep.json 'base'",
           "seed": f"train.seed {spec['base'].get('train', {}).get('seed')}", "epsilon": spec["epsilon"],
           "tolerance": spec["tolerance"], "size_range": spec["size_range"],
           "max_concurrent": spec["max_concurrent"] or "what the machine holds",
           "workers_per_trial": spec["workers"] if not spec["gpus_per_worker"] else 1,
           "gpus_per_trial": spec["workers"] * spec["gpus_per_worker"], "max_failures": spec["max_failures"],
           "ledger": spec["ledger"], "no_reuse": spec["no_reuse"], "output": str(output), "seeds": sweep_seeds(spec),
           "pack_size": pack_size(spec), "storage": sweep_storage(spec) or "none",
           **{k: v or "none" for k, v in sweep_tracking(spec).items()}}
    flags = [dest for dest in RESUME_FIXED if dest in given]
    if flags:
        said = ", ".join(f"{RESUME_FIXED[d]} (the sweep's: {own[d]})" for d in flags)
        raise ConfigError(f"--resume {output} continues that sweep with its own settings; drop {said}, or start a "
                          f"new sweep in another --output")


def moved_here(output: Path, spec: dict) -> None:
    """A sweep folder resumed somewhere else than where it was made (moved or copied off a scratch disk): what lies
    inside it (its own ledger) is read here, a shared --ledger outside stays where it is, and sweep.json says so.
    Tune follows by itself (it restores from the path given), the searcher's ledger lookup in EMMSearcher.restore
    and the TensorBoard summary from the trials (sweeps/progress.py)."""
    from sweeps.trainable import relocated
    here, made = str(output.resolve()), spec.get("output")
    if made is None or made == here:   # a sweep.json from before this key: taken to be where it was made
        return
    spec["ledger"], spec["output"] = relocated(spec["ledger"], made, here), here
    write_spec(output, spec)
    print(f"sweep folder moved from {made}: resuming it here")


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
            _remove_empty(folder)
        raise ConfigError(f"--output {output} cannot be created or written ({e.strerror}); choose a folder you can "
                          f"write") from None
    return created


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


STOPPED, STOPPED_BY_SIGTERM = 130, 143   # exit statuses of a sweep stopped before its end (128 + signal number)
REFUSED = 2                               # bad input: one line naming the fix
def _reuse_actors(spec: dict, dashboard: bool) -> bool:
    """A one-worker CPU trial runs in its Tune actor: reusing that process for the next trial saves its start
    (Python, torch and the dataset: ~2 s per trial, measured on 2 cores with Ray 2.60). Not where the dashboard
    runs: it names an actor once, after its start, by the training it began with (sweeps.trainable.named).
    GPU and DDP trials get a fresh actor each, as Ray advises for GPU trials."""
    return not dashboard and not spec["ddp"] and not spec["gpus_per_worker"]


def started(spec: dict, output: Path) -> bool:
    """Tune saved the sweep's experiment (OUTPUT/tune, or URI/tune), so --resume restores it (else it starts it)."""
    from ray import tune

    from sweeps.storage import experiment
    return tune.Tuner.can_restore(experiment(spec, output))


def make_tuner(spec: dict, output: Path, max_concurrent: int, restore: bool, dashboard: bool = False):
    from ray import tune

    from sweeps.progress import (CheckpointPruner, FromStorage, ProgressPrinter, SweepMetrics, SweepTensorBoard,
                                 trial_dirname, trial_name)
    from sweeps.searcher import EMMSearcher, search_algorithm
    from sweeps.storage import experiment, root
    from sweeps.trainable import KnownResults, emm_trial, emm_trial_ddp, named

    settings = trial_settings(spec, output, max_concurrent)
    trainable = tune.with_resources(named(emm_trial_ddp if spec["ddp"] else emm_trial, settings),
                                    trial_resources(spec["ddp"], pack_size(spec)))
    sweep_here(str(output.resolve()), sweep_storage(spec))   # what tuner.pkl's objects follow (a moved folder)
    if restore:
        return tune.Tuner.restore(experiment(spec, output), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    run_config = tune.RunConfig(
        name=TUNE_NAME, storage_path=root(sweep_storage(spec), output), verbose=0,
        callbacks=[ProgressPrinter(spec["epsilon"]), SweepMetrics(output.name),
                   SweepTensorBoard(trial_points(spec), spec["size_range"],
                                    f"EMM sweep over {spec['factor']}", seeds=sweep_seeds(spec)),
                   *([FromStorage(settings)] if sweep_storage(spec) else []),
                   CheckpointPruner(), *tracking.callbacks(sweep_tracking(spec), output)],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=spec["max_failures"]))
    if is_curve(spec):   # every size once, no search
        tune_config = tune.TuneConfig(max_concurrent_trials=max_concurrent, trial_name_creator=trial_name,
                                      trial_dirname_creator=trial_dirname, reuse_actors=_reuse_actors(spec, dashboard))
        return tune.Tuner(trainable, param_space=curve.param_space(spec), tune_config=tune_config,
                          run_config=run_config)
    searcher = EMMSearcher(spec["grid_points"], spec["allowed_sizes"], spec["size_range"], epsilon=spec["epsilon"],
                           tolerance=spec["tolerance"], max_concurrent=max_concurrent,
                           known_results=None if spec["no_reuse"] else KnownResults(settings),
                           seeds=sweep_seeds(spec), base_seed=spec["base"]["train"]["seed"])
    tune_config = tune.TuneConfig(search_alg=search_algorithm(searcher, max_concurrent), num_samples=-1,
                                  trial_name_creator=trial_name, trial_dirname_creator=trial_dirname,
                                  reuse_actors=_reuse_actors(spec, dashboard))
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def collect(spec: dict, output: Path, result_grid) -> tuple:
    """(emm table, trials table, finished): finished when every grid point has its answer (a curve: every size
    its training), else the sweep was stopped (Ctrl-C, SIGTERM) and --resume continues it."""
    import pandas as pd
    from sweeps.results import emm_table, trials_from_search
    from sweeps.bisection import load_experiment_state
    from sweeps.storage import experiment
    frame = result_grid.get_dataframe()
    if is_curve(spec):
        summary, trials, finished = curve.collect(spec, frame)
    else:
        state = load_experiment_state(experiment(spec, output))
        summary, finished = state.summary(), state.finished
        trials = trials_from_search(summary, frame, spec["epsilon"])
    # failed trainings have no metrics; keep their last error line (a trial cancelled before it started has no config)
    failed = [{"grid_label": r.config.get("grid_label"), "size": r.config.get("size"),
               "seed": r.config.get("seed_index", 0), "status": "error",
               "error": str(r.error).strip().splitlines()[-1][:300]}
              for r in result_grid if r.error is not None and r.config]
    if failed:
        trials = pd.concat([trials, pd.DataFrame(failed)], ignore_index=True)
    return emm_table(spec["factor"], summary, trials), trials, finished


def main(argv=None) -> int:
    args = parse_args(argv)
    created, new_ledger = [], False   # what a new sweep made, undone if it is refused before it starts
    try:
        if args.list_factors:
            print(list_factors(read_yaml(args.config).get("sweep") or {}))
            return 0
        if args.status:
            from sweeps.status import sweep_status
            print(sweep_status(Path(args.status)))
            return 0
        if args.estimate:
            if args.resume:
                raise ConfigError("--estimate prices a new sweep; for one under way, --status DIR says the time left")
            from sweeps.estimate import estimate
            print(estimate(build_spec(args), args))
            return 0
        check_address(args.address)   # a cluster that does not answer: before any folder is read or written
        if args.resume:
            output = Path(args.resume)
            spec = read_spec(output)   # before Tune unpickles anything there
            check_resume_flags(output, spec, given_flags(argv))
            moved_here(output, spec)
            Ledger(spec["ledger"])     # an empty, truncated or foreign ledger is refused, not taken for a new one
            check_ledger_writable(spec["ledger"])
        else:
            spec = build_spec(args)
            spec["tracking"] = {"wandb": args.wandb, "mlflow": args.mlflow}
            tracking.check(spec["tracking"])
            spec["storage"] = check_storage(args.storage, pack_size(spec))
            output = Path(args.output) if args.output else default_folder("results", spec["factor"])
            check_new_output(output)
            spec["ledger"] = str(Path(args.ledger or SweepFolder(output).ledger).expanduser().resolve())
            spec["no_reuse"] = args.no_reuse
            spec["output"] = str(output.resolve())   # where it was made: --resume follows a moved folder
            new_ledger = not os.path.lexists(spec["ledger"])
            if not new_ledger:
                Ledger(spec["ledger"])   # an existing file must be a whole diffmem ledger of this version
            created = make_output(output)
            try:
                check_ledger_writable(spec["ledger"])
                Ledger(spec["ledger"])   # created where no file exists
                write_spec(output, spec)
            except (ConfigError, OSError) as e:
                for folder in created:   # nothing left behind by a sweep that never started
                    _remove_empty(folder)
                if isinstance(e, ConfigError):
                    raise
                raise ConfigError(f"--output {output} cannot be written ({e.strerror}); choose a folder you can "
                                  f"write") from None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from sweeps.progress import Tee
    with open(SweepFolder(output).log, "a") as log:   # the console, kept beside the results (appended on --resume)
        sys.stdout, sys.stderr = Tee(sys.stdout, log), Tee(sys.stderr, log)
        try:
            rc = run(args, spec, output)
        finally:
            sys.stdout, sys.stderr = sys.stdout.stream, sys.stderr.stream
    if rc == REFUSED and not args.resume and not started(spec, output):
        unmake_output(output, spec, created, new_ledger)
    return rc


def unmake_output(output: Path, spec: dict, created: list[Path], new_ledger: bool) -> None:
    """A new sweep refused once Ray answered (a cluster that can never place one of its trainings) leaves nothing
    behind, so the same command runs once the cluster is fixed; a ledger that was there before stays."""
    folder = SweepFolder(output)
    for path in [folder.spec, folder.log] + ([Path(spec["ledger"])] if new_ledger else []):
        path.unlink(missing_ok=True)
    for folder in created:
        _remove_empty(folder)


def run(args, spec: dict, output: Path) -> int:
    """Start Ray, run the sweep's Tune experiment (new or restored) and write its results."""
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray
    start = time.time()
    terminated = []

    def on_sigterm(signum, frame):   # a scheduler's stop (SIGTERM) ends the sweep as Ctrl-C does
        terminated.append(signum)
        signal.raise_signal(signal.SIGINT)   # Tune's handler: save the experiment, stop the trials, return

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        max_concurrent = start_ray(args.address, not args.no_dashboard, spec["workers"], spec["gpus_per_worker"],
                                   spec["ddp"], spec["max_concurrent"], pack_size(spec))
        signal.signal(signal.SIGTERM, on_sigterm)   # again: ray.init installs its own (a native abort with a dump)
        if pack_size(spec) > 1:
            from sweeps.packing import start_servers
            start_servers(pack_servers(spec, max_concurrent), threads=1, gpus=spec["gpus_per_worker"])
        seeds = sweep_seeds(spec)
        print(f"sweep {spec['factor']} over {[p['label'] for p in spec['grid_points']]}"
              + (f", {seeds} seeds each" if seeds > 1 else "") + f": "
              f"|D| in {spec['size_range']}, epsilon {spec['epsilon']}, {max_concurrent} trainings at once"
              + (f" in packs of up to {pack_size(spec)}" if pack_size(spec) > 1 else "") + "; "
              f"output {output}")
        print(f"TensorBoard: tensorboard --logdir {SweepFolder(output.resolve()).tensorboard}", flush=True)
        if metrics := metrics_url():
            print(f"Metrics: {metrics}  (Prometheus text: this sweep's ray_diffmem_* gauges beside Ray's own; "
                  f"the dashboard's Metrics tab plots them where Prometheus and Grafana run)", flush=True)
        # a folder whose sweep stopped before Tune saved anything (e.g. no cluster at --address) starts afresh
        restore = bool(args.resume) and started(spec, output)
        tuner = make_tuner(spec, output, max_concurrent, restore=restore, dashboard=not args.no_dashboard)
        result_grid = tuner.fit()
        emm, trials, finished = collect(spec, output, result_grid)
    except ConfigError as e:   # before Tune started: nothing trained
        print(f"error: {e}", file=sys.stderr)
        return REFUSED
    except KeyboardInterrupt:   # before Tune took over the signal (Ray starting): nothing measured yet
        print(f"stopped before the sweep began; start it with --resume {output}", file=sys.stderr)
        return STOPPED_BY_SIGTERM if terminated else STOPPED
    finally:
        ray.shutdown()
        from sweeps.disk import remove_orphaned_run_dirs
        remove_orphaned_run_dirs()   # of trainings killed during the sweep (a lost worker, a stop mid-training)
    from sweeps.results import write_results
    note = "" if finished else (f"Stopped before the end: rows marked open are not known yet; "
                                f"--resume {output} continues.")
    table = write_results(output, spec["factor"], emm, trials, trial_points(spec), spec["epsilon"], note)
    try:   # the table is written: a tracker that fails now costs its copy, not the sweep's result
        tracking.log_table(sweep_tracking(spec), output, spec["factor"], emm, spec["epsilon"])
    except Exception as e:
        print(f"could not log the EMM table to W&B/MLflow: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"\n{spec['factor']}: {len(trials)} trainings in {time.time() - start:.0f} s wall time; "
          f"results in {output}\n")
    print(table)
    if finished:
        return 0
    print(note, file=sys.stderr)
    return STOPPED_BY_SIGTERM if terminated else STOPPED


if __name__ == "__main__":
    raise SystemExit(main())

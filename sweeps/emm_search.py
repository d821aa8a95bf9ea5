"""Find the effective model memorization (EMM) of every value of one factor, with Ray Tune.

    python sweeps/emm_search.py                          # random_labels on the embedded digits
    python sweeps/emm_search.py --factor width --values 8 16 32
    python sweeps/emm_search.py --config experiments/cifar10.yaml --address auto --gpus-per-trial 8 --factor depth
    python sweeps/emm_search.py --resume results/random_labels-20261129-101500

Everything is checked before Ray starts; bad input ends with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:      # `python sweeps/emm_search.py` from a checkout
    sys.path.insert(0, str(ROOT))

from diffmem.config import ConfigError, apply_overrides, from_dict, parse_override, parse_value, read_yaml  # noqa: E402
from diffmem.data import load_dataset  # noqa: E402
from sweeps.factors import FACTORS, get_factor, grid_points  # noqa: E402
from sweeps.ledger import Ledger  # noqa: E402

DEFAULT_CONFIG = ROOT / "experiments" / "digits.yaml"
PRESETS = ROOT / "experiments" / "presets"
SPEC_FILE = "sweep.json"
SPEC_VERSION = 1
TUNE_NAME = "tune"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="emm_search.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factor", default="random_labels", help="factor to sweep (default random_labels)")
    p.add_argument("--values", nargs="+", help="the factor's values (default: the config's, else the paper's)")
    p.add_argument("--list-factors", action="store_true", help="print every factor with its values and exit")
    p.add_argument("--status", metavar="DIR", help="print where the sweep in DIR stands (brackets, trainings "
                                                   "running and finished, time left) and exit")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default experiments/digits.yaml)")
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
    p.add_argument("--ledger", help="results ledger shared across sweeps (default OUTPUT/ledger.sqlite)")
    p.add_argument("--no-reuse", action="store_true", help="train again even what the ledger already holds")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a failed training from its checkpoint before its grid point is unresolved")
    return p.parse_args(argv)


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
    raw = read_with_preset(args.config, args.preset)
    sweep = dict(raw.get("sweep") or {})
    unknown = set(sweep) - {"size_range", "size_step", "factors", "max_values"}
    if unknown:
        raise ConfigError(f"unknown key 'sweep.{sorted(unknown)[0]}'; sweep takes size_range, size_step, "
                          f"factors, max_values")
    overrides = dict(parse_override(o) for o in args.overrides)
    if args.seed is not None:
        overrides["train.seed"] = args.seed
    base_cfg = from_dict(apply_overrides(raw, overrides))       # the config itself loads
    for key in ("path", "mix_path"):   # trials run in their own working directories
        if getattr(base_cfg.data, key):
            setattr(base_cfg.data, key, str(Path(getattr(base_cfg.data, key)).expanduser().resolve()))
    base = base_cfg.to_dict()

    factor = get_factor(args.factor)
    values = [parse_value(v) for v in args.values] if args.values else \
        list((sweep.get("factors") or {}).get(factor.name) or factor.paper_values)
    if sweep.get("max_values") and not args.values and len(values) > int(sweep["max_values"]):
        k = int(sweep["max_values"])   # spread over the list, first and last included
        values = [values[round(i * (len(values) - 1) / max(k - 1, 1))] for i in range(k)]
    points = grid_points(factor, values, base_cfg)

    # Every grid point's config loads and its dataset exists; sizes must fit the smallest of them.
    available = []
    for point in points:
        cfg = from_dict(apply_overrides(base, point["overrides"]))
        available.append(len(load_dataset(cfg.data).labels))
    max_size = min(available)
    step = int(sweep.get("size_step", 1))
    if factor.name == "data_size":
        too_big = [v for v in values if not isinstance(v, int) or v < 1 or v > max_size]
        if too_big:
            raise ConfigError(f"data_size value {too_big[0]!r} must be an integer in [1, {max_size}] "
                              f"(the dataset has {max_size} images)")
        size_range = [min(values), max(values)]
    else:
        size_range = list(args.size_range or sweep.get("size_range") or [step, max_size])
    lo, hi = size_range
    if not 1 <= lo < hi and not (factor.name == "data_size" and lo == hi):   # data_size: one training is fine
        raise ConfigError(f"--size-range {lo} {hi} is impossible; give LO < HI, both >= 1")
    if hi > max_size:
        raise ConfigError(f"--size-range {lo} {hi} goes past the {max_size} images available; use HI <= {max_size}")
    if lo < step:
        raise ConfigError(f"--size-range {lo} {hi} starts below the size step {step} (class-balanced subsets); "
                          f"use LO >= {step}")
    if not 0 < args.epsilon < 1 or args.tolerance <= 0:
        raise ConfigError("--epsilon must be in (0, 1) and --tolerance > 0 (defaults 0.1 and 0.1)")
    if args.workers_per_trial < 1 or args.gpus_per_trial < 0 or args.max_failures < 0:
        raise ConfigError("--workers-per-trial must be >= 1, --gpus-per-trial >= 0 and --max-failures >= 0")
    workers = args.gpus_per_trial or args.workers_per_trial
    if base_cfg.train.batch_size % workers:
        raise ConfigError(f"train.batch_size={base_cfg.train.batch_size} must be divisible by the {workers} "
                          f"workers per trial")
    return {"version": SPEC_VERSION, "factor": factor.name, "values": values, "grid_points": points,
            "base": base, "config_file": str(args.config), "preset": args.preset, "epsilon": args.epsilon,
            "tolerance": args.tolerance, "size_range": size_range,
            "allowed_sizes": list(range(step, max_size + 1, step)),
            "workers": workers, "gpus_per_worker": 1 if args.gpus_per_trial else 0,
            "ddp": args.gpus_per_trial > 0 or args.workers_per_trial > 1, "max_failures": args.max_failures,
            "max_concurrent": args.max_concurrent}


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_spec(output: Path) -> dict:
    path = output / SPEC_FILE
    if not path.is_file():
        raise ConfigError(f"{output} is not a sweep folder (no {SPEC_FILE}); pass the --output folder of a sweep")
    spec = json.loads(path.read_text())
    if spec.get("version") != SPEC_VERSION:
        raise ConfigError(f"{path} was written by another version of emm_search (format {spec.get('version')}); "
                          f"start a new sweep")
    return spec


def write_spec(output: Path, spec: dict) -> None:
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / f".{SPEC_FILE}.tmp"
    tmp.write_text(json.dumps(spec, indent=1, default=str))
    os.replace(tmp, output / SPEC_FILE)


def start_ray(args, spec: dict) -> int:
    """Connect to a cluster or start a local one; returns how many trainings can run at once."""
    import ray
    workers = spec["workers"]
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        cpus = os.cpu_count() or 1
        if spec["gpus_per_worker"]:
            import torch
            slots = max(1, torch.cuda.device_count() // workers)
        else:
            slots = max(1, cpus // workers)
        context = ray.init(num_cpus=cpus, resources={"trial_slot": slots}, include_dashboard=not args.no_dashboard,
                           log_to_driver=False)
        from sweeps.reaper import start_reaper
        start_reaper()   # a killed driver must not leave Ray's agents running
        if not args.no_dashboard:
            url = context.dashboard_url or "127.0.0.1:8265"
            print(f"Ray dashboard: http://{url}  (token auth: header 'Authorization: Bearer' + "
                  f"~/.ray/auth_token, or start with RAY_AUTH_MODE=disabled)")
    resources = ray.cluster_resources()
    if spec["gpus_per_worker"]:
        capacity = int(resources.get("GPU", 0)) // workers
    else:
        capacity = int(resources.get("CPU", 1)) // workers
    if spec["ddp"]:
        capacity = min(capacity, int(resources.get("trial_slot", 0)))
        if capacity < 1:
            raise ConfigError(f"the cluster cannot hold one trial of {workers} workers (resources {resources}); "
                              f"start nodes with --resources='{{\"trial_slot\": N}}' and enough CPUs/GPUs")
    return max(1, min(spec["max_concurrent"] or capacity, capacity))


def _reuse_actors(spec: dict) -> bool:
    """A one-worker CPU trial runs in its Tune actor: reusing that process for the next trial saves its start
    (Python, torch and the dataset: ~2 s per trial on 2 cores, shared/reference/ray-2.60-notes.md). GPU and
    DDP trials get a fresh actor each, as Ray advises for GPU trials."""
    return not spec["ddp"] and not spec["gpus_per_worker"]


def make_tuner(spec: dict, output: Path, max_concurrent: int, restore: bool):
    from ray import tune

    from sweeps.progress import ProgressPrinter, SweepTensorBoard, trial_dirname, trial_name
    from sweeps.searcher import EMMSearcher
    from sweeps.trainable import KnownResults, emm_trial, emm_trial_ddp

    settings = {"base": spec["base"], "epsilon": spec["epsilon"], "output": str(output.resolve()),
                "early_stop": spec["factor"] != "data_size", "workers": spec["workers"],
                "gpus_per_worker": spec["gpus_per_worker"], "threads_per_worker": 1, "ledger": spec["ledger"],
                "max_failures": spec["max_failures"]}
    if spec["ddp"]:   # the trial is a light driver; its Train workers hold the CPUs/GPUs (notes §2b)
        trainable = tune.with_resources(tune.with_parameters(emm_trial_ddp, settings=settings),
                                        {"cpu": 0, "trial_slot": 1})
    else:
        trainable = tune.with_resources(tune.with_parameters(emm_trial, settings=settings), {"cpu": 1})
    experiment = output.resolve() / TUNE_NAME
    if restore:
        return tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
    run_config = tune.RunConfig(
        name=TUNE_NAME, storage_path=str(output.resolve()), verbose=0,
        callbacks=[ProgressPrinter(spec["epsilon"]),
                   SweepTensorBoard(output.resolve(), spec["grid_points"], spec["size_range"],
                                    f"EMM sweep over {spec['factor']}")],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=spec["max_failures"]))
    if spec["factor"] == "data_size":   # the curve itself: every size once, no search
        space = {"grid_index": 0, "grid_label": "data_size", "grid_value": None, "overrides": {},
                 "size": tune.grid_search(spec["values"])}
        tune_config = tune.TuneConfig(max_concurrent_trials=max_concurrent, trial_name_creator=trial_name,
                                      trial_dirname_creator=trial_dirname, reuse_actors=_reuse_actors(spec))
        return tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)
    searcher = EMMSearcher(spec["grid_points"], spec["allowed_sizes"], spec["size_range"], epsilon=spec["epsilon"],
                           tolerance=spec["tolerance"], max_concurrent=max_concurrent,
                           known_results=None if spec["no_reuse"] else KnownResults(settings), max_failures=1)
    tune_config = tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=max_concurrent,
                                  trial_name_creator=trial_name, trial_dirname_creator=trial_dirname,
                                  reuse_actors=_reuse_actors(spec))
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def collect(spec: dict, output: Path, result_grid) -> tuple:
    import pandas as pd
    from sweeps.results import curve_summary, emm_table, trials_from_search, trials_table
    from sweeps.searcher import load_experiment_state
    frame = result_grid.get_dataframe()
    if spec["factor"] == "data_size":
        trials = trials_table(frame, [{"label": "data_size", "value": None}], spec["epsilon"])
        summary = [curve_summary("data_size", "curve", trials, spec["epsilon"])]
    else:
        summary = load_experiment_state(str(output.resolve() / TUNE_NAME)).summary()
        trials = trials_from_search(summary, frame, spec["epsilon"])
    failed = [{"grid_label": r.config.get("grid_label"), "size": r.config.get("size"), "status": "error",
               "error": str(r.error).strip().splitlines()[-1][:300]} for r in result_grid if r.error is not None]
    if failed:   # failed trainings have no metrics; keep their last error line
        trials = pd.concat([trials, pd.DataFrame(failed)], ignore_index=True)
    return emm_table(spec["factor"], summary, trials), trials


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.list_factors:
            print(list_factors(read_yaml(args.config).get("sweep") or {}))
            return 0
        if args.status:
            from sweeps.status import sweep_status
            print(sweep_status(Path(args.status)))
            return 0
        if args.resume:
            output = Path(args.resume)
            spec = read_spec(output)
            if not (output / TUNE_NAME).is_dir():
                raise ConfigError(f"{output} has no Tune experiment to resume ({TUNE_NAME}/ is missing)")
        else:
            spec = build_spec(args)
            output = Path(args.output or f"results/{spec['factor']}-{time.strftime('%Y%m%d-%H%M%S')}")
            if (output / SPEC_FILE).exists():
                raise ConfigError(f"{output} already holds a sweep; continue it with --resume {output} "
                                  f"or choose another --output")
            spec["ledger"] = str(Path(args.ledger or output / "ledger.sqlite").resolve())
            spec["no_reuse"] = args.no_reuse
            Ledger(spec["ledger"])   # an incompatible ledger fails here, before Ray starts
            write_spec(output, spec)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray
    start = time.time()
    try:
        max_concurrent = start_ray(args, spec)
        print(f"sweep {spec['factor']} over {[p['label'] for p in spec['grid_points']]}: "
              f"|D| in {spec['size_range']}, epsilon {spec['epsilon']}, {max_concurrent} trainings at once; "
              f"output {output}")
        tuner = make_tuner(spec, output, max_concurrent, restore=bool(args.resume))
        result_grid = tuner.fit()
        emm, trials = collect(spec, output, result_grid)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    from sweeps.results import write_results
    table = write_results(output, spec["factor"], emm, trials, spec["grid_points"], spec["epsilon"])
    print(f"\n{spec['factor']}: {len(trials)} trainings in {time.time() - start:.0f} s wall time; "
          f"results in {output}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which knobs matter: an Optuna study over several factors at once, at one training-set size |D|.

    python sweeps/explore.py                                  # digits, |D| = 40, 12 trainings
    python sweeps/explore.py --n-trials 30 --output results/explore-1   # run again: 30 more in the same study
    python sweeps/explore.py --factors width labels ema --size 80

The paper varies one factor at a time. Here Ray Tune's OptunaSearch draws width, depth, labels (none, true
classes, C random classes, unique), weight decay and EMA together; every trial is the same training as one
emm_search trial (sweeps.trainable.emm_trial, early stopping off, so the objective is the best memorization
ratio over the whole budget), and at the end Optuna's parameter importances say which factor moves the
memorization ratio most. The study lives in OUTPUT/optuna.sqlite (optuna.load_study(study_name="explore",
storage="sqlite:///OUTPUT/optuna.sqlite")); running again with the same --output adds trials to it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:      # `python sweeps/explore.py` from a checkout
    sys.path.insert(0, str(ROOT))

from diffmem.config import ConfigError, apply_overrides, from_dict, parse_override  # noqa: E402

STUDY_NAME = "explore"
STUDY_FILE = "optuna.sqlite"
SPEC_FILE = "explore.json"
DEFAULT_FACTORS = ("width", "depth", "labels", "weight_decay", "ema")
METRIC = "best_mem_ratio"


def parse_args(argv=None) -> argparse.Namespace:
    from diffmem.cli import DEFAULT_CONFIG, ArgumentParser   # argparse's errors as one line
    p = ArgumentParser(prog="explore.py", description="\n\n".join(__doc__.split("\n\n")[:2]))
    p.add_argument("--factors", nargs="+", default=list(DEFAULT_FACTORS),
                   help=f"factors to draw together (default {' '.join(DEFAULT_FACTORS)}); 'labels' is none / true "
                        f"/ random-C / unique, the others are emm_search factors with the config's values")
    p.add_argument("--size", type=int, default=40, help="training-set size |D| of every trial (default 40)")
    p.add_argument("--n-trials", type=int, default=12, help="trainings to run (default 12, ~10 min on 2 cores)")
    p.add_argument("--label-classes", type=int, default=10, help="C of the random-C labels choice (default 10)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="experiment YAML (default experiments/digits.yaml)")
    p.add_argument("--preset", help="settings laid over the config, e.g. 'smoke' (experiments/presets/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--epsilon", type=float, default=0.1, help="memorized iff best ratio >= 1 - epsilon (0.1)")
    p.add_argument("--sampler", choices=("random", "tpe"), default="random",
                   help="Optuna sampler: random (default; an even spread, best for importances) or tpe")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--max-concurrent", type=int, help="trainings at once (default: one per CPU)")
    p.add_argument("--address", help="an existing Ray cluster ('auto' or host:port); default: start a local one")
    p.add_argument("--no-dashboard", action="store_true", help="start the local cluster without the dashboard")
    p.add_argument("--output", help="output folder (default results/explore-<time>); an earlier one continues "
                                    "its study")
    return p.parse_args(argv)


def labels_overrides(value: str, label_classes: int) -> dict:
    if value in ("none", "true", "unique"):
        return {"data.labels": value}
    if value == f"random-{label_classes}":
        return {"data.labels": "random", "data.label_classes": label_classes}
    raise ConfigError(f"labels value {value!r} must be none, true, random-{label_classes} or unique")


def search_space(factors: list[str], config_sweep: dict, label_classes: int) -> dict[str, list]:
    """{factor: its values}: the config's sweep.factors lists (else the paper's), labels as four choices."""
    from sweeps import curve
    from sweeps.factors import get_factor
    if not factors or len(set(factors)) != len(factors):
        raise ConfigError(f"--factors needs distinct factor names, got {factors}")
    space = {}
    for name in factors:
        if name == "labels":
            space[name] = ["none", "true", f"random-{label_classes}", "unique"]
            continue
        if name in (curve.FACTOR, "random_labels", "class_labels"):
            raise ConfigError(f"factor {name} cannot be explored here: |D| is fixed (--size) and 'labels' "
                              f"covers class and random labels")
        factor = get_factor(name)
        space[name] = list((config_sweep.get("factors") or {}).get(name) or factor.paper_values)
    return space


def trial_overrides(params: dict, base_cfg, label_classes: int) -> dict:
    """Config overrides of one drawn combination, through the same factor registry as emm_search."""
    from sweeps.factors import get_factor
    overrides = {}
    for name, value in sorted(params.items()):
        if name == "labels":
            overrides.update(labels_overrides(value, label_classes))
        else:
            overrides.update(get_factor(name).overrides(value, base_cfg))
    return overrides


def trial_label(params: dict) -> str:
    return ",".join(f"{k}={params[k]}" for k in sorted(params))


def build_spec(args) -> dict:
    from sweeps.spec import read_with_preset
    from diffmem.data import load_dataset
    raw = read_with_preset(args.config, args.preset)
    sweep = raw.pop("sweep", None) or {}
    base_cfg = from_dict(apply_overrides(raw, dict(parse_override(o) for o in args.overrides)))
    for key in ("path", "mix_path"):   # trials run in their own working directories
        if getattr(base_cfg.data, key):
            setattr(base_cfg.data, key, str(Path(getattr(base_cfg.data, key)).expanduser().resolve()))
    base = base_cfg.to_dict()
    space = search_space(args.factors, sweep, args.label_classes)
    # every combination's config loads, and |D| fits the data of each
    datasets = {}
    for combo in itertools.product(*space.values()):
        cfg = from_dict(apply_overrides(base, trial_overrides(dict(zip(space, combo)), base_cfg,
                                                               args.label_classes)))
        datasets.setdefault(json.dumps(vars(cfg.data), sort_keys=True, default=str), cfg.data)
    available = min(len(load_dataset(data).labels) for data in datasets.values())
    if not 1 <= args.size <= available:
        raise ConfigError(f"--size {args.size} must be in [1, {available}] (the images available)")
    if args.n_trials < 1:
        raise ConfigError("--n-trials must be >= 1")
    if not 0 < args.epsilon < 1:
        raise ConfigError("--epsilon must be in (0, 1)")
    return {"factors": list(space), "space": space, "size": args.size, "label_classes": args.label_classes,
            "base": base, "config_file": str(args.config), "preset": args.preset, "epsilon": args.epsilon,
            "sampler": args.sampler}


def explore_trial(config: dict, settings: dict) -> None:
    """One Tune trial: the drawn combination as an emm_search trial (same training, same TensorBoard run)."""
    from diffmem.config import from_dict as load
    from sweeps.trainable import emm_trial
    params = {k: config[k] for k in settings["factors"]}
    overrides = trial_overrides(params, load(settings["base"]), settings["label_classes"])
    emm_trial({"grid_index": 0, "grid_label": trial_label(params), "grid_value": None, "overrides": overrides,
               "size": settings["size"]}, settings)


def _trial_name(trial) -> str:
    return trial_label(trial.config)


def _trial_dirname(trial) -> str:
    label = "".join(ch if ch.isalnum() or ch in "=.,_-" else "_" for ch in trial_label(trial.config))
    return f"{label}_{trial.trial_id}"


def importances(study) -> dict[str, dict[str, float]]:
    """{evaluator: {parameter: importance}} for the finished trials (fANOVA, and Optuna's default, PED-ANOVA)."""
    import optuna
    out = {}
    evaluators = {"fANOVA": optuna.importance.FanovaImportanceEvaluator(seed=0), "default": None}
    for name, evaluator in evaluators.items():
        try:
            out[name] = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except Exception as e:   # too few or constant trials
            out[name] = {"(unavailable)": float("nan")}
            print(f"importances ({name}): {type(e).__name__}: {e}", file=sys.stderr)
    return out


def plot_importances(study, path: Path) -> bool:
    """Optuna's own matplotlib plot of the fANOVA importances, as importances.png; False when too few trials
    make them unavailable (summary_text says so)."""
    import warnings

    import matplotlib
    matplotlib.use("Agg")
    import optuna
    import matplotlib.pyplot as plt
    try:
        with warnings.catch_warnings():   # Optuna marks its matplotlib plots experimental
            warnings.simplefilter("ignore")
            ax = optuna.visualization.matplotlib.plot_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except Exception as e:   # too few or constant trials
        print(f"importances.png: not drawn ({type(e).__name__}: {e})", file=sys.stderr)
        return False
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=110)
    plt.close(ax.figure)
    return True


def summary_text(study, spec: dict) -> str:
    import optuna
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    lines = [f"{len(trials)} finished trainings at |D| = {spec['size']} (memorized: ratio >= "
             f"{1 - spec['epsilon']:.2f})", ""]
    if not trials:
        return "\n".join(lines + ["no finished trainings: no importances"])
    scores = importances(study) if len(trials) >= 2 else {}
    if scores:
        names = list(spec["factors"])
        header = f"{'parameter importance':22s}" + "".join(f"{k:>12s}" for k in scores)
        lines += [header, "-" * len(header)]
        order = sorted(names, key=lambda n: -scores.get("fANOVA", {}).get(n, 0.0))
        for name in order:
            lines.append(f"{name:22s}" + "".join(f"{s.get(name, float('nan')):12.3f}" for s in scores.values()))
        lines.append("(fANOVA: share of the ratio's variance a random forest attributes to each factor; "
                     "default: Optuna's PED-ANOVA)")
    lines += ["", "mean best memorization ratio per value:"]
    for name in spec["factors"]:
        by_value: dict = {}
        for t in trials:
            by_value.setdefault(t.params.get(name), []).append(t.value)
        cells = [f"{v}: {sum(r) / len(r):.3f} ({len(r)})"
                 for v, r in sorted(by_value.items(), key=lambda kv: str(kv[0]))]
        lines.append(f"  {name:14s} " + ", ".join(cells))
    lines += ["", "trainings, highest ratio first:"]
    for t in sorted(trials, key=lambda t: -t.value):
        lines.append(f"  {t.value:.3f}  {trial_label(t.params)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from diffmem.cli import default_folder
    args = parse_args(argv)
    try:
        spec = build_spec(args)
        output = Path(args.output) if args.output else default_folder("results", "explore")
        if (output / SPEC_FILE).is_file():   # continue its study: it must be the same question
            old = json.loads((output / SPEC_FILE).read_text())
            keys = ("space", "size", "base", "epsilon", "label_classes")
            if any(json.dumps(old.get(k), sort_keys=True, default=str)
                   != json.dumps(spec[k], sort_keys=True, default=str) for k in keys):
                raise ConfigError(f"{output} holds a study of other factors, |D| or config; choose another --output")
        output.mkdir(parents=True, exist_ok=True)
        (output / SPEC_FILE).write_text(json.dumps(spec, indent=1, default=str))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import optuna
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.ray_cluster import start_ray, trial_resources
    from sweeps.explore import explore_trial as trainable_fn   # by module name, so Ray's workers import it
    from sweeps.ledger import Ledger
    from sweeps.folder import SweepFolder, sweep_here
    from sweeps.spec import settings_of
    from sweeps.progress import CheckpointPruner, ProgressPrinter, SweepTensorBoard

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    output = output.resolve()
    storage_url = f"sqlite:///{output / STUDY_FILE}"
    ledger = str(SweepFolder(output).ledger)
    Ledger(ledger)
    settings = settings_of(spec["base"], spec["epsilon"], output, ledger, early_stop=False,
                           factors=spec["factors"], size=spec["size"], label_classes=spec["label_classes"])
    sweep_here(str(output))   # SweepTensorBoard's folder
    base_cfg = from_dict(spec["base"])
    points = [{"label": trial_label(dict(zip(spec["space"], combo))),
               "overrides": trial_overrides(dict(zip(spec["space"], combo)), base_cfg, spec["label_classes"])}
              for combo in itertools.product(*spec["space"].values())]
    sampler = optuna.samplers.RandomSampler(seed=args.seed) if args.sampler == "random" else \
        optuna.samplers.TPESampler(seed=args.seed)
    started = time.time()
    try:
        concurrent = start_ray(args.address, not args.no_dashboard, max_concurrent=args.max_concurrent)
        concurrent = min(concurrent, args.n_trials)
        print(f"explore {', '.join(spec['factors'])} at |D| = {spec['size']}: {args.n_trials} trainings, "
              f"{concurrent} at once; study {output / STUDY_FILE}", flush=True)
        searcher = OptunaSearch(metric=METRIC, mode="max", sampler=sampler, study_name=STUDY_NAME,
                                storage=optuna.storages.RDBStorage(storage_url))
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trainable_fn, settings=settings), trial_resources(ddp=False)),
            param_space={name: tune.choice(values) for name, values in spec["space"].items()},
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=args.n_trials,
                                        max_concurrent_trials=concurrent, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(output),
                                      verbose=0, callbacks=[ProgressPrinter(spec["epsilon"], label=trial_label),
                                                            SweepTensorBoard(points, [spec["size"]] * 2,
                                                                             "explore: several factors at once"),
                                                            CheckpointPruner()],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        tuner.fit()
    finally:
        ray.shutdown()
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage_url)
    text = summary_text(study, spec)
    (output / "importances.txt").write_text(text + "\n")
    plot_importances(study, output / "importances.png")
    print(f"\n{text}\n\n{time.time() - started:.0f} s wall time; study {output / STUDY_FILE} "
          f"(optuna.load_study(study_name={STUDY_NAME!r}, storage={storage_url!r}))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

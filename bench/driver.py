"""The driver's limits: how many trials per minute the sweep's driver stack sustains when trainings cost nothing.

Every trial returns at once with a simulated answer: no model, no data subset, no checkpoint. It reads its config's
grid point, |D| and seed, takes its best memorization ratio from a steep logistic in log |D| whose crossing of
1 - epsilon (so its EMM) moves smoothly with the grid index (between about 27 and 240 images, inside the digits'
size range 20..320), rounds it to copies of 256 samples, and reports one result with the keys a diffmem training
reports at its last evaluation (diffmem.train.snapshot_metrics, plus the node it ran on). Everything around it is
the sweep's own code, set up as sweeps/tuner.py's make_tuner does:

    diffmem   EMMSearcher in search_algorithm's wrapper (k-section plans for the free slots, neighbours' ranges),
              KnownResults asking the ledger before every suggestion, and in the trial the real code path of a
              finished training: _report_known (the ledger first), then end_training (its record in the
              ledger, a SQLite file in the run's temporary folder)
    Tune      tune.Tuner with make_tuner's options: named trainable with trial_resources, reuse_actors as
              reuse_actors gives it, trial_name / trial_dirname, storage in a temporary folder, ProgressPrinter,
              SweepTensorBoard and CheckpointPruner, num_to_keep=1, max_failures

Baseline, measured in the same run right after each diffmem run: the same Tuner, trainable, callbacks and
concurrency, with Tune's own BasicVariantGenerator over exactly the configs the searcher suggested (its
points_to_evaluate) and no ledger. The ratio (diffmem's trials/min over Tune's) is what the searcher and the ledger
cost on top of Tune; the callbacks are in both. Two rates each: over the whole fit (Tune's and the actors' start
included), and steady, from the first trial's end to the last one's. A short Tune run before the first measured
one (warm_up) keeps first-use costs out of both. Trials Tune retried after an error are counted and printed.

Ray: the sweep's own start (sweeps.ray_cluster.start_ray(None, dashboard=False)), not a bare ray.init(num_cpus=2):
it is the cluster a local sweep drives (loopback only, its trial_slot resources, one CPU a trial) and it starts
the reaper, so a killed benchmark leaves no Ray processes either; ray.shutdown() runs in any case. Trials at
once: --max-concurrent (default: the machine's CPUs, what start_ray allows).

From the slowest steady rate R (trials/min), the largest cluster the driver keeps up with: N nodes each running
one training of T minutes finish N/T trainings a minute, so N < R x T. Measured with --max-concurrent trials in
flight; a cluster keeps N in flight, and Tune's per-step work grows with the trials it holds, so this is the
driver's pace on this machine, not a promise at any N.

A run of 1000 grid points is several thousand trials; --max-trials N caps each run (the diffmem run stops after N
results, the baseline runs the same configs) and the output says so. --profile runs the driver of each diffmem
run under cProfile and prints where its time went (the wall time is then inflated).

    python bench/driver.py                      # 10, 100 and 1000 grid points
    python bench/driver.py --quick              # 10 and 100 (a few minutes on 2 cores)
    python bench/driver.py --points 1000 --max-trials 1500 --profile
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import logging
import math
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

from ray import tune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import machine_line, write_json  # noqa: E402

EPSILON, TOLERANCE = 0.1, 0.1
EVAL_SAMPLES = 256            # eval.num_samples of experiments/digits.yaml
PLANNED_IMAGES = 64_000       # train.duration 64kimg
EVAL_EVERY = 16_000           # eval.every 16kimg: a memorizing training stops at its first evaluation
SLOPE = 8.0                   # d logit(ratio) / d ln |D|: steep, as the paper's curves are near their crossing
CENTRE, SWING, STEP = math.log(80), 1.1, 0.1   # ln EMM = CENTRE + SWING * sin(STEP * grid index)
CLUSTER_NODES, CLUSTER_TRAINING_MIN = 64, 60   # 64 nodes of 8xA100, one one-hour training each


def emm_crossing(grid_index: int, seed_index: int = 0) -> float:
    """|D| where the simulated curve of a grid point crosses 1 - epsilon; neighbouring points lie close."""
    return math.exp(CENTRE + SWING * math.sin(STEP * grid_index)) * (1 + 0.03 * seed_index)


def simulated_ratio(grid_index: int, size: int, seed_index: int = 0) -> float:
    """Best memorization ratio at |D| = size, as copies of EVAL_SAMPLES samples."""
    logit = math.log((1 - EPSILON) / EPSILON) - SLOPE * math.log(size / emm_crossing(grid_index, seed_index))
    return round(EVAL_SAMPLES / (1 + math.exp(-logit))) / EVAL_SAMPLES


def simulated_metrics(config: dict) -> dict:
    """What a training of this config reports at its end (diffmem.train.snapshot_metrics' keys)."""
    from sweeps.results import interval_of
    ratio = simulated_ratio(config["grid_index"], config["size"], config.get("seed_index", 0))
    low, high = interval_of(ratio, EVAL_SAMPLES)
    seen = EVAL_EVERY if ratio >= 1 - EPSILON else PLANNED_IMAGES
    return {"images_seen": seen, "planned_images": PLANNED_IMAGES, "epoch": seen / config["size"],
            "step": seen // 64, "loss": 0.1, "lr": 2e-3, "mem_ratio": ratio, "mem_ratio_low": low,
            "mem_ratio_high": high, "num_samples": EVAL_SAMPLES, "best_mem_ratio": ratio, "best_mem_ratio_low": low,
            "best_mem_ratio_high": high, "best_num_samples": EVAL_SAMPLES, "eval_stopped_early": 0,
            "images_per_sec": 0.0, "step_seconds": 0.0, "eval_seconds": 0.0}


def simulated_trial(config: dict, settings: dict) -> None:
    """sweeps.trainable.emm_trial with the training replaced by simulated_metrics: the ledger is asked first, the
    result reported, then recorded in the ledger (without a ledger in settings: neither)."""
    from diffmem.train import TrainResult
    from sweeps.trainable import _report_known, end_training, where_this_trains
    if _report_known(settings, config):
        return
    metrics = simulated_metrics(config)
    tune.report(metrics | where_this_trains())
    result = TrainResult(best_mem_ratio=metrics["best_mem_ratio"], images_seen=metrics["images_seen"],
                         steps=metrics["step"], stopped_early=metrics["images_seen"] < PLANNED_IMAGES,
                         history=[metrics], step_seconds=0.0)
    end_training(settings, config, result, writer=None, record=True)


def true_emm(grid_index: int, allowed_sizes: list[int]) -> int | None:
    return max((n for n in allowed_sizes if simulated_ratio(grid_index, n) >= 1 - EPSILON), default=None)


def make_spec(points: int, folder: Path, ledger: str | None):
    """A sweep spec as build_spec makes one: the digits config, `points` grid points that differ in train.seed (so
    in their ledger keys), its size range and allowed sizes."""
    from diffmem.cli import DEFAULT_CONFIG
    from diffmem.config import from_dict, read_yaml
    from diffmem.data import load_dataset
    raw = read_yaml(DEFAULT_CONFIG)
    base = from_dict(raw)
    step, size_range = raw["sweep"]["size_step"], list(raw["sweep"]["size_range"])
    available = len(load_dataset(base.data).labels)
    grid = [{"label": f"point={i}", "value": i, "overrides": {"train.seed": i}} for i in range(points)]
    from sweeps.spec import Sweep
    return Sweep(factor="simulated", values=list(range(points)), grid_points=grid, base=base.to_dict(),
                 epsilon=EPSILON, tolerance=TOLERANCE, size_range=size_range,
                 allowed_sizes=list(range(step, available + 1, step)), workers=1, gpus_per_worker=0, ddp=False,
                 max_failures=2, max_concurrent=None, ledger=ledger, no_reuse=ledger is None,
                 config_file=DEFAULT_CONFIG, output=str(folder))


class Finishes(tune.Callback):
    """The driver's clock at each completion of a trial that reported, and the trials Tune retried after an error."""

    def __init__(self):
        self.times, self.retried = [], 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (trial.last_result or {}).get("best_mem_ratio") is not None:
            self.times.append(time.perf_counter())

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.retried += 1


class StopAfter(tune.Stopper):
    """Ends the experiment once `trials` trials have reported (--max-trials)."""

    def __init__(self, trials: int):
        self.trials, self.seen = trials, set()

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.seen.add(trial_id)
        return False

    def stop_all(self) -> bool:
        return len(self.seen) >= self.trials


def make_tuner(spec, folder: Path, max_concurrent: int, configs: list[dict] | None, max_trials: int | None,
               finishes: Finishes):
    """make_tuner's Tuner around simulated_trial; configs=None: the EMMSearcher with the ledger, else Tune's
    BasicVariantGenerator over those configs."""
    from ray.tune.search import BasicVariantGenerator

    from sweeps.tuner import reuse_actors
    from sweeps.folder import TUNE_NAME, sweep_here
    from sweeps.spec import trial_settings
    from sweeps.progress import CheckpointPruner, ProgressPrinter, SweepTensorBoard, trial_dirname, trial_name
    from sweeps.ray_cluster import trial_resources
    from sweeps.searcher import EMMSearcher, search_algorithm
    from sweeps.trainable import KnownResults, named

    settings = trial_settings(spec, folder, max_concurrent)
    sweep_here(str(folder))
    trainable = tune.with_resources(named(simulated_trial, settings), trial_resources(False, 1))
    stopper = StopAfter(max_trials) if max_trials and configs is None else None
    run_config = tune.RunConfig(
        name=TUNE_NAME, storage_path=str(folder), verbose=0, stop=stopper,
        callbacks=[ProgressPrinter(spec.epsilon),
                   SweepTensorBoard(spec.grid_points, spec.size_range, "driver benchmark"), CheckpointPruner(),
                   finishes],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures))
    if configs is None:
        searcher = EMMSearcher(spec.grid_points, spec.allowed_sizes, spec.size_range, epsilon=spec.epsilon,
                               tolerance=spec.tolerance, max_concurrent=max_concurrent,
                               known_results=KnownResults(settings), seeds=1,
                               base_seed=spec.base["train"]["seed"])
        search, samples = search_algorithm(searcher, max_concurrent), -1
    else:
        search, samples = BasicVariantGenerator(points_to_evaluate=configs, max_concurrent=max_concurrent), len(configs)
    tune_config = tune.TuneConfig(search_alg=search, num_samples=samples, trial_name_creator=trial_name,
                                  trial_dirname_creator=trial_dirname, reuse_actors=reuse_actors(spec, False))
    # Tune takes a preset config only over keys of the param space; None leaves are free to take any value
    space = _blank(configs[0]) if configs else None
    return tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)


def _blank(config: dict) -> dict:
    return {k: _blank(v) if isinstance(v, dict) else None for k, v in config.items()}


def fit(tuner, folder: Path, finishes: Finishes, profiler: cProfile.Profile | None = None) -> tuple[list, dict]:
    """The results of the trials that reported, and their rate; the callbacks' lines go to FOLDER/sweep.log as a
    sweep's do."""
    with open(folder / "sweep.log", "w") as log, contextlib.redirect_stdout(log):
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            grid = tuner.fit()
        finally:
            if profiler is not None:
                profiler.disable()
        wall = time.perf_counter() - start
    done = [r for r in grid if r.error is None and (r.metrics or {}).get("best_mem_ratio") is not None]
    errors = [r for r in grid if r.error is not None]
    if errors:
        raise SystemExit(f"error: {len(errors)} trials failed, e.g. {str(errors[0].error).strip()[-2000:]}")
    return done, rate(len(done), wall, finishes.times) | {"retried": finishes.retried}


def rate(trials: int, wall: float, finished_at: list[float]) -> dict:
    """Over the whole fit (Tune's start, the actors' start, the last snapshot included), and steady: the trials
    after the first one over the time from its end to the last one's."""
    steady_s = finished_at[-1] - finished_at[0] if len(finished_at) > 1 else math.nan
    return {"trials": trials, "wall_s": wall, "trials_per_min": 60 * trials / wall, "steady_s": steady_s,
            "steady_trials_per_min": 60 * (len(finished_at) - 1) / steady_s if steady_s > 0 else math.nan}


def profile_lines(profiler: cProfile.Profile, trials: int, top: int = 12) -> list[str]:
    """Where the driver's time went: diffmem's hooks (cumulative, per trial) and the top functions by own time."""
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    hooks = {("searcher.py", "suggest"): "EMMSearcher.suggest", ("searcher.py", "on_trial_complete"):
             "EMMSearcher.on_trial_complete", ("searcher.py", "save"): "EMMSearcher.save",
             ("bisection.py", "propose"): "EMMSearchState.propose", ("trainable.py", "__call__"):
             "KnownResults (ledger lookup)", ("progress.py", "on_trial_complete"): "ProgressPrinter",
             ("progress.py", "log_trial_end"): "SweepTensorBoard"}
    found = {}
    for (path, _line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.stats.items():
        label = hooks.get((Path(path).name, name))
        if label:
            found[label] = found.get(label, 0.0) + cumulative
    lines = [f"  driver under cProfile: {total:.1f} s (waiting included), {1000 * total / max(trials, 1):.1f} ms "
             f"per trial"]
    lines += [f"  {label}: {seconds:.2f} s cumulative ({seconds / total:.1%}, {1000 * seconds / max(trials, 1):.2f} "
              f"ms per trial)" for label, seconds in sorted(found.items(), key=lambda kv: -kv[1])]
    own = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    lines.append(f"  top {top} by own time:")
    lines += [f"    {tt:7.2f} s  {nc:8d} calls  {Path(path).parent.name}/{Path(path).name}:{line} {name}"
              for (path, line, name), (_cc, nc, tt, _ct, _callers) in own]
    return lines


def measure(points: int, max_concurrent: int, max_trials: int | None, profile: bool) -> dict:
    """One diffmem run and its baseline at `points` grid points, each in its own temporary folder."""
    from sweeps.bisection import load_experiment_state
    from sweeps.folder import TUNE_NAME
    from sweeps.ledger import Ledger
    with tempfile.TemporaryDirectory(prefix="diffmem-driver-") as tmp:
        folder = Path(tmp) / "diffmem"
        folder.mkdir()
        ledger = str(folder / "ledger.sqlite")
        Ledger(ledger)   # created before the sweep, as emm_search.main does
        spec = make_spec(points, folder, ledger)
        profiler = cProfile.Profile() if profile else None
        finishes = Finishes()
        done, ours = fit(make_tuner(spec, folder, max_concurrent, None, max_trials, finishes), folder, finishes,
                         profiler)
        state = load_experiment_state(str(folder / TUNE_NAME))
        rows = state.summary()
        found = sum(r["emm"] is not None and r["high"] is not None
                    and r["emm"] <= true_emm(i, spec.allowed_sizes) < r["high"] for i, r in enumerate(rows))
        recorded = len(Ledger(ledger))
        ours |= {"capped": bool(max_trials) and not state.finished, "finished": state.finished, "resolved": found,
                 "ledger_records": recorded}

        folder = Path(tmp) / "tune"
        folder.mkdir()
        configs = [r.config for r in done]
        finishes = Finishes()
        _, baseline = fit(make_tuner(make_spec(points, folder, None), folder, max_concurrent, configs, None,
                                     finishes), folder, finishes)
    figure = {"grid_points": points, "diffmem": ours, "tune": baseline,
              "ratio": ours["trials_per_min"] / baseline["trials_per_min"],
              "steady_ratio": ours["steady_trials_per_min"] / baseline["steady_trials_per_min"]}
    if profiler is not None:
        figure["profile"] = profile_lines(profiler, len(done))
    return figure


def warm_up(max_concurrent: int) -> float:
    """A short Tune run before the measured ones (Tune's first-use imports, the actors' code from disk), so that
    neither the first diffmem run nor its baseline pays for it alone."""
    with tempfile.TemporaryDirectory(prefix="diffmem-driver-") as tmp:
        folder = Path(tmp)
        configs = [{"grid_index": i, "grid_label": f"point={i}", "grid_value": i, "seed_index": 0, "seeds": 1,
                    "overrides": {"train.seed": i}, "size": 100} for i in range(2 * max_concurrent)]
        finishes = Finishes()
        tuner = make_tuner(make_spec(len(configs), folder, None), folder, max_concurrent, configs, None, finishes)
        _, warm = fit(tuner, folder, finishes)
    return warm["wall_s"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="+", default=[10, 100, 1000], help="grid point counts")
    parser.add_argument("--quick", action="store_true", help="10 and 100 grid points only")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: the machine's CPUs)")
    parser.add_argument("--max-trials", type=int, help="stop each diffmem run after this many trials")
    parser.add_argument("--profile", action="store_true", help="profile the driver of each diffmem run")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "driver.json",
                        help="write the figures here (default bench/results/driver.json)")
    args = parser.parse_args(argv)
    points = [10, 100] if args.quick else args.points

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")   # as emm_search.run
    import ray
    logging.getLogger("ray.tune.tune").setLevel(logging.WARNING)   # "Wrote the latest version ..." after each fit
    # with --max-trials, the trials still pending at the stop have no results, which Tune warns of
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)

    from sweeps.ray_cluster import start_ray
    machine = machine_line(extra=f", Ray {ray.__version__}")
    print(machine)
    figures = []
    try:
        max_concurrent = start_ray(None, dashboard=False, max_concurrent=args.max_concurrent)
        print(f"driver: simulated trials (no training), {max_concurrent} at once, Ray started by "
              f"sweeps.ray_cluster.start_ray" + (f", each diffmem run capped at {args.max_trials} trials"
                                                  if args.max_trials else "")
              + f"; warm-up run {warm_up(max_concurrent):.1f} s", flush=True)
        for n in points:
            fig = measure(n, max_concurrent, args.max_trials, args.profile)
            figures.append(fig)
            ours, alone = fig["diffmem"], fig["tune"]
            capped = f", capped at {args.max_trials} trials" if ours["capped"] else ""
            print(f"driver {n} grid points: diffmem {ours['trials']} trials in {ours['wall_s']:.1f} s "
                  f"({ours['trials_per_min']:.0f} trials/min, steady {ours['steady_trials_per_min']:.0f}){capped}; "
                  f"Tune's BasicVariantGenerator, same trials: {alone['wall_s']:.1f} s ({alone['trials_per_min']:.0f} "
                  f"trials/min, steady {alone['steady_trials_per_min']:.0f}); ratio {fig['ratio']:.2f} (steady "
                  f"{fig['steady_ratio']:.2f}); brackets holding the true EMM {ours['resolved']} of {n}, ledger "
                  f"records {ours['ledger_records']}, trials retried after an error {ours['retried']} (Tune alone "
                  f"{alone['retried']})", flush=True)
            for line in fig.get("profile", []):
                print(line)
    finally:
        ray.shutdown()

    slowest = min(figures, key=lambda f: f["diffmem"]["steady_trials_per_min"])
    pace = slowest["diffmem"]["steady_trials_per_min"]
    nodes = math.ceil(pace * CLUSTER_TRAINING_MIN) - 1   # the largest N with N / T < pace
    need = CLUSTER_NODES / CLUSTER_TRAINING_MIN
    covered = "covered" if need < pace else "NOT covered"
    print(f"driver cluster: the slowest steady pace, {pace:.0f} trials/min ({slowest['grid_points']} grid points), "
          f"keeps up while N/T < {pace:.0f}: up to {nodes:,} nodes of one {CLUSTER_TRAINING_MIN}-min training each; "
          f"{CLUSTER_NODES} nodes x 8xA100 with one-hour trainings need {need:.2f} trials/min: {covered}, margin "
          f"{pace / need:.0f}x")
    result = {"machine": machine, "max_concurrent": max_concurrent, "max_trials": args.max_trials,
              "figures": figures, "cluster": {"pace_trials_per_min": pace, "training_min": CLUSTER_TRAINING_MIN,
                                              "max_nodes": nodes, "need_64_nodes": need, "margin": pace / need}}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()

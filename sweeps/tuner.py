"""The sweep's Ray Tune experiment: the Tuner of a new or restored sweep (its trainable, searcher or grid,
callbacks and storage), and what it leaves once it returns (the EMM and trials tables). Used by emm_search.py."""
from __future__ import annotations

from pathlib import Path

from sweeps import curve, tracking
from sweeps.curve import is_curve
from sweeps.folder import TUNE_NAME, sweep_here
from sweeps.ray_cluster import trial_resources
from sweeps.spec import Sweep, trial_points, trial_settings


def reuse_actors(spec: Sweep, dashboard: bool) -> bool:
    """A one-worker CPU trial runs in its Tune actor: reusing that process for the next trial saves its start
    (Python, torch and the dataset: ~2 s per trial, measured on 2 cores with Ray 2.60). Not where the dashboard
    runs: it names an actor once, after its start, by the training it began with (sweeps.trainable.named).
    GPU and DDP trials get a fresh actor each, as Ray advises for GPU trials."""
    return not dashboard and not spec.ddp and not spec.gpus_per_worker


def started(spec: Sweep, output: Path) -> bool:
    """Tune saved the sweep's experiment (OUTPUT/tune, or URI/tune), so --resume restores it (else it starts it)."""
    from ray import tune

    from sweeps.storage import experiment
    return tune.Tuner.can_restore(experiment(spec, output))


def make_tuner(spec: Sweep, output: Path, max_concurrent: int, restore: bool, dashboard: bool = False):
    from ray import tune

    from sweeps.progress import (CheckpointPruner, FromStorage, ProgressPrinter, SweepMetrics, SweepTensorBoard,
                                 trial_dirname, trial_name)
    from sweeps.searcher import EMMSearcher, search_algorithm
    from sweeps.storage import experiment, root
    from sweeps.trainable import KnownResults, emm_trial, emm_trial_ddp, named

    settings = trial_settings(spec, output, max_concurrent)
    trainable = tune.with_resources(named(emm_trial_ddp if spec.ddp else emm_trial, settings),
                                    trial_resources(spec.ddp, spec.pack_size))
    sweep_here(str(output.resolve()), spec.storage)   # what tuner.pkl's objects follow (a moved folder)
    if restore:
        return tune.Tuner.restore(experiment(spec, output), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    run_config = tune.RunConfig(
        name=TUNE_NAME, storage_path=root(spec.storage, output), verbose=0,
        callbacks=[ProgressPrinter(spec.epsilon), SweepMetrics(output.name),
                   SweepTensorBoard(trial_points(spec), spec.size_range,
                                    f"EMM sweep over {spec.factor}", seeds=spec.seeds),
                   *([FromStorage(settings)] if spec.storage else []),
                   CheckpointPruner(), *tracking.callbacks(spec.tracking, output)],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures))
    trials = {"trial_name_creator": trial_name, "trial_dirname_creator": trial_dirname,
              "reuse_actors": reuse_actors(spec, dashboard)}
    if is_curve(spec):   # every size once, no search
        return tune.Tuner(trainable, param_space=curve.param_space(spec), run_config=run_config,
                          tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, **trials))
    searcher = EMMSearcher(spec.grid_points, spec.allowed_sizes, spec.size_range, epsilon=spec.epsilon,
                           tolerance=spec.tolerance, max_concurrent=max_concurrent,
                           known_results=None if spec.no_reuse else KnownResults(settings),
                           seeds=spec.seeds, base_seed=spec.base["train"]["seed"])
    return tune.Tuner(trainable, run_config=run_config, tune_config=tune.TuneConfig(
        search_alg=search_algorithm(searcher, max_concurrent), num_samples=-1, **trials))


def collect(spec: Sweep, output: Path, result_grid) -> tuple:
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
        trials = trials_from_search(summary, frame, spec.epsilon)
    # failed trainings have no metrics; keep their last error line (a trial cancelled before it started has no config)
    failed = [{"grid_label": r.config.get("grid_label"), "size": r.config.get("size"),
               "seed": r.config.get("seed_index", 0), "status": "error",
               "error": str(r.error).strip().splitlines()[-1][:300]}
              for r in result_grid if r.error is not None and r.config]
    if failed:
        trials = pd.concat([trials, pd.DataFrame(failed)], ignore_index=True)
    return emm_table(spec.factor, summary, trials), trials, finished

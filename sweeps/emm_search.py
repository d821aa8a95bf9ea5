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
import os
import signal
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:      # `python sweeps/emm_search.py` from a checkout
    sys.path.insert(0, str(ROOT))

from diffmem.cli import DEFAULT_CONFIG, ArgumentParser, default_folder  # noqa: E402
from diffmem.config import ConfigError, read_yaml  # noqa: E402
from sweeps import tracking  # noqa: E402
from sweeps.factors import FACTORS, get_factor  # noqa: E402
from sweeps.folder import (SweepFolder, check_ledger_writable, make_output,  # noqa: E402
                           remove_empty, unmake_output)
from sweeps.ledger import Ledger  # noqa: E402
from sweeps.ray_cluster import check_address, metrics_url, start_ray  # noqa: E402
from sweeps.spec import (Sweep, build_spec, check_new_output, check_resume_flags, moved_here, pack_servers,  # noqa: E402
                         read_spec, trial_points, write_spec)
from sweeps.tuner import collect, make_tuner, started  # noqa: E402


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


STOPPED, STOPPED_BY_SIGTERM = 130, 143   # exit statuses of a sweep stopped before its end (128 + signal number)
REFUSED = 2                               # bad input: one line naming the fix


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
            Ledger(spec.ledger)     # an empty, truncated or foreign ledger is refused, not taken for a new one
            check_ledger_writable(spec.ledger)
        else:
            output = Path(args.output) if args.output else default_folder("results", get_factor(args.factor).name)
            spec = build_spec(args, output)
            tracking.check(spec.tracking)
            check_new_output(output)
            new_ledger = not os.path.lexists(spec.ledger)
            if not new_ledger:
                Ledger(spec.ledger)   # an existing file must be a whole diffmem ledger of this version
            created = make_output(output)
            try:
                check_ledger_writable(spec.ledger)
                Ledger(spec.ledger)   # created where no file exists
                write_spec(output, spec)
            except (ConfigError, OSError) as e:
                for folder in created:   # nothing left behind by a sweep that never started
                    remove_empty(folder)
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


def run(args, spec: Sweep, output: Path) -> int:
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
        max_concurrent = start_ray(args.address, not args.no_dashboard, spec.workers, spec.gpus_per_worker,
                                   spec.ddp, spec.max_concurrent, spec.pack_size)
        signal.signal(signal.SIGTERM, on_sigterm)   # again: ray.init installs its own (a native abort with a dump)
        if spec.pack_size > 1:
            from sweeps.packing import start_servers
            start_servers(pack_servers(spec, max_concurrent), threads=1, gpus=spec.gpus_per_worker)
        seeds = spec.seeds
        print(f"sweep {spec.factor} over {[p['label'] for p in spec.grid_points]}"
              + (f", {seeds} seeds each" if seeds > 1 else "") + f": "
              f"|D| in {spec.size_range}, epsilon {spec.epsilon}, {max_concurrent} trainings at once"
              + (f" in packs of up to {spec.pack_size}" if spec.pack_size > 1 else "") + "; "
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
    table = write_results(output, spec.factor, emm, trials, trial_points(spec), spec.epsilon, note)
    try:   # the table is written: a tracker that fails now costs its copy, not the sweep's result
        tracking.log_table(spec.tracking, output, spec.factor, emm, spec.epsilon)
    except Exception as e:
        print(f"could not log the EMM table to W&B/MLflow: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"\n{spec.factor}: {len(trials)} trainings in {time.time() - start:.0f} s wall time; "
          f"results in {output}\n")
    print(table)
    if finished:
        return 0
    print(note, file=sys.stderr)
    return STOPPED_BY_SIGTERM if terminated else STOPPED


if __name__ == "__main__":
    raise SystemExit(main())

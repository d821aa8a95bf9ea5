"""Ray Tune Searcher that runs the EMM search (sweeps/bisection.py) over several grid points at once.

Each Tune trial trains one model at one training-set size |D| for one grid point and reports its best
(running-max) memorization ratio; the trial is "memorized" iff that ratio >= 1 - epsilon (paper.md §3).

Ray 2.60 behaviour this relies on (read in ray/tune/search/{searcher,search_generator}.py and
ray/tune/execution/tune_controller.py):
- `suggest` returning None means "nothing now, ask again later"; returning `Searcher.FINISHED` is sticky:
  the SearchGenerator never calls suggest again, but trials already running finish and are still passed
  to `on_trial_complete`.
- `on_trial_complete(trial_id, result, error)` gets `result = flatten_dict(trial.last_result)`: the last
  reported dict plus Tune's auto-filled keys, with nested dicts flattened by "/" ("config/size", ...).
  A trial that errors (after Tune's own retries) arrives with result=None, error=True; a trial stopped
  before it ran (PENDING/PAUSED) arrives with result=None, error=False.
- `TuneConfig(max_concurrent_trials=N)` wraps the searcher in a ConcurrencyLimiter (search_algorithm() does the
  same, in a SweepSearchGenerator), which calls `set_max_concurrency(N)`; returning True hands the limit to this
  class (it plans k-section probes for N workers). Without a ConcurrencyLimiter Tune keeps only one trial
  pending at a time for custom searchers (tune_controller._get_max_pending_trials).
- Tune calls `save(path)` on every experiment snapshot and `restore(path)` in `Tuner.restore`, on the
  searcher unpickled from tuner.pkl. The class must live in an importable module (this one) so it is
  pickled by reference. State is only as fresh as the last snapshot, so ids may come back unknown or twice.
"""
from __future__ import annotations

import copy
import json
import logging
import math

from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher

from sweeps.bisection import SAVE_FORMAT, SAVE_VERSION, EMMSearchState

logger = logging.getLogger(__name__)


def search_algorithm(searcher: "EMMSearcher", max_concurrent: int) -> SearchGenerator:
    """What Tune would wrap the searcher in for TuneConfig(max_concurrent_trials=N), with a generator that
    follows a moved sweep folder (SweepSearchGenerator)."""
    return SweepSearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=max_concurrent))


class SweepSearchGenerator(SearchGenerator):
    """Tune's own generator, except on restore. Ray 2.60 brings back the Experiment it held when its state was
    saved (SearchGenerator.set_state), with the storage path of where the sweep folder then was: the trials it
    creates after a moved or copied folder is resumed write their checkpoints there and fail ("Unable to set up
    cluster storage ... storage_fs_path=<old path>"), and their grid points would end unresolved. The restored
    Experiment's storage is pointed at where the folder (or --storage) is now (sweeps.folder.here)."""

    def set_state(self, state: dict) -> None:
        from sweeps.folder import here
        from sweeps.storage import filesystem, root
        super().set_state(state)
        output, storage = here()
        if output is not None and self._experiment is not None:
            for s in {id(s): s for s in (self._experiment.storage, self._experiment.spec.get("storage"))
                      if s is not None}.values():
                s.storage_fs_path = filesystem(root(storage, output))[1]


class EMMSearcher(Searcher):
    """Suggests {"grid_index", "grid_label", "grid_value", "seed_index", "seeds", "overrides", "size"} trial
    configs. Seed s > 0 of a grid point trains with the override train.seed = base_seed + s; seed 0 has the grid
    point's overrides alone, so it is the training a one-seed sweep runs (the same ledger key)."""

    def __init__(self, grid_points, allowed_sizes, size_range, epsilon: float = 0.1, tolerance: float = 0.1,
                 max_concurrent: int = 2, metric: str = "best_mem_ratio", mode: str = "max",
                 unresolved_after: int = 1, known_results=None, seeds: int = 1, base_seed: int | None = None):
        """unresolved_after: failed trainings at one size before the grid point is unresolved; 1 under Tune, whose
        FailureConfig (--max-failures) has already retried a training before it reports the failure here.
        known_results: optional callable, trial config -> the ledger's record of that training or None;
        a training the ledger holds is observed at once instead of being run again.
        seeds: searches per grid point, one per training seed; base_seed: the sweep's train.seed (needed
        with seeds > 1)."""
        if mode != "max":
            raise ValueError(f"EMMSearcher compares the memorization ratio against 1 - epsilon, so mode must "
                             f"be 'max', got {mode!r}")
        super().__init__(metric=metric, mode=mode)
        if int(max_concurrent) < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        if seeds > 1 and not isinstance(base_seed, int):
            raise ValueError(f"{seeds} seeds need the sweep's train.seed as base_seed, got {base_seed!r}")
        self.max_concurrent = int(max_concurrent)
        self.base_seed = base_seed
        self.state = EMMSearchState(grid_points, allowed_sizes, size_range, epsilon=epsilon,
                                    tolerance=tolerance, unresolved_after=unresolved_after, seeds=seeds)
        self._running: dict[str, tuple[int, int]] = {}    # trial_id -> (bracket index, size)
        self._completed: set[str] = set()                 # ids whose completion was counted
        self._plan: list[tuple[int, int]] = []            # planned for the free slots, not yet launched
        self.known_results = known_results
        self.from_ledger: list[tuple[int, int]] = []      # (bracket index, size) the ledger answered

    # ---- Tune hooks ----
    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self.max_concurrent = int(max_concurrent)
        self._plan.clear()
        return True     # we limit concurrency ourselves (and plan k-section probes for that many workers)

    def suggest(self, trial_id: str):
        while True:
            if self.state.finished:
                return Searcher.FINISHED
            free = self.max_concurrent - len(self._running)
            if free <= 0 or trial_id in self._running or trial_id in self._completed:
                return None
            probe = self._next_probe(free)
            if probe is None:
                return None          # waiting for running trials
            bracket, size = probe
            config = self.probe_config(bracket, size)
            self.state.start(bracket, size)
            known = self.known_results(config) if self.known_results is not None else None
            if known is None:
                self._running[trial_id] = probe
                return config
            # the ledger already holds this training: observe it (costing nothing) and plan again
            self.state.observe(bracket, size, known[self.metric], images=0.0, samples=known["best_num_samples"])
            self.from_ledger.append(probe)
            self._plan.clear()

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed:
            logger.debug("EMMSearcher: trial %s completed twice; ignoring the second", trial_id)
            return
        if not error and result is not None and result.get("done") is False and not self._final(result):
            # Stopped mid-training (Ctrl-C): its running max is not its answer yet. It stays pending and
            # its completion after --resume counts.
            logger.debug("EMMSearcher: trial %s stopped before its answer was final", trial_id)
            return
        probe = self._running.pop(trial_id, None) or self._adopt(trial_id, result)
        if probe is None:
            logger.debug("EMMSearcher: ignoring unknown trial %s", trial_id)
            return
        self._completed.add(trial_id)
        self._plan.clear()           # new information: plan again
        bracket, size = probe
        if error:
            self.state.fail(bracket, size, f"trial {trial_id} errored")
        elif result is None:
            self.state.cancel(bracket, size)       # stopped before it ran: propose the size again
        else:
            ratio = result.get(self.metric)
            if not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
                self.state.fail(bracket, size, f"trial {trial_id} reported {self.metric}={ratio!r}")
            else:
                # a restored trial the ledger answered (sweeps.trainable._report_known) trained nothing here
                images = 0.0 if result.get("from_ledger") == 1 else float(result.get("images_seen") or 0)
                self.state.observe(bracket, size, float(ratio), images=images,
                                   samples=int(result.get("best_num_samples") or 0))

    def _final(self, result: dict) -> bool:
        """A running max that already reached 1 - epsilon is final: it can only grow."""
        ratio = result.get(self.metric)
        return isinstance(ratio, (int, float)) and math.isfinite(ratio) and self.state.settings.memorized(ratio)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump(self.to_dict(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.load_dict(json.load(f))
        # the ledger lookup was unpickled with the paths of where the sweep was made (a moved or copied folder)
        from sweeps.folder import here
        output, _ = here()
        if output is not None and hasattr(self.known_results, "moved_to"):
            self.known_results.moved_to(output)

    # ---- helpers ----
    def probe_config(self, bracket: int, size: int) -> dict:
        """The Tune trial config of a probe: the training at `size` of one bracket, its grid point, seed, overrides."""
        grid_index, seed = self.state.replicate(bracket)
        point = self.state.grid_points[grid_index]
        overrides = copy.deepcopy(point.get("overrides", {}))
        if seed > 0:   # seed 0 keeps the grid point's own overrides: a one-seed sweep's training, same ledger key
            overrides["train.seed"] = overrides.get("train.seed", self.base_seed) + seed
        return {"grid_index": grid_index, "grid_label": point["label"], "grid_value": point.get("value"),
                "seed_index": seed, "seeds": self.state.seeds, "overrides": overrides, "size": size}

    def to_dict(self) -> dict:
        return {"format": SAVE_FORMAT, "version": SAVE_VERSION, "metric": self.metric,
                "state": self.state.to_dict(),
                "running": {tid: list(p) for tid, p in self._running.items()},
                "completed": sorted(self._completed), "from_ledger": [list(p) for p in self.from_ledger]}

    def load_dict(self, d: dict) -> None:
        if d.get("format") != SAVE_FORMAT or d.get("version") != SAVE_VERSION:
            raise ValueError(f"cannot restore searcher state {d.get('format')!r} "
                             f"version {d.get('version')!r}; "
                             f"this code reads {SAVE_FORMAT!r} version {SAVE_VERSION}")
        self._metric = d["metric"]
        self.state = EMMSearchState.from_dict(d["state"])
        self._running = {tid: (int(g), int(s)) for tid, (g, s) in d["running"].items()}
        self._completed = set(d["completed"])
        # "reused": its name in snapshots before one vocabulary (issue 14.5)
        self.from_ledger = [(int(g), int(s)) for g, s in d.get("from_ledger", d.get("reused", []))]
        self._plan = []

    def _next_probe(self, free: int) -> tuple[int, int] | None:
        """The next probe of the current plan. The plan covers all free slots at once, so that several
        probes for one bracket are k-section points rather than repeated halvings."""
        if not self._plan:
            self._plan = self.state.propose(free)
        return self._plan.pop(0) if self._plan else None

    def _adopt(self, trial_id: str, result: dict | None) -> tuple[int, int] | None:
        """A trial we never suggested but whose config is ours: Tune restarted a trial under a new id
        (Tuner.restore with restart_errored=True, or a trial suggested after the last snapshot)."""
        if not result:
            return None
        config = result.get("config") if isinstance(result.get("config"), dict) else {}
        grid_index = result.get("config/grid_index", config.get("grid_index"))
        seed = result.get("config/seed_index", config.get("seed_index", 0))   # a trial of before seeds: seed 0
        size = result.get("config/size", config.get("size"))
        if not all(isinstance(x, int) for x in (grid_index, seed, size)):
            return None
        if not (0 <= grid_index < len(self.state.grid_points) and 0 <= seed < self.state.seeds
                and size in self.state.settings.allowed_sizes):
            return None
        probe = (self.state.bracket_index(grid_index, seed), size)
        # the old id of a restarted trial will never report: forget it so its slot is freed
        for old_id, running in list(self._running.items()):
            if running == probe:
                del self._running[old_id]
                break
        logger.debug("EMMSearcher: adopting trial %s as grid point %d, seed %d, size %d", trial_id, grid_index,
                     seed, size)
        return probe

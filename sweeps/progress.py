"""What the console shows while a sweep runs, and how trials are named in Tune and on disk."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ray import tune
from ray.tune.logger import TBXLoggerCallback

from sweeps.results import ratio_text
from sweeps.tblog import ratio_label, seed_tag, trial_label

logger = logging.getLogger(__name__)


def trial_name(trial) -> str:
    """Readable in the Ray dashboard and Tune's tables: 'random_labels=10|D|=120' (sweeps.tblog.trial_label)."""
    return trial_label(trial.config)


def trial_dirname(trial) -> str:
    label = "".join(ch if ch.isalnum() or ch in "=._-" else "_" for ch in str(trial.config.get("grid_label")))
    tag = seed_tag(trial.config)
    return f"{label}_D={trial.config.get('size')}{f'_{tag}' if tag else ''}_{trial.trial_id}"


class ProgressPrinter(tune.Callback):
    """One console line per finished training: what it measured and what that decides."""

    def __init__(self, epsilon: float):
        self.epsilon, self.started = epsilon, time.time()

    def _line(self, text: str) -> None:
        print(f"[{time.time() - self.started:6.0f} s] {text}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        best = r.get("best_mem_ratio")
        if best is None:
            return
        verdict = "memorized" if best >= 1 - self.epsilon else "not memorized"
        early = ", stopped early" if r.get("images_seen", 0) < r.get("planned_images", 0) else ""
        running = sum(t.status == "RUNNING" and t is not trial for t in trials)
        ratio = ratio_text(best, r.get("best_mem_ratio_low"), r.get("best_mem_ratio_high"))
        self._line(f"{trial_name(trial):30s} best ratio {ratio}: {verdict}{early} ({running} still running)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(f"{trial_name(trial)} failed; its error is in {trial.local_path}")


class SweepTensorBoard(TBXLoggerCallback):
    """Takes the place of Tune's own TensorBoard logger (a TBXLoggerCallback, so Tune adds none of its own):
    Tune's copies (ray/tune/* scalars in tune/<trial>/ and an HParams table of its raw trial configs, which
    would compete with the sweep's table) are left out, because the trials write the sweep's TensorBoard
    themselves (sweeps/tblog.py). This writes the HParams experiment when the first training starts and one
    point of memorization ratio against |D| per grid point as each training finishes (tensorboard/summary).

    The sweep folder is found from the trials (beside their Tune experiment), not kept: this object is pickled
    into tune/tuner.pkl and comes back from there on --resume, also when the folder was moved or copied."""

    def __init__(self, grid_points: list, size_range, description: str = "", seeds: int = 1):
        # Tune's logger state is not set up: none of its methods runs (all three hooks are replaced)
        self.grid_points, self.size_range, self.description, self.seeds = \
            grid_points, list(size_range), description, seeds
        self._live = None

    def setup(self, *args, **kwargs):
        pass

    def _open(self, trial) -> None:
        """The summary writer of the sweep folder that holds `trial`'s experiment (OUTPUT/tune)."""
        if getattr(self, "_live", None) is not None:
            return
        from sweeps.tblog import LiveSummary, write_experiment
        output = str(Path(trial.storage.experiment_fs_path).parent)
        self._live = LiveSummary(output)
        try:   # TensorBoard is for watching: a failure here must not fail the sweep
            # unpickled from the tuner.pkl of a sweep before --seeds: one seed
            write_experiment(output, self.grid_points, self.size_range, self.description, getattr(self, "seeds", 1))
        except Exception as e:
            logger.warning("could not write the HParams experiment to TensorBoard: %s", e)

    def log_trial_start(self, trial):
        self._open(trial)

    def log_trial_result(self, iteration, trial, result):
        pass

    def log_trial_end(self, trial, failed: bool = False):
        result = trial.last_result or {}
        best = result.get("best_mem_ratio")
        label, size = trial.config.get("grid_label"), trial.config.get("size")
        if failed or best is None or label is None or size is None:
            return
        try:
            self._open(trial)
            self._live.add(ratio_label(trial.config), int(size), float(best), result.get("best_mem_ratio_low"),
                           result.get("best_mem_ratio_high"))
        except Exception as e:
            logger.warning("could not write to TensorBoard: %s", e)

    def on_experiment_end(self, trials, **info):
        if self._live is not None:
            self._live.close()

    def __getstate__(self):   # pickled with the Tuner (tuner.pkl): no open writer
        return {**self.__dict__, "_live": None}

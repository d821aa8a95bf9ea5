"""What the console shows while a sweep runs, and how trials are named in Tune and on disk."""
from __future__ import annotations

import time

from ray import tune


def trial_name(trial) -> str:
    """Readable in the Ray dashboard and Tune's tables: 'random_labels=10|D|=120'."""
    return f"{trial.config.get('grid_label')}|D|={trial.config.get('size')}"


def trial_dirname(trial) -> str:
    label = "".join(ch if ch.isalnum() or ch in "=._-" else "_" for ch in str(trial.config.get("grid_label")))
    return f"{label}_D={trial.config.get('size')}_{trial.trial_id}"


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
        self._line(f"{trial_name(trial):30s} best ratio {best:.3f}: {verdict}{early} ({running} still running)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(f"{trial_name(trial)} failed; its error is in {trial.local_path}")

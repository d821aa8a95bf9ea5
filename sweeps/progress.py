"""The sweep's Tune callbacks (what the console and TensorBoard show while it runs, what it keeps on disk) and
how trials are named in Tune and on disk."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ray import tune
from ray.tune.logger import TBXLoggerCallback

from sweeps.bisection import memorized
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


PROGRESS_EVERY_S = 60   # a line on the running trainings when nothing else was printed for this long
METRICS_EVERY_S = 5     # the gauges' refresh; Ray exports them every few seconds anyway
TRIAL_STATES = {"TERMINATED": "finished", "RUNNING": "running", "ERROR": "failed"}   # any other: pending


class SweepMetrics(tune.Callback):
    """The sweep's progress as Prometheus gauges from the driver (ray.util.metrics), served at its node's metrics
    port with Ray's own metrics (the address printed at start; Ray's Prometheus scrapes it, and the dashboard's
    Metrics tab and Grafana plot it): ray_diffmem_trainings{sweep, state} counts the sweep's trainings finished,
    from the ledger, running, pending and failed; ray_diffmem_training_images_seen and
    ray_diffmem_training_best_ratio{sweep, training} follow each training (README "What you see")."""

    def __init__(self, sweep: str, every: float = METRICS_EVERY_S):
        self.sweep, self.every = sweep, every
        self._gauges, self._last = None, 0.0

    def __getstate__(self) -> dict:   # tune/tuner.pkl keeps the settings, not Ray's metric objects
        return {"sweep": self.sweep, "every": self.every}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["sweep"], state.get("every", METRICS_EVERY_S))

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self._last >= self.every:
            self.publish(trials)

    def on_experiment_end(self, trials, **info):
        self.publish(trials)

    def publish(self, trials) -> None:
        from ray.util.metrics import Gauge
        self._last = time.time()
        if self._gauges is None:
            self._gauges = (
                Gauge("diffmem_trainings", "the sweep's trainings by state", tag_keys=("sweep", "state")),
                Gauge("diffmem_training_images_seen", "images a training has seen", tag_keys=("sweep", "training")),
                Gauge("diffmem_training_best_ratio", "a training's best memorization ratio so far",
                      tag_keys=("sweep", "training")))
        counts, images, best = self._gauges
        states = dict.fromkeys(("finished", "from_ledger", "running", "pending", "failed"), 0)
        for t in trials:
            r = t.last_result or {}
            if r.get("from_ledger"):   # answered, not trained: no training to follow
                states["from_ledger"] += 1
                continue
            states[TRIAL_STATES.get(t.status, "pending")] += 1
            tags = {"sweep": self.sweep, "training": trial_label(t.config)}
            if r.get("images_seen") is not None:
                images.set(r["images_seen"], tags=tags)
            if r.get("best_mem_ratio") is not None:
                best.set(r["best_mem_ratio"], tags=tags)
        for state, count in states.items():
            counts.set(count, tags={"sweep": self.sweep, "state": state})


class ProgressPrinter(tune.Callback):
    """One console line per finished training: what it measured and what that decides; between them, every
    PROGRESS_EVERY_S, one line on the trainings running (images seen of planned, best ratio so far). Plain
    lines, no colour or carriage returns: they read the same in a log file (OUTPUT/sweep.log)."""

    def __init__(self, epsilon: float, every: float = PROGRESS_EVERY_S, label=trial_label):
        """label: a training's name from its trial config (explore.py names its trainings its own way)."""
        self.epsilon, self.every, self.label = epsilon, every, label
        self.started = self.last_line = time.time()

    def __setstate__(self, state: dict) -> None:
        # Tune pickles the callbacks into tune/tuner.pkl and --resume takes them from there, written by the
        # diffmem that started the sweep (perhaps an older one): keep only what the sweep set, and let the
        # console's clock start with this run
        self.epsilon = state["epsilon"]
        self.every = state.get("every", PROGRESS_EVERY_S)
        self.label = state.get("label", trial_label)
        self.started = self.last_line = time.time()

    def _line(self, text: str) -> None:
        self.last_line = time.time()
        print(f"[{self.last_line - self.started:6.0f} s] {text}", flush=True)

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self.last_line < self.every:
            return
        running = [t for t in trials if t.status == "RUNNING"]
        if not running:
            return
        parts = []
        for t in running:
            r = t.last_result or {}
            seen, planned, best = r.get("images_seen"), r.get("planned_images"), r.get("best_mem_ratio")
            part = f"{seen:,} of {planned:,} images" if seen is not None and planned else "starting"
            if best is not None:
                part += (f", best ratio so far "
                         f"{ratio_text(best, r.get('best_mem_ratio_low'), r.get('best_mem_ratio_high'))}")
            parts.append(f"{self.label(t.config)} ({part})")
        finished = sum(t.status == "TERMINATED" for t in trials)   # before a --resume too
        self._line(f"{finished} trainings finished; running: {'; '.join(parts)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        best = r.get("best_mem_ratio")
        if best is None:
            return
        verdict = "memorized" if memorized(best, self.epsilon) else "not memorized"
        early = ", stopped early" if r.get("images_seen", 0) < r.get("planned_images", 0) else ""
        running = sum(t.status == "RUNNING" and t is not trial for t in trials)
        ratio = ratio_text(best, r.get("best_mem_ratio_low"), r.get("best_mem_ratio_high"))
        self._line(f"{self.label(trial.config):30s} best ratio {ratio}: {verdict}{early} ({running} still running)")

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A training failed (its process or its node lost) and Tune runs it again, from its last checkpoint."""
        r = trial.last_result or {}
        where = f" on node {r['train_node_ip']} ({r['train_node_id'][:8]})" if r.get("train_node_id") else ""
        why = _last_error_line(trial)
        why = f" ({why})" if why else ""
        saved = trial.latest_checkpoint_result
        seen = saved.metrics.get("images_seen") if saved is not None else None
        resume = f"from its checkpoint at {seen:,} images" if seen else "from the start (no checkpoint yet)"
        self._line(f"{self.label(trial.config)} failed{where}{why}; retry {trial.num_failures} of "
                   f"{trial.max_failures}, {resume}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(f"{self.label(trial.config)} failed; its error is in {trial.path}")   # OUTPUT/tune/<trial>


def _last_error_line(trial) -> str:
    """The last line of a trial's latest error (Tune's error.txt beside its results), e.g. "the actor's node was
    terminated unexpectedly: health check failed ..."; '' if there is none yet."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


class CheckpointPruner(tune.Callback):
    """A finished training's checkpoints are removed as it ends: it is in the ledger and Tune never runs a finished
    trial again, so nothing reads them (sweeps/disk.py). A failed training keeps its own: the retry, or --resume
    after a stop, continues from them. Through the trial's storage: the sweep folder or --storage."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        from sweeps.folder import TRAIN_NAME
        from sweeps.storage import empty_checkpoints, join
        try:   # disk hygiene: a failure here must not fail the sweep
            fs = trial.storage.storage_filesystem
            empty_checkpoints(fs, trial.storage.trial_fs_path)
            empty_checkpoints(fs, join(trial.storage.storage_fs_path, TRAIN_NAME, f"train_{trial.trial_id}"))
        except Exception as e:
            logger.warning("could not remove the checkpoints of %s: %s", trial, e)


class FromStorage(tune.Callback):
    """With --storage (sweeps/storage.py) the trials write nothing into the sweep folder; as each training ends,
    this records it in the ledger (from its last report and the driver's own ledger key) and brings its
    TensorBoard run from URI/tensorboard into OUTPUT/tensorboard. Before CheckpointPruner in the callbacks."""

    def __init__(self, settings: dict):
        self.settings = settings

    def _settings(self) -> dict:
        """The settings with where the sweep folder is now (a moved folder, sweeps.folder.sweep_here)."""
        from sweeps.folder import here
        from sweeps.trainable import settings_moved_to
        output, _ = here()
        return self.settings if output is None else settings_moved_to(self.settings, output)

    def on_trial_complete(self, iteration, trials, trial, **info):
        settings, result = self._settings(), trial.last_result or {}
        if result.get("best_mem_ratio") is not None and not result.get("from_ledger") and settings.get("ledger"):
            from sweeps.ledger import Ledger
            from sweeps.trainable import trial_key
            key, resolved, context = trial_key(settings, trial.config)
            Ledger(settings["ledger"]).put(key, resolved, context, result, result["step_seconds"])
        self._bring_tensorboard(settings, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._bring_tensorboard(self._settings(), trial)   # what it wrote up to its last checkpoint

    @staticmethod
    def _bring_tensorboard(settings: dict, trial) -> None:
        from sweeps.folder import TENSORBOARD
        from sweeps.storage import download, filesystem, join
        from sweeps.tblog import tensorboard_dir, training_run
        try:   # TensorBoard is for watching: a failure here must not fail the sweep
            fs, path = filesystem(settings["storage"])
            download(fs, join(path, TENSORBOARD, training_run(trial.config)),
                     tensorboard_dir(settings["output"]) / training_run(trial.config))
        except Exception as e:
            logger.warning("could not bring the TensorBoard run of %s from %s: %s", trial, settings["storage"], e)


class SweepTensorBoard(TBXLoggerCallback):
    """Takes the place of Tune's own TensorBoard logger (a TBXLoggerCallback, so Tune adds none of its own):
    Tune's copies (ray/tune/* scalars in tune/<trial>/ and an HParams table of its raw trial configs, which
    would compete with the sweep's table) are left out, because the trials write the sweep's TensorBoard
    themselves (sweeps/tblog.py). This writes the HParams experiment when the first training starts and one
    point of memorization ratio against |D| per grid point as each training finishes (tensorboard/summary).

    The sweep folder is the driver's (sweeps.folder.here), not kept: this object is pickled into tune/tuner.pkl and
    comes back from there on --resume, also when the folder was moved or copied."""

    def __init__(self, grid_points: list, size_range, description: str = "", seeds: int = 1):
        # Tune's logger state is not set up: none of its methods runs (all three hooks are replaced)
        self.grid_points, self.size_range, self.description, self.seeds = \
            grid_points, list(size_range), description, seeds
        self._live = None

    def setup(self, *args, **kwargs):
        pass

    def _open(self, trial) -> None:
        """The summary writer of the sweep folder."""
        if getattr(self, "_live", None) is not None:
            return
        from sweeps.folder import here
        from sweeps.tblog import LiveSummary, write_experiment
        output, _ = here()
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


# When a node's raylet dies, Ray sends the driver its last 20 log lines, a dump of its internal state (Ray 2.60):
# they stay in the node's raylet.out; the console keeps the message's own lines.
RAY_STATE_DUMP = "[state-dump]"


class Tee:
    """A console stream that also writes to a log file (OUTPUT/sweep.log): what the user saw, kept."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        if RAY_STATE_DUMP in text:   # a lost raylet's last log lines, one message: its first line says what happened
            text = "".join(line for line in text.splitlines(keepends=True) if RAY_STATE_DUMP not in line)
        self.stream.write(text)
        if not self.log.closed:   # Ray's log handler keeps this stream after the sweep has ended
            self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        if not self.log.closed:
            self.log.flush()

    def __getattr__(self, name):   # isatty, fileno, encoding: the console's
        return getattr(self.stream, name)

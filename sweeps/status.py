"""`emm_search.py --status DIR`: where a sweep stands, read from its output folder only.

Sources: sweep.json (grid points, epsilon, tolerance), the Tune experiment's newest searcher snapshot
(tune/searcher-state-*.pkl, through sweeps.bisection.load_experiment_state), Tune's experiment snapshot
(tune/experiment_state-*.json: which trials run), each trial folder's result.json (its last report), and
the results ledger for training times when no trial folder has them. Works on a running sweep (as fresh as
Tune's last snapshot, every few seconds), an interrupted one, and a finished one. Every best ratio is shown with
its 95 % interval over the evaluation's samples, "0.980 [0.951, 0.992]" (diffmem.memorization.ratio_interval).
With several training seeds a grid point's line gives the seeds' median (sweeps.bisection.seed_median), then
the seeds' EMMs and interval, then each seed's own bracket and ratios.

The time left is an estimate: per open bracket (grid point and seed) the bisection steps still needed to narrow
it to the tolerance, ceil(log2(log(high / low) / log(1 + tolerance))), less the trainings already running there,
times the mean training time so far, shared among the trainings that run at once.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from sweeps.curve import is_curve, status_lines
from sweeps.ledger import recorded_step_seconds
from sweeps.results import interval_of, ratio_text, seed_emm_text
from sweeps.folder import SweepFolder
from sweeps.spec import read_spec
from sweeps.storage import children, experiment, filesystem, read_text
from sweeps.tblog import trial_label

IDLE_AFTER_S = 600      # no file of the sweep changed for this long: nothing is running


@dataclass
class TrialRecord:
    trial_id: str
    grid_label: str | None
    size: int | None
    name: str = ""                        # sweeps.tblog.trial_label: grid point, |D| and seed
    status: str = "UNKNOWN"               # Tune's: PENDING, RUNNING, TERMINATED, ERROR, PAUSED
    best_mem_ratio: float | None = None
    best_mem_ratio_low: float | None = None   # its 95 % interval (diffmem.memorization.ratio_interval)
    best_mem_ratio_high: float | None = None
    images_seen: int | None = None
    planned_images: int | None = None
    seconds: float | None = None          # training time so far (Tune's time_total_s)
    from_ledger: bool = False
    extra: dict = field(default_factory=dict)


def _read_json_lines(text: str | None) -> list[dict]:
    rows = []
    for line in (text or "").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass        # a line being written right now
    return rows


def read_trials(experiment: str) -> dict[str, TrialRecord]:
    """Every trial Tune started, by trial id: config from params.json, last report from result.json, status
    from the newest experiment snapshot. `experiment`: the Tune experiment's path or --storage URI."""
    fs, tune_dir = filesystem(experiment)
    trials: dict[str, TrialRecord] = {}
    for folder, _ in children(fs, tune_dir, folders=True):
        trial_id = folder.rsplit("/", 1)[-1].rsplit("_", 1)[-1]
        try:
            config = json.loads(read_text(fs, f"{folder}/params.json") or "")
        except ValueError:
            continue
        record = TrialRecord(trial_id, config.get("grid_label"), config.get("size"), trial_label(config))
        results = _read_json_lines(read_text(fs, f"{folder}/result.json"))
        if results:
            _take_result(record, results[-1])
        trials[trial_id] = record
    snapshots = children(fs, tune_dir, "experiment_state-*.json")
    if snapshots:
        try:
            state = json.loads(read_text(fs, snapshots[-1][0]) or "")
        except ValueError:
            state = {"trial_data": []}
        for meta_text, runtime_text in state.get("trial_data", []):
            try:
                meta, runtime = json.loads(meta_text), json.loads(runtime_text)
            except (TypeError, ValueError):
                continue
            config = meta.get("config") or {}
            record = trials.setdefault(meta["trial_id"], TrialRecord(meta["trial_id"], config.get("grid_label"),
                                                                     config.get("size"), trial_label(config)))
            record.status = meta.get("status", record.status)
            if record.best_mem_ratio is None and runtime.get("last_result"):
                _take_result(record, runtime["last_result"])
    return trials


def _take_result(record: TrialRecord, result: dict) -> None:
    record.best_mem_ratio = result.get("best_mem_ratio", record.best_mem_ratio)
    record.best_mem_ratio_low = result.get("best_mem_ratio_low", record.best_mem_ratio_low)
    record.best_mem_ratio_high = result.get("best_mem_ratio_high", record.best_mem_ratio_high)
    record.images_seen = result.get("images_seen", record.images_seen)
    record.planned_images = result.get("planned_images", record.planned_images)
    record.seconds = result.get("time_total_s", record.seconds)
    record.from_ledger = bool(result.get("from_ledger", False))


def last_activity(experiment: str, output: Path) -> float | None:
    """Newest modification time among the files a running sweep keeps writing (Tune's snapshots and trial
    results in its experiment, a path or --storage URI; the trainings' TensorBoard events); None if none."""
    fs, tune_dir = filesystem(experiment)
    times = [mtime for _, mtime in children(fs, tune_dir)]
    times += [mtime for folder, _ in children(fs, tune_dir, folders=True)
              for _, mtime in children(fs, folder, "result.json")]
    for path in SweepFolder(output).tensorboard.glob("*/D=*/events.*"):
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            continue
    times = [t for t in times if t is not None]
    newest = max(times) if times else None
    return newest


def remaining_steps(bracket, tolerance: float) -> int:
    """Trainings an open bracket still needs: bisection steps to narrow it to the tolerance (or to
    neighbouring sizes), less the trainings already running inside it."""
    from sweeps.bisection import OPEN
    if bracket.status != OPEN:
        return 0
    lo_index, _, hi_index, _ = bracket.edges()
    sizes = bracket.settings.allowed_sizes
    by_width = math.log(sizes[hi_index] / sizes[lo_index]) / math.log(1 + tolerance)
    steps = min(math.ceil(math.log2(max(by_width, 1.0))), math.ceil(math.log2(max(hi_index - lo_index, 1))))
    return max(0, steps - sum(bracket.pending.values()))


def _fmt_seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def best_text(t: TrialRecord) -> str:
    return ratio_text(t.best_mem_ratio, t.best_mem_ratio_low, t.best_mem_ratio_high)


def _fmt_int(x) -> str:
    return "-" if x is None else str(int(x))


def _searching(bracket) -> str:
    """' searching 20..80': the sizes an open bracket still searches."""
    lo_index, _, hi_index, _ = bracket.edges()
    sizes = bracket.settings.allowed_sizes
    return f" searching {sizes[lo_index]}..{sizes[hi_index]}"


def _seed_lines(replicate: dict, bracket, seed: int | None) -> list[str]:
    """The best ratios one search observed, with their intervals; with several seeds headed by the seed's status
    and bracket. The searcher holds each best ratio with the samples behind it, which give its interval."""
    ratios = ", ".join(f"{s}: {ratio_text(r, *interval_of(r, n))}{' memorized' if m else ''}"
                       for s, r, m, n in sorted(replicate["observations"]))
    if seed is None:
        return [f"{'':30s}{ratios}"] if ratios else []
    known = f"[{_fmt_int(replicate['emm'])}, {_fmt_int(replicate['high'])})"
    if replicate["status"] == "open":
        known += _searching(bracket)
    return [f"{'':30s}seed {seed}: {replicate['status']} {known}" + (f"; {ratios}" if ratios else "")]


def sweep_status(output: str | Path, now: float | None = None) -> str:
    """The status report of the sweep in `output` (what `--status DIR` prints)."""
    output = Path(output)
    spec = read_spec(output, "status")   # a garbage, foreign or incomplete sweep.json is one line
    now = time.time() if now is None else now
    epsilon, tolerance = spec.epsilon, spec.tolerance
    trials = read_trials(experiment(spec, output))
    running = [t for t in trials.values() if t.status in ("RUNNING", "PENDING")]
    done = [t for t in trials.values() if t.status == "TERMINATED" and t.best_mem_ratio is not None]
    failed = [t for t in trials.values() if t.status == "ERROR"]

    state, searcher_from_ledger = None, []
    if not is_curve(spec):
        from sweeps.bisection import EMMSearchState
        from sweeps.bisection import load_experiment_searcher
        try:
            saved = load_experiment_searcher(experiment(spec, output))
            state = EMMSearchState.from_dict(saved["state"])
            # answered by the ledger without a Tune trial (a restored trial that found its record is a Tune
            # trial marked from_ledger instead)
            searcher_from_ledger = [(int(g), int(s)) for g, s in saved.get("from_ledger", saved.get("reused", []))]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            state, searcher_from_ledger = None, []

    activity = last_activity(experiment(spec, output), output)
    table = SweepFolder(output).emm_csv
    if is_curve(spec):
        curve_lines, curve_left, finished_search = status_lines(spec, done, running)
    else:
        finished_search = state is not None and state.finished
    if finished_search and not running:
        overall = "finished" if table.is_file() else "finished searching; writing its tables"
    elif finished_search:
        overall = f"finishing: every bracket is closed, {len(running)} leftover trainings still listed"
    elif table.is_file() and (activity is None or table.stat().st_mtime >= activity - 1):
        overall = f"stopped before the end (its table says what is open); continue with --resume {output}"
    elif activity is not None and now - activity < IDLE_AFTER_S:
        overall = "running"
    elif activity is None:
        overall = "not started yet (no Tune snapshot)"
    else:
        overall = (f"not running: nothing changed for {_fmt_seconds(now - activity)}; "
                   f"continue with --resume {output}")

    lines = [f"sweep {spec.factor} in {output}: {overall}",
             f"  memorized: best ratio >= {1 - epsilon:.2f} (epsilon {epsilon}); brackets close at "
             f"high/low <= {1 + tolerance:g}; |D| range {spec.size_range}"]
    if activity is not None:
        lines.append(f"  last activity {_fmt_seconds(now - activity)} ago")
    lines.append("")

    header = f"{'grid point':28s} {'status':11s} {'bracket [low, high)':22s} {'EMM':>5s}  trainings"
    lines += [header, "-" * len(header)]
    steps_left = 0
    if state is not None:
        for index, point in enumerate(state.summary()):
            brackets = state.seed_brackets(index)
            known = f"[{_fmt_int(point['emm'])}, {_fmt_int(point['high'])})"
            if point["status"] == "open" and state.seeds == 1:
                known += _searching(brackets[0])
            mine_running = [t for t in running if t.grid_label == point["label"]]
            emm = _fmt_int(point["emm"]) if point["status"] != "open" else "?"
            from_ledger = (sum(state.replicate(b)[0] == index for b, _ in searcher_from_ledger)
                           + sum(t.from_ledger for t in done if t.grid_label == point["label"]))
            lines.append(f"{point['label']:28s} {point['status']:11s} {known:22s} {emm:>5s}  "
                         f"{len(point['observations'])} done"
                         + (f" ({from_ledger} from the ledger)" if from_ledger else "")
                         + f", {len(mine_running)} running")
            if state.seeds > 1:
                lines.append(f"{'':30s}seeds' EMMs {' '.join(seed_emm_text(r) for r in point['replicates'])}; "
                             f"interval [{_fmt_int(point['interval_low'])}, {_fmt_int(point['interval_high'])})")
            for seed, (replicate, bracket) in enumerate(zip(point["replicates"], brackets)):
                lines += _seed_lines(replicate, bracket, seed if state.seeds > 1 else None)
            if point.get("error"):
                lines.append(f"{'':30s}error: {point['error']}")
            steps_left += sum(remaining_steps(b, tolerance) for b in brackets)
    elif is_curve(spec):
        lines += curve_lines
        steps_left += curve_left

    lines.append("")
    if running and overall != "running":   # Tune's last snapshot still lists them, but nothing runs
        lines.append(f"left unfinished ({len(running)}), resumed from their checkpoints by --resume:")
        for t in sorted(running, key=lambda t: (str(t.grid_label), t.size or 0, t.name)):
            lines.append(f"  {t.name}")
    elif running:
        lines.append(f"running ({len(running)}):")
        for t in sorted(running, key=lambda t: (str(t.grid_label), t.size or 0, t.name)):
            progress = ""
            if t.images_seen and t.planned_images:
                progress = (f", {t.images_seen:,} of {t.planned_images:,} images, best ratio so far "
                            f"{best_text(t)}")
            lines.append(f"  {t.name} ({t.status.lower()}{progress})")
    else:
        lines.append("running: none")
    seconds = [t.seconds for t in done if t.seconds and not t.from_ledger]
    source = "these trainings"
    if not seconds:
        seconds, source = recorded_step_seconds(spec.ledger), "the ledger's, training steps alone: a low bound"
    mean = sum(seconds) / len(seconds) if seconds else None
    from_ledger = sum(t.from_ledger for t in done) + len(searcher_from_ledger)
    lines.append(f"finished trainings: {len(done) + len(searcher_from_ledger)}"
                 + (f" ({from_ledger} from the ledger)" if from_ledger else "")
                 + (f", {len(failed)} failed" if failed else "")
                 + (f"; mean {_fmt_seconds(mean)} per training ({source})" if mean else ""))

    if finished_search and not running:
        lines.append("time left: none (finished)")
    elif mean is None:
        lines.append(f"time left: unknown until a training finishes ({steps_left} more trainings at least)")
    else:
        slots = max(len([t for t in running if t.status == "RUNNING"]), int(spec.max_concurrent or 0), 1)
        if not running and not spec.max_concurrent:
            slots = max(1, (os.cpu_count() or 1) // int(spec.workers))
        running_left = sum(max(mean - (t.seconds or 0.0), 0.0) for t in running)
        left = (steps_left * mean + running_left) / slots
        lines.append(f"time left: about {_fmt_seconds(left)} ({steps_left} more trainings after the "
                     f"{len(running)} running, {slots} at once, {_fmt_seconds(mean)} each)")
    return "\n".join(lines)

"""--estimate: what a sweep is expected to cost before anything starts (emm_search.py --estimate, study.py
--estimate): trainings from the searcher itself, run to its end on simulated curves, and seconds from training
steps and one evaluation timed on this machine."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from diffmem.config import apply_overrides, from_dict
from sweeps.ray_cluster import local_slots, trials_at_once

if TYPE_CHECKING:
    from sweeps.spec import Sweep

ESTIMATE_POSITIONS = 8    # EMM positions, log-spaced over the size range, the search is simulated at
ESTIMATE_STEPS = 10       # training steps timed per model, after as many untimed ones


@dataclass(frozen=True)
class Estimate:
    """What --estimate prints (text) and its figures, each (median, worst) over the simulated EMM positions."""
    text: str
    trainings: tuple[int, int]
    wall_seconds: tuple[float, float]
    device_hours: tuple[float, float]

    def __str__(self) -> str:
        return self.text


_SPEEDS: dict = {}   # measured step and evaluation speeds by model, kept across estimates (a study prices many)


def estimate(spec: Sweep, args) -> Estimate:
    """What the sweep is expected to cost, before anything starts: trainings from the searcher itself
    (sweeps.bisection.simulate) run to its end with the crossing at ESTIMATE_POSITIONS places in the size
    range, training images from each training's planned duration, seconds from training steps and one
    evaluation timed on this machine (diffmem.train.measure_speed)."""
    from statistics import median_high

    import torch
    from diffmem.config import duration_images
    from diffmem.train import measure_speed
    from diffmem.evaluate import sequential_test
    from sweeps.bisection import EMMSearchState, simulate
    from sweeps import curve
    from sweeps.spec import trial_points, trial_settings
    from sweeps.trainable import trial_config

    workers, gpu = spec.workers, bool(spec.gpus_per_worker)
    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    if args.address:
        slots = max(1, spec.max_concurrent or 1)
    else:
        slots = trials_at_once(spec.max_concurrent, local_slots(workers, spec.gpus_per_worker) * spec.pack_size)
    pack = min(spec.pack_size, slots)   # trainings sharing one worker's steps
    lo, hi = spec.size_range
    points, is_curve = trial_points(spec), curve.is_curve(spec)

    def config(point, size, extra=None):
        return from_dict(apply_overrides(spec.base, {**point["overrides"], "data.size": size, **(extra or {})}))

    # Speed: each distinct model (what a grid point changes that matters for speed), at the largest |D|, at one
    # worker's share of the batch, one thread per worker on CPU as in the sweep's trials.
    speeds, speed_of = _SPEEDS, []
    threads = torch.get_num_threads()
    try:
        if device == "cpu":
            torch.set_num_threads(1)
        for point in points:
            real = config(point, hi)
            samples = min(real.eval.batch_size, real.eval.num_samples, 64 if device == "cpu" else 512)
            cfg = config(point, hi, {"train.device": device,
                                     "train.batch_size": max(1, real.train.batch_size // workers),
                                     "eval.num_samples": samples, "eval.batch_size": samples})
            key = cfg.to_dict()
            for name in ("lr", "weight_decay", "ema_schedule", "ema_halflife", "ema_beta", "ema_rampup", "seed",
                         "duration"):
                key["train"][name] = None   # no bearing on the time of a step
            key = json.dumps([key, pack, workers], sort_keys=True, default=str)
            if key not in speeds:   # seconds each: say so on stderr, the estimate itself goes to stdout
                print(f"estimate: timing {point['label']}'s model ({2 * ESTIMATE_STEPS} training steps, one "
                      f"evaluation)", file=sys.stderr, flush=True)
                measured = measure_speed(cfg, ESTIMATE_STEPS, ESTIMATE_STEPS, pack=pack)
                speeds[key] = {   # one training = `workers` times one worker (linear scaling), or 1/pack of a pack's
                    "images_per_sec": workers * measured["images_per_sec"] / pack,
                    # sampling and the nearest-neighbour search grow linearly with the samples; DDP spreads them;
                    # a pack waits for its members' evaluations one after another
                    "eval_seconds": pack * measured["eval_seconds"] * real.eval.num_samples / samples / workers,
                    "batch": cfg.train.batch_size, "samples": samples, "num_samples": real.eval.num_samples}
            speed_of.append(speeds[key])
    finally:
        torch.set_num_threads(threads)

    settings = trial_settings(replace(spec, ledger=None, no_reuse=True), Path("."))   # the trials' configs

    def eval_share(g: int, size: int, memorized: bool) -> float:
        """The share of eval.num_samples one evaluation of that training samples at a ratio of 1 (memorized) or 0:
        the adaptive test's first look that decides (1: all, as with eval.adaptive false or a curve)."""
        test = sequential_test(trial_config(settings, {"overrides": points[g]["overrides"], "size": size}).eval)
        if test is None:
            return 1.0
        look = next(k for k, n in enumerate(test.looks) if test.decide(k, n if memorized else 0) is not None)
        return test.looks[look] / test.looks[-1]

    def cost(g: int, size: int, memorized: bool) -> tuple[int, float]:
        """(training images, seconds) of one training of grid point g at |D| = size, run to its end."""
        cfg = config(points[g], size)
        images = duration_images(cfg.train.duration, size, "train.duration")
        snapshots = math.ceil(images / duration_images(cfg.eval.every, size, "eval.every"))
        return images, (images / speed_of[g]["images_per_sec"]
                        + snapshots * speed_of[g]["eval_seconds"] * eval_share(g, size, memorized))

    if is_curve:   # no search: every size once, to its end
        scenarios = [(curve.estimate_rounds(spec, slots), math.inf)]
    else:
        crossings = [lo * (hi / lo) ** ((k + 0.5) / ESTIMATE_POSITIONS) for k in range(ESTIMATE_POSITIONS)]
        scenarios = []
        for crossing in crossings:   # memorized up to the crossing, not beyond: a monotone curve
            state = EMMSearchState(points, spec.allowed_sizes, spec.size_range, epsilon=spec.epsilon,
                                   tolerance=spec.tolerance, seeds=spec.seeds)
            scenarios.append((simulate(state, lambda g, n, seed, c=crossing: 1.0 if n <= c else 0.0, slots), crossing))
    figures = []
    for rounds, crossing in scenarios:
        costs = [[cost(g, n, n <= crossing) for g, n in batch] for batch in rounds]
        figures.append({"trainings": sum(len(b) for b in rounds),
                        "images": sum(i for batch in costs for i, _ in batch),
                        "wall": sum(max(s for _, s in batch) for batch in costs),
                        "device_hours": workers * sum(s for batch in costs for _, s in batch) / pack / 3600})

    def typical(key):
        return median_high([f[key] for f in figures]), max(f[key] for f in figures)

    trainings, images, wall, hours = (typical(k) for k in ("trainings", "images", "wall", "device_hours"))
    unit = "GPU-hours" if gpu else "core-hours"
    rates = sorted({round(s["images_per_sec"]) for s in speed_of})
    evals = sorted({s["eval_seconds"] for s in speed_of})
    if is_curve:
        what, count = f"{len(spec.values)} sizes", f"{trainings[0]} trainings"
    else:
        what = f"{len(points)} grid point{'s' * (len(points) > 1)}"
        count = f"{trainings[0]} trainings (median) / {trainings[1]} (worst)"
    lines = [f"estimate: {spec.factor}, {what}, {slots} training"
             f"{'s' * (slots > 1)} at once" + (f" in packs of {pack}" if pack > 1 else "")
             + f": {count}, <= {_count(images[1])} training images, measured "
             f"{_span(rates, _count)} images/s on {device} (+ evaluation {_span(evals, _seconds)} per snapshot): "
             f"~{duration_text(wall[0])} wall, "
             f"{_hours(hours[0])} {unit}"
             + (f" (worst ~{duration_text(wall[1])}, {_hours(hours[1])})" if len(figures) > 1 else "")]
    if not is_curve:
        lines.append(f"  trainings: sweeps/bisection.py's search run to its end with the EMM at {ESTIMATE_POSITIONS} "
                     f"sizes log-spaced over |D| in [{lo}, {hi}], median and worst; trainings a ledger holds are not "
                     f"repeated, so a shared --ledger can only lower them")
    durations = sorted({config(p, hi).train.duration for p in points})
    lines.append(f"  training images: each training's planned train.duration ({', '.join(durations)}) at its |D|"
                 + (" (a curve trains every size to its end)" if is_curve else
                    ", an upper bound: early stopping at 1 - epsilon only shortens a training"))
    batches = sorted({s["batch"] for s in speed_of})
    samples = sorted({s["samples"] for s in speed_of})
    num_samples = sorted({s["num_samples"] for s in speed_of})
    lines.append(f"  speed: {ESTIMATE_STEPS} timed training steps of each grid point's model at |D| = {hi}, batch "
                 f"{'/'.join(map(str, batches))} per worker on {device}"
                 + (", 1 thread per worker" if device == "cpu" else "")
                 + (f"; one evaluation of {'/'.join(map(str, samples))} samples, scaled to eval.num_samples = "
                    f"{'/'.join(map(str, num_samples))}" if samples != num_samples else
                    f"; one evaluation of eval.num_samples = {'/'.join(map(str, num_samples))} samples")
                 + (f"; {workers} workers per training count as {workers}x one worker's images/s and 1/{workers} "
                    f"of its evaluation (linear scaling assumed; the gradient all-reduce makes it less)"
                    if workers > 1 else ""))
    if not is_curve:
        high_share, low_share = (sorted({eval_share(g, hi, m) for g in range(len(points))}) for m in (True, False))
        if max(high_share + low_share) < 1:
            lines.append(f"  evaluation: adaptive (eval.adaptive), a snapshot samples {_span(high_share, _share)} of "
                         f"eval.num_samples at a ratio of 1 and {_span(low_share, _share)} at 0 (the curves above); "
                         f"near 1 - epsilon up to all of them")
        else:
            lines.append("  evaluation: every snapshot samples all eval.num_samples (eval.adaptive false, or one look)")
    if spec.seeds > 1:
        lines.append(f"  seeds: {spec.seeds} independent searches per grid point (--seeds), all counted above")
    if gpu and device == "cpu":
        lines.append("  no GPU on this machine: the speed is the CPU's; run --estimate on a GPU node of the cluster")
    lines.append("  not counted: Ray's start and stop, each training's own start (its process, data and model), "
                 "slots idle while the searcher waits for answers; bench/sweep.py measures them on this machine "
                 "('outside trials', 'trial overhead'): they weigh most in short sweeps")
    if args.address and not spec.max_concurrent:
        lines.append("  --address: one training at a time assumed; pass --max-concurrent N (trainings the cluster "
                     "runs at once, e.g. its nodes)")
    return Estimate("\n".join(lines), trainings, wall, hours)


def _span(values: list, fmt) -> str:
    """'5' or '3-5 s': the lowest and highest of sorted values, formatted."""
    low, high = fmt(values[0]), fmt(values[-1])
    if low == high:
        return low
    unit = " s" if low.endswith(" s") else ""
    return f"{low.removesuffix(unit)}-{high}"


def _share(x: float) -> str:
    return f"{x:.0%}"


def _count(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _seconds(s: float) -> str:
    return f"{s:.2g} s" if s < 10 else f"{s:.0f} s"


def duration_text(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


def _hours(h: float) -> str:
    return f"{h:.2g}" if h < 10 else f"{h:,.0f}"

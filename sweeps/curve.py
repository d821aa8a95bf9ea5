"""The data_size sweep: the memorization curve itself (the paper's Fig. 1, docs/paper.md §2), not an EMM search.
Every size of --values is trained once, to its end (no early stop at 1 - epsilon: the curve needs each ratio), as
one grid point whose trials differ only in |D|; the EMM is read off the curve (the largest size below the first
that does not memorize). No searcher, one seed. What is particular to this kind of sweep lives here; the
other modules ask `is_curve` once and call it."""
from __future__ import annotations

from typing import TYPE_CHECKING

from diffmem.config import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from sweeps.spec import Sweep

FACTOR = "data_size"
LABEL = "data_size"   # the one grid point, as its trials, trials.csv and TensorBoard name it
POINT = {"label": LABEL, "value": None, "overrides": {}}


def is_curve(spec_or_factor) -> bool:
    """A sweep (sweeps.spec.Sweep) or factor name of the curve kind."""
    return getattr(spec_or_factor, "factor", spec_or_factor) == FACTOR


def size_range(values: list, max_size: int, step: int, seeds: int) -> list[int]:
    """[smallest, largest] of the sizes to train, each checked against the dataset; one line if one cannot be."""
    if seeds > 1:
        raise ConfigError("--seeds applies to the EMM search; data_size trains each size once (run it again with "
                          "another --seed for another seed)")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v > max_size]
    if bad:
        raise ConfigError(f"data_size value {bad[0]!r} must be an integer in [1, {max_size}] (the dataset has "
                          f"{max_size} images)")
    small = [v for v in values if v < step]
    if small:
        raise ConfigError(f"data_size value {small[0]} is below the size step {step} (class-balanced subsets); "
                          f"use sizes >= {step}")
    return [min(values), max(values)]


def param_space(spec: Sweep) -> dict:
    """Tune's grid: the one grid point at every size."""
    from ray import tune
    return {"grid_index": 0, "grid_label": LABEL, "grid_value": None, "overrides": {},
            "size": tune.grid_search(spec.values)}


def collect(spec: Sweep, frame: pd.DataFrame) -> tuple[list[dict], pd.DataFrame, bool]:
    """(summary, trials table, finished) from Tune's results: finished when every size has its training."""
    from sweeps.results import trials_table
    trials = trials_table(frame, [POINT], spec.epsilon)
    finished = set(spec.values) <= set(trials.loc[trials.status != "error", "size"])
    return [summary(trials)], trials, finished


def summary(trials: pd.DataFrame) -> dict:
    """The EMM read off the measured curve, as an EMM search's summary of one grid point with one seed."""
    from sweeps.bisection import AT_LEAST_MAX, BELOW_MIN, RESOLVED, seed_median
    from sweeps.results import FROM_LEDGER
    done = trials[(trials.grid_label == LABEL) & trials.memorized.notna()].sort_values("size")
    failing = done[~done.memorized.astype(bool)]
    high = int(failing["size"].iloc[0]) if len(failing) else None
    below = done[done.memorized.astype(bool) & ((done["size"] < high) if high else True)]
    emm = int(below["size"].iloc[-1]) if len(below) else None
    status = AT_LEAST_MAX if high is None else (BELOW_MIN if emm is None else RESOLVED)
    curve = {"emm": emm, "high": high, "status": status, "trials": len(done),
             "images": float(done[done.status != FROM_LEDGER].images_seen.sum()),
             "observations": list(zip(done["size"], done.best_mem_ratio, done.memorized.astype(bool),
                                      done.best_num_samples)),
             "pending": [], "error": None}
    return {"label": LABEL, "value": "curve", **seed_median([curve])}


def status_lines(spec: Sweep, done: list, running: list) -> tuple[list[str], int, bool]:
    """--status's rows (one per size: its best ratio, running or to do), the trainings left, and whether every
    size has its training. `done`, `running`: sweeps.status's trial records."""
    from sweeps.status import best_text
    lines, left = [], 0
    for size in spec.values:
        mine = [t for t in done if t.size == size]
        now_running = [t for t in running if t.size == size]
        what = best_text(mine[-1]) if mine else ("running" if now_running else "to do")
        lines.append(f"{LABEL:28s} {'':11s} {'|D|=' + str(size):22s} {'':>5s}  {what}")
        left += 0 if mine or now_running else 1
    return lines, left, len({t.size for t in done}) >= len(spec.values)


def estimate_rounds(spec: Sweep, slots: int) -> list[list[tuple[int, int]]]:
    """The trainings of the curve in rounds of `slots` at once: (grid index, size) each."""
    sizes = [(0, v) for v in spec.values]
    return [sizes[i:i + slots] for i in range(0, len(sizes), slots)]

"""What a sweep leaves behind: emm.csv, trials.csv, emm.md, emm.png and curves.png in its output folder, and
the TensorBoard summary run (tensorboard/summary: EMM per grid point, memorization ratio against |D|).

Every file is written to a temporary name and renamed, so a crash never leaves a half-written table.
pandas is imported by the functions that build tables: --status uses the small helpers here and starts in
under a second.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from sweeps.folder import SweepFolder, atomic_write

if TYPE_CHECKING:   # pandas is imported where tables are built, never at module level
    import pandas as pd


# emm, high, censored: the seeds' median (sweeps.bisection.seed_median), its bracket [emm, high); seeds,
# seed_emms, interval_low, interval_high: their spread; distinguishable_from_previous: the intervals of this and
# the previous grid point do not overlap; trainings: run by this sweep, from_ledger: answered by the ledger.
EMM_COLUMNS = ["factor", "value", "emm", "high", "censored", "seeds", "seed_emms", "interval_low",
               "interval_high", "distinguishable_from_previous", "trainings", "from_ledger", "training_images",
               "wall_seconds", "error"]
# emm.csv's columns before they had one name each (README, "The main command"): renamed on reading
OLD_EMM_COLUMNS = {"trials": "trainings", "reused": "from_ledger", "train_seconds": "wall_seconds"}
FROM_LEDGER = "from_ledger"   # a training the results ledger answered (trials.csv status; emm.csv's count)
TRIAL_COLUMNS = ["grid_label", "value", "size", "seed", "best_mem_ratio", "best_mem_ratio_low",
                 "best_mem_ratio_high", "best_num_samples", "memorized", "stopped_early", "images_seen",
                 "planned_images", "wall_seconds", "step_seconds", "eval_seconds", "train_node_ip", "train_node_id",
                 "trial_id", "status", "error"]


def read_emm_csv(path: Path, **read_csv) -> pd.DataFrame:
    """An emm.csv, written by this version or an earlier one (OLD_EMM_COLUMNS; its 'low' was the EMM again)."""
    import pandas as pd
    frame = pd.read_csv(path, **read_csv).rename(columns=OLD_EMM_COLUMNS).drop(columns=["low"], errors="ignore")
    if "from_ledger" not in frame:   # before the ledger
        frame["from_ledger"] = 0
    return frame


def read_trials_csv(path: Path, **read_csv) -> pd.DataFrame:
    """A trials.csv, written by this version or an earlier one (status 'reused' for 'from_ledger', train_seconds
    for wall_seconds)."""
    import pandas as pd
    frame = pd.read_csv(path, **read_csv).rename(columns={"train_seconds": "wall_seconds"})
    frame["status"] = frame["status"].replace("reused", FROM_LEDGER)
    return frame


def interval_of(ratio, num_samples) -> tuple[float, float]:
    """The 95 % interval (diffmem.memorization.ratio_interval) of a memorization ratio measured on num_samples
    samples; (nan, nan) when either is unknown. A training's best ratio is copies / best_num_samples (all
    eval.num_samples, or fewer where the adaptive evaluation stopped early), so a ratio the searcher or the
    ledger holds with its samples gives back exactly the interval the training reported."""
    from diffmem.sequential import ratio_interval
    if ratio is None or ratio != ratio or not num_samples:
        return math.nan, math.nan
    return ratio_interval(round(ratio * num_samples), int(num_samples))


def ratio_text(ratio, low=None, high=None, digits: int = 3) -> str:
    """'0.980 [0.951, 0.992]': a ratio and its 95 % interval (the ratio alone when the interval is unknown)."""
    known = all(isinstance(x, (int, float)) and x == x for x in (low, high))
    return f"{ratio:.{digits}f}" + (f" [{low:.{digits}f}, {high:.{digits}f}]" if known else "")


def trials_table(frame: pd.DataFrame, grid_points: list[dict], epsilon: float) -> pd.DataFrame:
    """One row per training, from Tune's ResultGrid dataframe (last reported result of each trial)."""
    import pandas as pd

    from sweeps.bisection import memorized
    rows = []
    values = {p["label"]: p["value"] for p in grid_points}
    for _, r in frame.iterrows():
        label = r.get("config/grid_label")
        if not isinstance(label, str):
            continue
        best = r.get("best_mem_ratio", float("nan"))
        images, planned = r.get("images_seen", float("nan")), r.get("planned_images", float("nan"))
        rows.append({"grid_label": label, "value": values.get(label), "size": int(r["config/size"]),
                     "seed": _seed_of(r),
                     "best_mem_ratio": best, "best_mem_ratio_low": r.get("best_mem_ratio_low", float("nan")),
                     "best_mem_ratio_high": r.get("best_mem_ratio_high", float("nan")),
                     "best_num_samples": r.get("best_num_samples", float("nan")),   # the samples behind the best
                     "memorized": memorized(best, epsilon) if best == best else None,
                     "stopped_early": bool(images < planned) if images == images else None,
                     "images_seen": images, "planned_images": planned,
                     "wall_seconds": r.get("time_total_s", float("nan")),   # the whole trial, as Tune timed it
                     "step_seconds": r.get("step_seconds", float("nan")),   # inside training steps
                     "eval_seconds": r.get("eval_seconds", float("nan")),   # sampling and nearest neighbours
                     # where it trained last (a retry after a lost node: the node that finished it)
                     "train_node_ip": r.get("train_node_ip"), "train_node_id": r.get("train_node_id"),
                     "trial_id": r.get("trial_id"),
                     # a restored trial the ledger answered (sweeps.trainable._report_known): trained before
                     "status": "error" if r.get("error") else (FROM_LEDGER if r.get("from_ledger") == 1 else "done")})
    table = pd.DataFrame(rows, columns=TRIAL_COLUMNS)
    order = {p["label"]: i for i, p in enumerate(grid_points)}
    return table.sort_values(["grid_label", "seed", "size"],
                             key=lambda c: c.map(order) if c.name == "grid_label" else c, ignore_index=True)


def _seed_of(row) -> int:
    """The seed replicate of a Tune row (config/seed_index); a trial of a sweep before --seeds is seed 0."""
    seed = row.get("config/seed_index")
    return 0 if seed is None or seed != seed else int(seed)


def trials_from_search(summary: list[dict], frame: pd.DataFrame, epsilon: float) -> pd.DataFrame:
    """Every training the search observed, in order: run by this sweep (details from Tune's results) or
    from the results ledger (status 'from_ledger': trained before, by this or another sweep), either by the
    searcher without a trial (its interval from the ratio and the samples the searcher keeps with it) or by a
    restored trial that found its record (Tune's row, marked from_ledger)."""
    import pandas as pd
    ran = trials_table(frame, summary, epsilon)
    rows = []
    for point in summary:
        for seed, replicate in enumerate(point["replicates"]):
            for size, ratio, memorized, samples in replicate["observations"]:
                match = ran[(ran.grid_label == point["label"]) & (ran["size"] == size) & (ran.seed == seed)]
                if len(match):
                    rows.append(match.iloc[-1].to_dict())
                    continue
                low, high = interval_of(ratio, samples)
                rows.append({"grid_label": point["label"], "value": point["value"], "size": size, "seed": seed,
                             "best_mem_ratio": ratio, "best_mem_ratio_low": low, "best_mem_ratio_high": high,
                             "best_num_samples": samples or math.nan,
                             "memorized": memorized, "status": FROM_LEDGER})
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)


def emm_table(factor: str, summary: list[dict], trials: pd.DataFrame) -> pd.DataFrame:
    """One row per grid point: EMM (the largest |D| found to memorize; with several seeds their median) with its
    bracket, its spread over seeds and what it cost."""
    import pandas as pd
    rows = []
    for i, point in enumerate(summary):
        mine = trials[trials.grid_label == point["label"]]
        from_ledger = int((mine.status == FROM_LEDGER).sum())
        errors = mine.error.dropna() if "error" in mine else []
        rows.append({"factor": factor, "value": point["value"], "emm": point["emm"], "high": point["high"],
                     "censored": point["censored"], "seeds": point["seeds"],
                     "seed_emms": " ".join(seed_emm_text(r) for r in point["replicates"]),
                     "interval_low": point["interval_low"], "interval_high": point["interval_high"],
                     "distinguishable_from_previous": None if i == 0 else not _overlap(summary[i - 1], point),
                     "trainings": point["trials"] - from_ledger, "from_ledger": from_ledger,
                     "training_images": int(point["images"]),
                     "wall_seconds": round(float(mine.wall_seconds.sum()), 1),
                     "error": errors.iloc[-1] if len(errors) else (point.get("error") or "")})
    return pd.DataFrame(rows, columns=EMM_COLUMNS)


def seed_emm_text(replicate: dict) -> str:
    """One seed's EMM in a word: '50', '>=320', '<10', 'open' or 'unresolved'."""
    from sweeps.bisection import AT_LEAST_MAX, BELOW_MIN, RESOLVED
    if replicate["status"] == AT_LEAST_MAX:
        return f">={replicate['emm']}"
    if replicate["status"] == BELOW_MIN:
        return f"<{replicate['high']}"
    return str(replicate["emm"]) if replicate["status"] == RESOLVED else replicate["status"]


def _overlap(a: dict, b: dict) -> bool:
    """Do the intervals [interval_low, interval_high) of two grid points overlap (an unknown end is unbounded)?"""
    def ends(p):
        low, high = p["interval_low"], p["interval_high"]
        return -math.inf if low is None else low, math.inf if high is None else high
    (a_low, a_high), (b_low, b_high) = ends(a), ends(b)
    return a_low < b_high and b_low < a_high


def markdown_table(emm: pd.DataFrame, epsilon: float) -> str:
    lines = [f"EMM (largest |D| with memorization ratio >= {1 - epsilon:.2f})", "", spread_note(emm), "",
             "| value | EMM | per seed | interval | vs previous | bracket | trainings | from ledger | images "
             "| seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in emm.iterrows():
        lines.append(f"| {r.value} | {format_emm(r)} | {r.seed_emms} | {interval_text(r)} | {versus_previous(r)} | "
                     f"[{_int(r.emm)}, {_int(r.high)}) | {r.trainings} | {r.from_ledger} | {r.training_images:,} | "
                     f"{r.wall_seconds:.0f} |")
    return "\n".join(lines) + "\n"


def spread_note(emm: pd.DataFrame) -> str:
    """What the EMM, the interval and 'vs previous' of an EMM table mean, for its number of seeds."""
    from sweeps.bisection import interval_level
    seeds = int(emm.seeds.max()) if len(emm) else 1
    if seeds == 1:
        return ("One training seed: the interval is the bracket, with no spread over seeds; 'vs previous' says "
                "whether two neighbouring brackets are apart (--seeds K gives the spread).")
    return (f"{seeds} training seeds per grid point: EMM is the (lower) median of the seeds' EMMs, bracket the "
            f"median of their brackets; interval = [smallest low, largest high) over the seeds, nominal "
            f"{interval_level(seeds):.0%} for the median seed's EMM; 'not distinguishable': its interval overlaps "
            f"the previous grid point's.")


def interval_text(row) -> str:
    return f"[{_int(row.interval_low)}, {_int(row.interval_high)})"


def versus_previous(row) -> str:
    """'' for the first grid point, else whether its interval is apart from the previous grid point's."""
    apart = row.distinguishable_from_previous
    if apart is None or apart != apart or apart == "":
        return ""
    return "distinguishable" if str(apart).lower() == "true" else "not distinguishable"


def format_emm(row) -> str:
    if row.censored == ">=max":
        return f">= {_int(row.emm)}"
    if row.censored == "<min":
        return f"< {_int(row.high)}"
    if row.censored == "unresolved":
        return f"unresolved: {row.error}" if row.error else "unresolved"
    if row.emm is None or row.emm != row.emm or row.high is None or row.high != row.high:
        return "open"      # the sweep stopped before this bracket closed
    return _int(row.emm)


def _int(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else str(int(x))


def plain_log_axis(axis) -> None:
    """A log-scale axis of sizes labelled as plain numbers (30, 60, 200), not 3 x 10^1."""
    from matplotlib.ticker import FuncFormatter, LogLocator
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_locator(LogLocator(base=10, subs=(2, 3, 5)))   # 20, 30, 50, 200, ...: readable, not crowded
    axis.set_minor_formatter(plain)


def plot_emm(path: Path, factor: str, emm: pd.DataFrame) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = list(range(len(emm)))
    for i, r in emm.iterrows():   # the interval is the bracket with one seed
        lo = r.interval_low if r.interval_low == r.interval_low and r.interval_low is not None else \
            (r.interval_high or 1) / 2
        hi = r.interval_high if r.interval_high == r.interval_high and r.interval_high is not None else lo * 2
        centre = r.emm if r.emm == r.emm and r.emm is not None else lo
        ax.errorbar([i], [centre], yerr=[[max(centre - lo, 0)], [max(hi - centre, 0)]], fmt="o", capsize=4,
                    color="C3" if r.censored else "C0")
        if r.seeds > 1:   # each seed's own EMM beside the median
            ax.plot([i + 0.08] * len(seed_emms(r)), seed_emms(r), "_", color="gray", ms=8)
    seeds = int(emm.seeds.max()) if len(emm) else 1
    ax.set_xticks(x, [str(v) for v in emm.value])
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis)
    ax.set_xlabel(factor)
    ax.set_ylabel("EMM (|D|), bracket as error bar" if seeds == 1 else
                  f"EMM (|D|): median of {seeds} seeds,\ninterval as error bar, seeds as dashes", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def seed_emms(row) -> list[int]:
    """The seeds' EMMs of an emm.csv row that are numbers ('>=320' counts as 320; '<10', 'open' and 'unresolved'
    have none)."""
    return [int(t.lstrip(">=")) for t in str(row.seed_emms).split() if t.lstrip(">=").isdigit()]


def plot_curves(path: Path, trials: pd.DataFrame, grid_points: list[dict], epsilon: float, factor: str = "") -> None:
    import pandas as pd
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, point in enumerate(grid_points):
        mine = trials[(trials.grid_label == point["label"]) & trials.best_mem_ratio.notna()].sort_values("size")
        for k, (_, curve) in enumerate(mine.groupby("seed")):   # one line per seed, in the grid point's colour
            ax.plot(curve["size"], curve.best_mem_ratio * 100, "o-", color=f"C{i % 10}",
                    label=str(point["value"]) if k == 0 else None)
            ratio = pd.to_numeric(curve.best_mem_ratio)
            ends = [pd.to_numeric(curve.get(f"best_mem_ratio_{end}", ratio)) for end in ("low", "high")]
            ax.errorbar(curve["size"], ratio * 100, yerr=[((ratio - ends[0]) * 100).fillna(0).clip(lower=0),
                                                          ((ends[1] - ratio) * 100).fillna(0).clip(lower=0)],
                        fmt="none", ecolor=f"C{i % 10}", capsize=2, lw=0.8)   # each ratio's 95 % interval
    ax.axhline((1 - epsilon) * 100, ls="--", color="gray", lw=1)
    ax.set_xscale("log")
    plain_log_axis(ax.xaxis)
    ax.set_xlabel("training-set size |D|")
    ax.set_ylabel("memorization ratio (%), 95 % interval")
    ax.legend(fontsize=7, ncol=2, title=factor or None, title_fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def write_results(output: Path, factor: str, emm: pd.DataFrame, trials: pd.DataFrame, grid_points: list[dict],
                  epsilon: float, note: str = "") -> str:
    """note: a line above the table (a sweep stopped before its end says so)."""
    output.mkdir(parents=True, exist_ok=True)
    folder = SweepFolder(output)
    atomic_write(folder.emm_csv, lambda p: emm.to_csv(p, index=False))
    atomic_write(folder.trials_csv, lambda p: trials.to_csv(p, index=False))
    table = (f"{note}\n\n" if note else "") + markdown_table(emm, epsilon)
    atomic_write(folder.emm_md, lambda p: p.write_text(f"# {factor}\n\n{table}"))
    plot_emm(folder.emm_png, factor, emm)
    plot_curves(folder.curves_png, trials, grid_points, epsilon, factor)
    from sweeps.tblog import write_sweep_summary
    write_sweep_summary(output, factor, emm, trials, grid_points, epsilon, table)   # tensorboard/summary
    return table

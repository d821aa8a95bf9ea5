"""How much training the EMM search saves against the paper's grid over |D| (simulated, no Ray, seconds).

Memorization curves are the paper's CIFAR-10 numbers (paper.md §5: unconditional, true-label
conditional, and random labels with C classes), interpolated by a logistic in log |D| fitted to each
table row: logit R(n) = a - b ln n. Rows with a single point (C = 500, 1000) borrow the median slope b
of the other random-label rows.

Baseline (the paper's protocol, paper.md §3): per grid point, train every size of a geometric grid with
step 1 + tolerance over the search range (so it pins EMM to the same 10%), each for the full 40k epochs.

Cost of one training at size n: 40k epochs * n images. Early stopping (searcher only): a training that
memorizes stops at the first snapshot (every 2.5M images, paper.md §1) where its running-max ratio
reaches 1 - epsilon; one that does not memorize runs to the end. The running max over the training
fraction t in [0, 1] is modelled as
    m(t) = R(n) * (1 - exp(-(t - t0) / tau)) / (1 - exp(-(1 - t0) / tau))   for t > t0, else 0,
so m(1) = R(n). t0 and tau are fitted to the paper's only memorization-over-training curve (EDM with
unique labels, paper.md §5: ~0 until 1.5k, 30% at 4k, 45% at 6k, 55% at 8k, 61% at 10k, 65% at 12k of
12k epochs). That curve is a different model and duration than the 40k-epoch basic runs: it is an
assumption, stated in the output, not a measurement.

A second reference walks up the same grid and stops at the first size that does not memorize (the
paper's Step IV, "gradually increase |D|"); it is printed on its own line.

Wall time is counted in rounds: sequential batches of at most `workers` trainings that start together.

Neighbours' ranges: the searcher as it is (a bracket starts from what its resolved neighbours found,
sweeps/bisection.py) against the same searcher with every bracket starting from the whole size range.

Ledger reuse: a study of three sweeps (class_labels, random_labels, random_labels again) with one shared
results ledger against none; a training of the same curve and |D| is then free.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine_line, write_json  # noqa: E402
from sweeps.bisection import EMMSearchState, simulate  # noqa: E402

EPOCHS = 40_000                          # paper's basic setup (paper.md §6)
SNAPSHOT_IMAGES = 2_500_000              # snapshot spacing (paper.md §1)
EPSILON, TOLERANCE = 0.1, 0.1
SIZE_RANGE = (500, 16_000)               # span of the paper's |D| grids (paper.md §3: 0.5k ... 16k)
ALLOWED_SIZES = list(range(10, 50_001, 10))   # class-balanced CIFAR-10 subsets: multiples of 10
WORKERS = (1, 4, 16)

# memorization ratio (fraction) at |D|, read from the paper's figures (paper.md §5)
UNCOND = {1000: .92, 2000: .61, 3000: .345, 4000: .17, 5000: .09}
COND = {1000: .965, 2000: .795, 3000: .555, 4000: .375, 5000: .23}
RANDOM_LABELS = {
    1: {1000: .91, 2000: .61, 5000: .087}, 2: {1000: .928, 2000: .645}, 5: {1000: .952, 2000: .73},
    10: {1000: .962, 2000: .80, 5000: .234}, 20: {1000: .974, 2000: .848},
    50: {1000: .982, 2000: .902, 5000: .497}, 100: {1000: .992, 2000: .94, 5000: .627},
    500: {5000: .878}, 1000: {5000: .927}}
# unique labels, EDM, 12k epochs: memorization ratio against the fraction of training done (paper.md §5)
OVER_TRAINING = {1500 / 12000: 0.0, 4000 / 12000: .30, 6000 / 12000: .45, 8000 / 12000: .55,
                 10000 / 12000: .61, 1.0: .65}


# ---------------------------------------------------------------------------------- curves
def fit_logistic(points: dict[int, float], slope: float | None = None) -> tuple[float, float]:
    """(a, b) of logit R = a - b ln n, least squares; with `slope` given only a is fitted."""
    x = np.log(np.array(list(points), dtype=float))
    y = np.log(np.array(list(points.values())) / (1 - np.array(list(points.values()))))
    if slope is None:
        minus_b, a = np.polyfit(x, y, 1)
        return float(a), float(-minus_b)
    return float(np.mean(y + slope * x)), slope


def ratio_curve(a: float, b: float):
    return lambda n: 1 / (1 + math.exp(-(a - b * math.log(n))))


def curve_families() -> dict[str, list[tuple[str, object]]]:
    random_fits = {c: fit_logistic(p) for c, p in RANDOM_LABELS.items() if len(p) > 1}
    shared_slope = float(np.median([b for _, b in random_fits.values()]))
    random_fits.update({c: fit_logistic(p, shared_slope) for c, p in RANDOM_LABELS.items() if len(p) == 1})
    return {"uncond": [("uncond", ratio_curve(*fit_logistic(UNCOND)))],
            "cond": [("cond", ratio_curve(*fit_logistic(COND)))],
            "random_labels": [(f"random_labels={c}", ratio_curve(*random_fits[c])) for c in RANDOM_LABELS]}


# ---------------------------------------------------------------------------------- training cost
def fit_rise() -> tuple[float, float]:
    """(t0, tau) of the normalised running-max curve, least squares on OVER_TRAINING (grid search)."""
    final = OVER_TRAINING[1.0]
    best = None
    for t0 in np.arange(0.0, 0.3, 0.005):
        for tau in np.arange(0.02, 2.0, 0.005):
            err = sum((rise(t, t0, tau) - r / final) ** 2 for t, r in OVER_TRAINING.items())
            if best is None or err < best[0]:
                best = (err, float(t0), float(tau))
    return best[1], best[2]


def rise(t: float, t0: float, tau: float) -> float:
    """Running max as a fraction of its final value, t = fraction of the training done."""
    return 0.0 if t <= t0 else (1 - math.exp(-(t - t0) / tau)) / (1 - math.exp(-(1 - t0) / tau))


def training_images(n: int, ratio: float, early_stop: bool, t0: float, tau: float) -> float:
    full = EPOCHS * n
    if not early_stop or ratio < 1 - EPSILON:
        return full
    # first t with ratio * rise(t) >= 1 - eps, then the next snapshot
    need = (1 - EPSILON) / ratio * (1 - math.exp(-(1 - t0) / tau))
    t_cross = min(1.0, t0 - tau * math.log(1 - need))
    snapshots = math.ceil(full / SNAPSHOT_IMAGES)
    return min(full, math.ceil(t_cross * snapshots - 1e-9) * SNAPSHOT_IMAGES)


# ---------------------------------------------------------------------------------- protocols
def grid_sizes() -> list[int]:
    """Geometric grid, step 1 + tolerance, over SIZE_RANGE, on allowed sizes."""
    lo, hi = SIZE_RANGE
    count = math.ceil(math.log(hi / lo) / math.log(1 + TOLERANCE))
    return sorted({10 * round(lo * (hi / lo) ** (k / count) / 10) for k in range(count + 1)})


def run_grid(curves, workers: int) -> dict:
    sizes = grid_sizes()
    emms = [max([n for n in sizes if curve(n) >= 1 - EPSILON], default=None) for _, curve in curves]
    trainings = len(sizes) * len(curves)
    return {"trainings": trainings, "images": EPOCHS * sum(sizes) * len(curves),
            "rounds": math.ceil(trainings / workers), "emm": emms}


def run_incremental(curves, workers: int) -> dict:
    """A second reference, the paper's Step IV read literally: walk up the same grid and stop a grid point
    at its first size that does not memorize. Each round starts the next smallest sizes of the unfinished
    grid points (round-robin) on the free workers; every training runs to the end."""
    sizes = grid_sizes()
    next_size = {g: 0 for g in range(len(curves))}
    trainings = images = rounds = 0
    while next_size:
        batch = []
        while len(batch) < workers and next_size:
            for g in list(next_size):
                if len(batch) < workers:
                    batch.append((g, sizes[next_size[g]]))
                    next_size[g] += 1
                    if next_size[g] == len(sizes):
                        del next_size[g]
        for g, n in batch:
            trainings, images = trainings + 1, images + EPOCHS * n
            if curves[g][1](n) < 1 - EPSILON:
                next_size.pop(g, None)           # crossed: this grid point is done
        rounds += 1
    return {"trainings": trainings, "images": images, "rounds": rounds}


class WholeRangeSearch(EMMSearchState):
    """The searcher with every bracket starting from the whole size range (no neighbours' ranges, no waiting)."""

    def neighbours_range(self, bracket_index):
        return None

    def waiting(self, bracket_index):
        return False


def run_search(curves, workers: int, early_stop: bool, t0: float, tau: float, search=EMMSearchState) -> dict:
    state = search([{"label": label} for label, _ in curves], ALLOWED_SIZES, SIZE_RANGE,
                   epsilon=EPSILON, tolerance=TOLERANCE)
    rounds = len(simulate(state, lambda g, n, seed: curves[g][1](n), workers,   # synchronous rounds of `workers`
                          lambda g, n, ratio: training_images(n, ratio, early_stop, t0, tau)))
    rows = state.summary()
    for row, (label, curve) in zip(rows, curves):   # the search must find the truth (monotone curves)
        true_emm = max(n for n in ALLOWED_SIZES if curve(n) >= 1 - EPSILON)
        assert row["emm"] <= true_emm < row["high"], (label, row["emm"], row["high"], true_emm)
    return {"trainings": sum(r["trials"] for r in rows), "images": sum(r["images"] for r in rows),
            "rounds": rounds, "emm": [r["emm"] for r in rows], "high": [r["high"] for r in rows]}


def run_study(sweeps, workers: int, t0: float, tau: float, use_ledger: bool) -> dict:
    """Several sweeps one after the other, with early stopping, sharing one results ledger or not. A training
    of the same curve at the same |D| that the ledger holds costs nothing (the real searcher observes it at
    once instead of training)."""
    ledger, totals = set(), {"trainings": 0, "images": 0.0}

    for curves in sweeps:
        def cost(g, n, ratio, curves=curves):
            if use_ledger and (curves[g][0], n) in ledger:
                return 0.0
            ledger.add((curves[g][0], n))
            images = training_images(n, ratio, True, t0, tau)
            totals["trainings"] += 1
            totals["images"] += images
            return images
        state = EMMSearchState([{"label": label} for label, _ in curves], ALLOWED_SIZES, SIZE_RANGE,
                               epsilon=EPSILON, tolerance=TOLERANCE)
        simulate(state, lambda g, n, seed, curves=curves: curves[g][1](n), workers, cost)
    return totals


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    print(machine_line())
    t0, tau = fit_rise()
    print(f"model: logistic fits to paper.md §5; grid {len(grid_sizes())} sizes over {SIZE_RANGE[0]}.."
          f"{SIZE_RANGE[1]} (step {1 + TOLERANCE}), {EPOCHS} epochs each; early stopping with running max "
          f"rising after t0={t0:.3f} with tau={tau:.3f} of the run (fit to the EDM unique-label curve)")
    figures = []
    for family, curves in curve_families().items():
        for workers in WORKERS:
            grid = run_grid(curves, workers)
            walk = run_incremental(curves, workers)
            with_stop = run_search(curves, workers, True, t0, tau)
            without_stop = run_search(curves, workers, False, t0, tau)
            whole = run_search(curves, workers, True, t0, tau, WholeRangeSearch)
            fig = {"family": family, "workers": workers, "grid_points": len(curves),
                   "grid": grid, "incremental_grid": walk,
                   "search_early_stop": with_stop, "search_no_early_stop": without_stop,
                   "trainings_ratio": without_stop["trainings"] / grid["trainings"],
                   "images_ratio_early_stop": with_stop["images"] / grid["images"],
                   "images_ratio_no_early_stop": without_stop["images"] / grid["images"],
                   "rounds_ratio": without_stop["rounds"] / grid["rounds"],
                   "vs_whole_range": {"trainings": with_stop["trainings"] / whole["trainings"],
                                      "images": with_stop["images"] / whole["images"],
                                      "rounds": with_stop["rounds"] / whole["rounds"]},
                   "vs_incremental": {"trainings": without_stop["trainings"] / walk["trainings"],
                                      "images_early_stop": with_stop["images"] / walk["images"],
                                      "rounds": without_stop["rounds"] / walk["rounds"]}}
            figures.append(fig)
            points = f"{len(curves)} grid point{'s' if len(curves) > 1 else ''}"
            print(f"search_efficiency {family} ({points}) workers={workers}: "
                  f"trainings {fig['trainings_ratio']:.2f}x grid ({without_stop['trainings']} vs "
                  f"{grid['trainings']}), images {fig['images_ratio_early_stop']:.3f}x grid with early "
                  f"stopping, {fig['images_ratio_no_early_stop']:.3f}x without, rounds({workers} workers) "
                  f"{fig['rounds_ratio']:.2f}x grid ({without_stop['rounds']} vs {grid['rounds']}); "
                  f"EMM {without_stop['emm']} (grid {grid['emm']})")
            vs = fig["vs_whole_range"]
            print(f"search_efficiency {family} ({points}) workers={workers} neighbours' ranges vs whole range: "
                  f"trainings {vs['trainings']:.2f}x ({with_stop['trainings']} vs {whole['trainings']}), images "
                  f"{vs['images']:.2f}x, rounds {vs['rounds']:.2f}x ({with_stop['rounds']} vs {whole['rounds']}); "
                  f"EMM {with_stop['emm']} (whole range {whole['emm']})")
            vs = fig["vs_incremental"]
            print(f"search_efficiency {family} ({points}) workers={workers} vs incremental grid: "
                  f"trainings {vs['trainings']:.2f}x ({without_stop['trainings']} vs {walk['trainings']}), "
                  f"images {vs['images_early_stop']:.2f}x with early stopping, rounds({workers} workers) "
                  f"{vs['rounds']:.2f}x ({without_stop['rounds']} vs {walk['rounds']})")
    # A study: class_labels (uncond, cond), then random_labels with the unconditional point (as the factor
    # registry's grids have it), then random_labels again. The unconditional base point recurs.
    families = curve_families()
    class_labels = families["uncond"] + families["cond"]
    random_labels = families["uncond"] + families["random_labels"]
    study = [class_labels, random_labels, random_labels]
    ledger_figures = []
    for workers in WORKERS:
        shared, alone = (run_study(study, workers, t0, tau, use) for use in (True, False))
        ledger_figures.append({"workers": workers, "with_ledger": shared, "without_ledger": alone})
        print(f"search_efficiency ledger: class_labels, random_labels, random_labels again, workers={workers}: "
              f"with a shared ledger trainings {shared['trainings'] / alone['trainings']:.2f}x "
              f"({shared['trainings']} vs {alone['trainings']}), images {shared['images'] / alone['images']:.2f}x "
              f"without it")
    write_json(args.json, {"machine": machine_line(), "t0": t0, "tau": tau, "ledger": ledger_figures,
                           "size_range": SIZE_RANGE, "grid_sizes": grid_sizes(), "figures": figures})
    return figures


if __name__ == "__main__":
    main()

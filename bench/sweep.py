"""End to end: one `sweeps/emm_search.py` sweep, and where its wall time goes.

Runs the sweep as a user does (a fresh local Ray cluster, no dashboard, a fresh output folder and ledger) and
splits the wall time W of the whole command, times the number of concurrent trial slots S, into

    training steps    sum over trainings of the time inside training steps (diffmem.train: step_seconds)
    evaluation        sum of the time sampling and scoring snapshots (eval_seconds)
    trial overhead    the rest of each trial's own time (Tune's time_total_s): building the model, loading
                      the subset, checkpoints, reports
    outside trials    S x W less all trials' time: Ray start-up and shutdown, scheduling, slots left idle
                      while the searcher waits for the answers it needs

Every figure is a share of S x W measured in the same run. The goal of issue 7 is training + evaluation at
least 0.80 of it.

    python bench/sweep.py                    # the default sweep: --factor random_labels on the digits (~10 min)
    python bench/sweep.py --preset smoke     # the same code at the smallest settings (~1.5 min)
    python bench/sweep.py --packed 4         # then the same sweep with --pack-size 4: wall-time ratio, trainings,
                                             # and whether the EMM tables agree (issue 16)
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import machine_line, write_json  # noqa: E402


def run_sweep(output: Path, extra: list[str]) -> tuple[float, int]:
    """Wall time of the command and the number of trainings it ran at once (it prints that number)."""
    command = [sys.executable, str(ROOT / "sweeps" / "emm_search.py"), "--no-dashboard", "--output", str(output),
               *extra]
    start = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(command, capture_output=True, text=True, cwd=output.parent)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"error: the sweep failed ({' '.join(command)}):\n{run.stderr[-3000:]}")
    return wall, int(re.search(r"(\d+) trainings at once", run.stdout).group(1))


def breakdown(output: Path, wall: float, slots: int) -> dict:
    trials = pd.read_csv(output / "trials.csv")
    trained = trials[trials.status != "from_ledger"]
    steps, evals, trial = trained.step_seconds.sum(), trained.eval_seconds.sum(), trained.wall_seconds.sum()
    capacity = slots * wall
    return {"wall_s": wall, "slots": slots, "trainings": len(trained), "trainings_per_min": 60 * len(trained) / wall,
            "training_steps": steps / capacity, "evaluation": evals / capacity,
            "trial_overhead": (trial - steps - evals) / capacity, "outside_trials": 1 - trial / capacity,
            "training_and_evaluation": (steps + evals) / capacity}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", help="a preset of experiments/presets (smoke: the smallest settings)")
    p.add_argument("--factor", default="random_labels")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--output", type=Path, help="keep the sweep's output folder here (default: a temporary one)")
    p.add_argument("--packed", type=int, metavar="K", help="then run it again with --pack-size K and compare")
    args = p.parse_args(argv)
    machine = machine_line()
    print(machine, flush=True)
    extra = ["--factor", args.factor] + (["--preset", args.preset] if args.preset else [])
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        output = args.output or Path(tmp) / "out"
        wall, slots = run_sweep(output.resolve(), extra)
        figures = breakdown(output, wall, slots)
        if args.packed:   # the table, read before the temporary folder goes
            figures["table"] = pd.read_csv(output / "emm.csv").to_dict("records")
    name = f"--factor {args.factor}" + (f" --preset {args.preset}" if args.preset else "")
    print(f"sweep {name}: wall {figures['wall_s']:.0f} s, {figures['trainings']} trainings on {figures['slots']} "
          f"slots, {figures['trainings_per_min']:.2f} trainings/min")
    for key in ("training_steps", "evaluation", "trial_overhead", "outside_trials"):
        print(f"sweep {key.replace('_', ' ')} / (slots x wall) {figures[key]:.2f}x")
    print(f"sweep training + evaluation / (slots x wall) {figures['training_and_evaluation']:.2f}x (goal >= 0.80)")
    if args.packed:
        figures["packed"] = compare_packed(extra, args.packed, figures, output if args.output else None)
    write_json(args.json, {"machine": machine, "command": name, **figures})
    return figures


def compare_packed(extra: list[str], k: int, alone: dict, kept: Path | None) -> dict:
    """The same sweep with --pack-size k, right after the one-at-a-time run on the same machine."""
    columns = ["value", "emm", "high", "censored"]
    with tempfile.TemporaryDirectory(prefix="bench-sweep-packed-") as tmp:
        output = (kept.parent / f"{kept.name}-packed{k}" if kept else Path(tmp) / "out").resolve()
        wall, at_once = run_sweep(output, [*extra, "--pack-size", str(k)])
        trainings = len(pd.read_csv(output / "trials.csv"))
        packed_table = pd.read_csv(output / "emm.csv")[columns]
    alone_table = pd.DataFrame(alone["table"])[columns]
    same = packed_table.astype(str).equals(alone_table.astype(str))
    ratio = wall / alone["wall_s"]
    print(f"sweep packed K={k}/one at a time wall {ratio:.2f}x  [{wall:.0f} s against {alone['wall_s']:.0f} s, "
          f"{trainings} against {alone['trainings']} trainings, {at_once} trainings at once; EMM table "
          f"{'the same' if same else 'differs'}]")
    if not same:
        print(f"  one at a time:\n{alone_table}\n  packed:\n{packed_table}")
    return {"k": k, "wall_s": wall, "wall_ratio": ratio, "trainings": trainings, "same_table": same,
            "table": packed_table.to_dict("records")}


if __name__ == "__main__":
    main()

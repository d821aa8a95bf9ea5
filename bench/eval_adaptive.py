"""The adaptive evaluation (eval.adaptive, diffmem/sequential.py) against the fixed one: samples and seconds
spent, and how often its decision differs from the one all samples give.

Trainings: digits trainings of the default sweep (experiments/digits.yaml; random_labels none, 4 and unique at
|D| 30, 60 and 120, around their EMMs, memorized_at 0.9 so they stop as in a sweep). Every snapshot is scored
twice on the same EMA weights: the fixed evaluation (all eval.num_samples seeds; it drives the training) and
the adaptive one. The baseline of each ratio is the fixed evaluation measured in the same run.

Simulation: evaluations of a true ratio p (each sample a copy with probability p, samples in seed order),
for the digits setup (256 samples, looks at 64, 128) and the paper's basic setup (10,000 samples per
snapshot, batch 1,000: looks at 1k, 2k, 4k, 8k): expected samples against the fixed evaluation, the rate
of decisions that differ from the full-sample one and of early decisions wrong about p, worst case over p.

    python bench/eval_adaptive.py [--json PATH] [--runs 20000]     # about 11 minutes on 2 cores
    python bench/eval_adaptive.py --simulate-only                   # seconds
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffmem.train  # noqa: E402
from bench.common import machine_line, write_json  # noqa: E402
from diffmem.config import load_config  # noqa: E402
from diffmem.sequential import SequentialTest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAININGS = [(labels, size) for labels in ({"data.labels": "none"},
                                           {"data.labels": "random", "data.label_classes": 4},
                                           {"data.labels": "unique"}) for size in (30, 60, 120)]
RATIOS = (0.0, 0.2, 0.5, 0.7, 0.8, 0.85, 0.87, 0.88, 0.89, 0.9, 0.91, 0.92, 0.93, 0.95, 0.97, 1.0)
SETUPS = {"digits": (256, 64), "paper": (10000, 1000)}   # (num_samples, batch_size)


def simulate(test: SequentialTest, p: float, runs: int, rng) -> dict:
    """Adaptive against fixed on `runs` evaluations of true ratio p (copies drawn look by look)."""
    n = test.looks[-1]
    counts = np.zeros(runs, np.int64)
    used, decision = np.full(runs, n), np.full(runs, -1)   # -1: not decided early
    previous = 0
    for k, look in enumerate(test.looks):
        counts += rng.binomial(look - previous, p, runs)
        previous = look
        if k == len(test.looks) - 1:
            break
        open_ = decision < 0
        yes, no = open_ & (counts >= test.above[k]), open_ & (counts <= test.below[k])
        decision[yes], decision[no], used[yes | no] = 1, 0, look
    full = counts / n >= test.memorized_at
    adaptive = np.where(decision < 0, full, decision == 1)
    truth = p >= test.memorized_at
    return {"samples": float(used.mean() / n), "differs": float((adaptive != full).mean()),
            "wrong_early": float(((decision >= 0) & (adaptive != truth)).mean())}


def run_simulation(runs: int, q: float, alpha: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (num_samples, batch) in SETUPS.items():
        test = SequentialTest.build(q, alpha, num_samples, batch)
        out[name] = {"looks": list(test.looks), "by_ratio": {p: simulate(test, p, runs, rng) for p in RATIOS}}
    return out


def run_trainings(q: float, alpha: float) -> dict:
    """Each snapshot of each training scored fixed (driving the training) and adaptive, on the same weights."""
    real = diffmem.train.evaluate_denoiser
    records = []

    def both(denoiser, data, cfg, **kw):
        tic = time.perf_counter()
        fixed = real(denoiser, data, dataclasses.replace(cfg, adaptive=False), **kw)
        middle = time.perf_counter()
        adaptive = real(denoiser, data, dataclasses.replace(cfg, adaptive=True), **kw)
        records.append({"fixed_samples": len(fixed.nn_ratio), "adaptive_samples": len(adaptive.nn_ratio),
                        "fixed_seconds": middle - tic, "adaptive_seconds": time.perf_counter() - middle,
                        "fixed_ratio": fixed.ratio, "adaptive_ratio": adaptive.ratio,
                        "fixed_memorized": fixed.memorized, "adaptive_memorized": adaptive.memorized})
        return fixed

    diffmem.train.evaluate_denoiser = both
    try:
        for overrides, size in TRAININGS:
            cfg = load_config(ROOT / "experiments" / "digits.yaml",
                              {**overrides, "data.size": size, "eval.memorized_at": q, "eval.adaptive_error": alpha})
            diffmem.train.train(cfg, log=lambda *_: None)
    finally:
        diffmem.train.evaluate_denoiser = real
    return {"snapshots": records}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20000, help="simulated evaluations per true ratio")
    p.add_argument("--simulate-only", action="store_true", help="skip the digits trainings")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    q, alpha = 0.9, 0.01
    print(machine_line("cpu", f", memorized_at {q}, adaptive_error {alpha}"))
    figures = {"memorized_at": q, "adaptive_error": alpha}
    if not args.simulate_only:
        snaps = run_trainings(q, alpha)["snapshots"]
        figures["trainings"] = snaps
        fixed_n, adaptive_n = sum(s["fixed_samples"] for s in snaps), sum(s["adaptive_samples"] for s in snaps)
        fixed_s, adaptive_s = sum(s["fixed_seconds"] for s in snaps), sum(s["adaptive_seconds"] for s in snaps)
        differ = sum(s["fixed_memorized"] != s["adaptive_memorized"] for s in snaps)
        print(f"digits trainings ({len(TRAININGS)}, {len(snaps)} snapshots): samples adaptive/fixed "
              f"{adaptive_n / fixed_n:.3f} ({adaptive_n} of {fixed_n})")
        print(f"digits trainings: evaluation seconds adaptive/fixed {adaptive_s / fixed_s:.3f} "
              f"({adaptive_s:.1f} s of {fixed_s:.1f} s)")
        print(f"digits trainings: decisions differing from all samples' {differ}/{len(snaps)} "
              f"(stated bound on a wrong early decision {alpha})")
    sim = run_simulation(args.runs, q, alpha)
    figures["simulation"] = sim
    for name, result in sim.items():
        rows = result["by_ratio"]
        worst_differ = max(r["differs"] for r in rows.values())
        worst_wrong = max(r["wrong_early"] for r in rows.values())
        far = [r["samples"] for p, r in rows.items() if abs(p - q) >= 0.05]
        near = [r["samples"] for p, r in rows.items() if abs(p - q) < 0.05]
        print(f"simulated {name} (N={result['looks'][-1]:,}, looks {result['looks'][:-1]}): samples adaptive/fixed "
              f"{np.mean(far):.3f} at |p - {q}| >= 0.05, {np.mean(near):.3f} within 0.05, "
              f"{min(r['samples'] for r in rows.values()):.3f} at best")
        print(f"simulated {name}: decisions differing from all samples' at most {worst_differ:.4f}, early decisions "
              f"wrong about p at most {worst_wrong:.4f} over p in {RATIOS[0]}..{RATIOS[-1]} ({args.runs} runs each; "
              f"stated bound {alpha})")
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

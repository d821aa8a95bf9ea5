"""Sampling the theoretical optimum: N images from EmpiricalOptimalDenoiser of M training images (EDM's Heun
sampler, 35 evaluations), fast (the default) and plain, against the floor of 35 bare GEMMs of N x M x D.

Sizes (samples x training images x dimension), one line each:
    digits    1,000 x  1,797 x    64   the real digits, all of them
    digits32    256 x  1,797 x 3,072   default: CIFAR-10's dimension on a CPU in about a minute; the digits
                                       bilinearly upsampled to 3 x 32 x 32 plus N(0, 0.1^2) pixel noise
                                       (no CIFAR-10 offline), clamped to [-1, 1]
    cifar    10,000 x 50,000 x 3,072   --full: CIFAR-10's counts, the digits32 images cycled to 50k (each
                                       with its own noise); ~110 TFLOP for the floor alone: a GPU's job
Latents: seeded N(0, I), as diffmem.evaluate. Unconditional.

The floor is what any method that looks at every training image at every step pays: 35 GEMMs of the
samples against the training set. plain computes every step from scratch (two GEMMs per step and ~10
passes over the logits); the fast path computes fewer passes and skips the samples whose softmax is
provably concentrated on one training image (see EmpiricalOptimalDenoiser). How much it skips depends
on the data: the line reports the share of (sample, step) evaluations that still ran the softmax. The
samples of both must be equal and give the same memorization ratio (checked here on every run).

Timing: methods interleaved (floor, plain, fast, floor, ...), `reps` times, best time each, every figure
a ratio against the floor of the same run; wall time, or with --threads 1 the process's CPU time, which
other jobs on the machine barely disturb.

    python bench/optimum.py [--full] [--threads 1] [--json PATH]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import clock, machine_line, write_json  # noqa: E402
from diffmem.config import DataConfig  # noqa: E402
from diffmem.data import training_set  # noqa: E402
from diffmem.edm import edm_sampler  # noqa: E402
from diffmem.evaluate import seeded_latents  # noqa: E402
from diffmem.memorization import memorization_ratio, to_pixels  # noqa: E402
from diffmem.optimum import EmpiricalOptimalDenoiser, optimal_denoiser  # noqa: E402

SIZES = {"digits": (1_000, 1_797), "digits32": (256, 1_797), "cifar": (10_000, 50_000)}
REPS = {"digits": 5, "digits32": 3, "cifar": 1}
EVALUATIONS = 35                                      # 18 Heun steps


def training_images(name: str, m: int) -> torch.Tensor:
    digits = training_set(DataConfig(size=1797)).images
    if name == "digits":
        return digits[:m]
    up = F.interpolate(digits, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    noise = torch.randn(m, 3, 32, 32, generator=torch.Generator().manual_seed(12345))
    return (up[torch.arange(m) % len(up)] + 0.1 * noise).clamp(-1, 1)


class Counting(EmpiricalOptimalDenoiser):
    """Counts the rows that ran the softmax."""
    full_rows = 0

    def _softmax(self, flat, sigma, labels):
        self.full_rows += len(flat)
        return super()._softmax(flat, sigma, labels)


def run_size(name: str, device: str, reps: int) -> dict:
    n, m = SIZES[name]
    train = training_images(name, m).to(device)
    d = train[0].numel()
    latents = seeded_latents(range(n), train.shape[1:], None, device)[0]
    fast = Counting(train)
    plain = lambda x, sigma, class_labels=None: optimal_denoiser(x, sigma, train)   # noqa: E731
    x, y = torch.randn(n, d, device=device), train.reshape(m, d)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def floor():
        for _ in range(EVALUATIONS):
            x @ y.T

    samples = {}
    methods = {"floor": floor, "plain": lambda: samples.__setitem__("plain", edm_sampler(plain, latents)),
               "fast": lambda: samples.__setitem__("fast", edm_sampler(fast, latents))}
    times = {k: [] for k in methods}
    for f in methods.values():                          # warm-up
        f()
    fast.full_rows = 0
    for _ in range(reps):
        for k, f in methods.items():
            sync()
            start = clock()
            f()
            sync()
            times[k].append(clock() - start)
    best = {k: min(v) for k, v in times.items()}
    ratios = {"fast": best["fast"] / best["floor"], "plain": best["plain"] / best["floor"]}
    diff = (samples["fast"] - samples["plain"]).abs().max().item()
    assert torch.allclose(samples["fast"], samples["plain"], rtol=1e-5, atol=1e-5), f"fast != plain: {diff}"
    train_px = to_pixels(train).float()
    mem = {k: memorization_ratio(to_pixels(v).float(), train_px) for k, v in samples.items()}
    assert mem["fast"] == mem["plain"], mem
    return {"shape": [n, m, d], "reps": reps, "seconds": times, "best_seconds": best, "ratios": ratios,
            "softmax_share": fast.full_rows / (reps * n * EVALUATIONS), "max_abs_sample_diff": diff,
            "memorization_ratio": mem["fast"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="10k samples of 50k images of 3x32x32 (a GPU's job)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--threads", type=int, help="torch CPU threads; 1 also times by process CPU time, "
                        "which other jobs on the machine barely disturb (default: all, wall time)")
    parser.add_argument("--reps", type=int, help="timed repetitions per method (default: per size)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    machine = machine_line(args.device)
    print(machine)
    figures = {"machine": machine, "sizes": {}}
    for name in ("digits", "cifar" if args.full else "digits32"):
        fig = run_size(name, args.device, args.reps or REPS[name])
        figures["sizes"][name] = fig
        r, (n, m, d) = fig["ratios"], fig["shape"]
        print(f"optimum {name} ({n} x {m} x {d}, {EVALUATIONS} evaluations) ours/floor {r['fast']:.2f}x "
              f"(fast path: {fig['softmax_share']:.0%} of sample-evaluations ran the softmax), "
              f"plain/floor {r['plain']:.2f}x  [floor {fig['best_seconds']['floor']:.3g} s, best of "
              f"{fig['reps']}; samples equal (max |diff| {fig['max_abs_sample_diff']:.1e}), memorization "
              f"ratio {fig['memorization_ratio']:.3f} for both]")
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()

"""Training throughput of one DDPM++ training step, plain fp32 eager against the fast-path settings, and (on a
GPU) the cost of one memorization evaluation.

Trains through diffmem.train.train itself (diffmem.train.measure_speed), on synthetic images held on the device
as in a real run, for a fixed number of steps per setting:

    fp32              the paper's arithmetic (TF32 off), NCHW, eager: the baseline of every ratio
    fp32+cl           the same arithmetic, channels-last (train.channels_last, the default)
    fp32+cl+compile   ... and torch.compile (train.compile)
    tf32+cl           TF32 tensor cores (GPU only)
    bf16+cl           bf16 autocast for forward and loss (GPU only)
    bf16+cl+compile

Setups: `paper`, the paper's basic setup (diffmem.config defaults: 128 channels, [2, 2, 2], 2 blocks,
attention at 16, dropout 0.13, VP; 32x32x3, batch 64 = one GPU's share of 512 on 8; paper.md §6), and
`digits`, the model of experiments/digits.yaml at 8x8x1, batch 64, which is what the CPU default trains.
Images/s is measured over the steps after the first window (compilation and cuDNN's algorithm search are in
the first window, reported on their own). Every figure is printed as a ratio against fp32 measured in the
same run; on a GPU the absolute images/s count too.

The distance to the machine's limit: each variant's achieved FLOP/s (the step's convolutions and matrix
products as PyTorch's FLOP counter counts them, forward and backward, times steps per second) as a fraction of
the machine's dense matrix-multiply FLOP/s in the same precision, measured in the same run.

--packed: images/s of K trainings packed in one process (diffmem/packed.py, K = 1, 2, 4, 8, 16; all K
trainings' images together) against one training alone (diffmem.train), digits model, fp32.

    python bench/train_step.py [--json PATH]     # CPU: digits (3 variants) and paper (2 variants), ~5 min
    bash bench/gpu_check.sh                      # a lent GPU: paper, all variants, and the evaluation
    python bench/train_step.py --smoke           # toy sizes (tests/test_fast_path.py)
    python bench/train_step.py --packed          # K packed digits trainings against one, ~3 min on 2 cores
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffmem.train  # noqa: E402
from bench.common import machine_line, write_json  # noqa: E402
from diffmem.config import load_config  # noqa: E402
from diffmem.data import TrainingSet  # noqa: E402
from diffmem.edm import denoising_loss  # noqa: E402
from diffmem.evaluate import generate  # noqa: E402
from diffmem.memorization import nearest_neighbours, to_pixels  # noqa: E402
from diffmem.precision import autocast, full_precision, training_precision  # noqa: E402
from diffmem.train import build_denoiser, measure_speed  # noqa: E402

VARIANTS = {   # name -> (precision, channels_last, compile)
    "fp32": ("fp32", False, False), "fp32+cl": ("fp32", True, False), "fp32+cl+compile": ("fp32", True, True),
    "tf32+cl": ("tf32", True, False), "bf16+cl": ("bf16", True, False), "bf16+cl+compile": ("bf16", True, True)}
ROOT = Path(__file__).resolve().parents[1]
SETUPS = {   # name -> (config file or None for the defaults, image shape)
    "paper": (None, (3, 32, 32)), "digits": (str(ROOT / "experiments" / "digits.yaml"), (1, 8, 8)),
    "smoke": (None, (3, 8, 8))}
SMOKE_MODEL = {"model.channels": 16, "model.channel_mult": [1, 2], "model.num_blocks": 1, "model.attn_resolutions": []}
PACKS = (1, 2, 4, 8, 16)
CPU_PLAN = {   # setup -> (variants, warm-up steps, timed steps): about five minutes on 2 cores
    "digits": (["fp32", "fp32+cl", "fp32+cl+compile"], 20, 200), "paper": (["fp32", "fp32+cl"], 1, 2)}


def synthetic_set(size: int, shape, seed: int = 0) -> TrainingSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, *shape), generator=g, dtype=torch.uint8)
    return TrainingSet(images.float() / 127.5 - 1, None, 0, np.arange(size))


def setup_config(setup: str, overrides: dict):
    path, shape = SETUPS[setup]
    base = {"data.resolution": shape[-1]} if path is None else {}
    return load_config(path, {**base, **(SMOKE_MODEL if setup == "smoke" else {}), **overrides})


def measure_training(setup: str, name: str, data: TrainingSet, batch: int, warmup: int, steps: int,
                     device: torch.device, pack: int = 1) -> dict:
    precision, channels_last, compile_ = VARIANTS[name]
    cfg = setup_config(setup, {
        "data.size": len(data.images), "train.batch_size": batch, "train.precision": precision,
        "train.channels_last": channels_last, "train.compile": compile_, "train.device": device.type,
        "eval.num_samples": 8, "eval.batch_size": 8, "eval.num_steps": 2})
    speed = measure_speed(cfg, warmup, steps, train_set=data, pack=pack)   # the synthetic set, not a dataset on disk
    flops = step_flops(cfg, data, batch, device)
    achieved = flops * speed["images_per_sec"] / batch   # all of a pack's trainings together
    return {"setup": setup, "variant": name, "pack": pack, "step_flops": flops, "flops_per_sec": achieved,
            **{k: speed[k] for k in ("images_per_sec", "ms_per_step", "first_window_s", "wall_s", "final_loss",
                                     "peak_gib")}}


def step_flops(cfg, data: TrainingSet, batch: int, device: torch.device) -> int:
    """FLOPs of one training step at `batch`: forward and backward of the loss, convolutions and matrix products
    as torch.utils.flop_counter counts them (elementwise work, normalisation and attention's softmax are not
    counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg, data).to(device).train()
    images = data.images[torch.arange(batch) % len(data.images)].to(device)
    with FlopCounterMode(display=False) as counter, training_precision(cfg.train.precision), \
            autocast(cfg.train.precision, device):
        denoising_loss(denoiser, images).mean().backward()
    return counter.get_total_flops()


def matmul_flops_per_sec(device: torch.device, precision: str, repeats: int = 10) -> float:
    """The machine's dense matrix-multiply FLOP/s in this precision (n x n times n x n, n = 1024 on a CPU, 8192
    on a GPU; the best of `repeats`): the ceiling a training step's FLOP/s is measured against."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    with training_precision("tf32" if precision == "tf32" else "fp32"):
        for _ in range(repeats + 2):
            sync()
            tic = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - tic)
    return 2 * n ** 3 / best


def measure_evaluation(setup: str, data: TrainingSet, args, device: torch.device) -> dict:
    cfg = setup_config(setup, {"data.size": len(data.images), "eval.num_samples": args.eval_samples,
                               "eval.batch_size": args.eval_batch, "eval.num_steps": 3 if args.smoke else 18})
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg, data).to(device, memory_format=torch.channels_last).eval()
    on_device = TrainingSet(data.images.to(device), None, 0, data.indices)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    small = setup_config(setup, {"eval.num_samples": 2, "eval.batch_size": 2})
    generate(denoiser, on_device, small.eval, device)   # warm-up: cuDNN algorithm search, allocator
    sync()
    tic = time.perf_counter()
    generate(denoiser, on_device, cfg.eval, device)
    sync()
    sampling = time.perf_counter() - tic
    queries = torch.rand((args.nn_samples, *data.images.shape[1:]), generator=torch.Generator().manual_seed(1)) * 2 - 1
    with full_precision(device):
        gen_px, train_px = to_pixels(queries.to(device)).float(), to_pixels(on_device.images).float()
        nearest_neighbours(gen_px[:8], train_px, k=2)
        sync()
        tic = time.perf_counter()
        nearest_neighbours(gen_px, train_px, k=2)
        sync()
    search = time.perf_counter() - tic
    per_10k = sampling * 10000 / args.eval_samples
    return {"eval_samples": args.eval_samples, "eval_batch": args.eval_batch, "sampling_s": sampling,
            "sampling_s_per_10k": per_10k, "nn_samples": args.nn_samples, "train_images": len(data.images),
            "nn_search_s": search, "evaluation_s_per_10k": per_10k + search * 10000 / args.nn_samples}


def run_setup(setup: str, variants: list, batch: int, warmup: int, steps: int, size: int, device) -> list:
    data = synthetic_set(size, SETUPS[setup][1])
    rows = []
    for variant in variants:
        rows.append(measure_training(setup, variant, data, batch, warmup, steps, device))
    base = next((r for r in rows if r["variant"] == "fp32"), rows[0])
    peaks = {}
    for r in rows:
        precision = VARIANTS[r["variant"]][0]
        if precision not in peaks:
            peaks[precision] = matmul_flops_per_sec(device, precision)
        r["matmul_flops_per_sec"] = peaks[precision]
        r["flops_fraction"] = r["flops_per_sec"] / peaks[precision]
        r["ratio_vs_" + base["variant"]] = r["images_per_sec"] / base["images_per_sec"]
        print(f"train_step {setup} {r['variant']}/{base['variant']} images/s {r['ratio_vs_' + base['variant']]:.2f}x"
              f"  [{r['images_per_sec']:.1f} images/s, {r['ms_per_step']:.1f} ms/step at batch {batch}, first window "
              f"{r['first_window_s']:.1f} s, {steps} timed steps, peak {r['peak_gib']:.2f} GiB, loss "
              f"{r['final_loss']:.3f}]", flush=True)
        print(f"train_step {setup} {r['variant']} FLOP/s / {precision} matmul FLOP/s {r['flops_fraction']:.3f}"
              f"  [{r['step_flops'] / 1e9:.2f} GFLOP per step, {r['flops_per_sec'] / 1e9:.1f} GFLOP/s of "
              f"{peaks[precision] / 1e9:.1f}]", flush=True)
    return rows


def run_packed(setup: str, batch: int, warmup: int, steps: int, size: int, device, packs=PACKS) -> list:
    """Images/s of K packed trainings (all K together) against one training alone, fp32, the same data."""
    data = synthetic_set(size, SETUPS[setup][1])
    first = measure_training(setup, "fp32", data, batch, warmup, steps, device)
    rows = [measure_training(setup, "fp32", data, batch, warmup, max(steps // k, 8), device, pack=k) for k in packs]
    # alone again after the packs, and the faster of the two: a machine that warms up or slows down favours neither
    alone = max(first, measure_training(setup, "fp32", data, batch, warmup, steps, device),
                key=lambda r: r["images_per_sec"])
    for k, r in zip(packs, rows):
        r["ratio_vs_alone"] = r["images_per_sec"] / alone["images_per_sec"]
        print(f"train_step {setup} packed K={k}/alone images/s {r['ratio_vs_alone']:.2f}x  [{r['images_per_sec']:.1f} "
              f"images/s of {k} trainings, {r['ms_per_step']:.1f} ms per pack step; "
              f"alone {alone['images_per_sec']:.1f} images/s]", flush=True)
    return [{**alone, "variant": "alone"}, *rows]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", choices=["paper", "digits"], help="one setup only (default: both on CPU, paper on GPU)")
    p.add_argument("--variants", help=f"comma list of {', '.join(VARIANTS)} (default: per setup and device)")
    p.add_argument("--batch", type=int, default=64, help="images per step (64: one GPU's share of 512 on 8)")
    p.add_argument("--warmup", type=int, help="steps in the first window (compilation, cuDNN search)")
    p.add_argument("--steps", type=int, help="timed steps after it")
    p.add_argument("--size", type=int, default=50000, help="|D|, synthetic images held on the device")
    p.add_argument("--eval", action="store_true", help="also time one evaluation (the default on a GPU)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation timing on a GPU")
    p.add_argument("--eval-samples", type=int, default=2000, help="seeds sampled to time sampling (scaled to 10k)")
    p.add_argument("--eval-batch", type=int, default=1000, help="eval.batch_size")
    p.add_argument("--nn-samples", type=int, default=10000, help="samples in the timed nearest-neighbour search")
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU (compile through Dynamo's eager backend)")
    p.add_argument("--packed", action="store_true", help="K packed trainings against one (digits unless --setup)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    unknown = [v for v in (args.variants or "").split(",") if v and v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        plan = {"smoke": (args.variants.split(",") if args.variants else ["fp32", "fp32+cl"], 2, 3)}
        args.batch, args.size, args.eval_samples, args.eval_batch, args.nn_samples = 8, 32, 4, 4, 16
        diffmem.train.COMPILE_OPTIONS = {"backend": "eager"}
    elif device.type == "cuda":
        plan = {args.setup or "paper": (list(VARIANTS), 20, 100)}
    else:
        plan = {k: v for k, v in CPU_PLAN.items() if args.setup in (None, k)}
    if args.variants and not args.smoke:
        plan = {k: (args.variants.split(","), w, s) for k, (_, w, s) in plan.items()}
    machine = machine_line(device)
    print(machine, flush=True)
    figures = {"machine": machine, "device": str(device), "batch": args.batch, "size": args.size,
               "training": [], "evaluation": None}
    if args.packed:
        setup = "smoke" if args.smoke else (args.setup or "digits")
        warmup, steps = (2, 4) if args.smoke else (args.warmup or 5, args.steps or 64)
        figures["packed"] = run_packed(setup, args.batch, warmup, steps, args.size, device,
                                       (1, 2) if args.smoke else PACKS)
        write_json(args.json, figures)
        return figures
    for setup, (variants, warmup, steps) in plan.items():
        figures["training"] += run_setup(setup, variants, args.batch, args.warmup or warmup, args.steps or steps,
                                         args.size, device)
    if (device.type == "cuda" or args.eval or args.smoke) and not args.no_eval:
        setup = next(iter(plan))
        evaluation = measure_evaluation(setup, synthetic_set(args.size, SETUPS[setup][1]), args, device)
        figures["evaluation"] = evaluation
        print(f"evaluation (exact fp32, channels-last): sampling {evaluation['sampling_s']:.1f} s for "
              f"{args.eval_samples} seeds -> {evaluation['sampling_s_per_10k']:.1f} s per 10k; nearest neighbours of "
              f"{args.nn_samples} samples in {args.size} images {evaluation['nn_search_s']:.2f} s; one evaluation "
              f"of 10k samples ~{evaluation['evaluation_s_per_10k']:.1f} s", flush=True)
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()

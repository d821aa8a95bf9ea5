"""Training throughput of the fast-path settings and the cost of one memorization evaluation, on one GPU.

Trains DDPM++ at the paper's basic setup (diffmem.config defaults: 128 channels, [2, 2, 2], 2 blocks, attention
at 16, dropout 0.13, VP; paper.md §6) through diffmem.train.train itself, on a synthetic set of 32x32x3 images
(|D| = 50,000 by default, held on the GPU as in a real run), for a fixed number of steps per setting:

    fp32              the paper's arithmetic (TF32 off), NCHW
    fp32+cl           the same arithmetic, channels-last (the default)
    fp32+cl+compile   ... and torch.compile
    tf32+cl           TF32 tensor cores
    bf16+cl           bf16 autocast for forward and loss
    bf16+cl+compile

Images/s is measured over the steps after the first window (the first window holds compilation and cuDNN's
algorithm search, reported on its own). The default batch, 64, is one GPU's share of the paper's 512 on 8
GPUs, so 8x images/s approximates an 8-GPU trial before gradient all-reduce costs.

Then the evaluation: sampling with the 18-step Heun sampler (35 network evaluations) in exact fp32, timed on
--eval-samples seeds and scaled to 10,000, and the nearest-neighbour search of 10,000 samples against the
|D| training images, timed in full.

    bash bench/gpu_check.sh                         # on a GPU machine (prints the tables below)
    python bench/gpu_check.py --smoke               # the same code on CPU at toy size (tests/test_fast_path.py)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffmem.train  # noqa: E402
from diffmem.config import load_config  # noqa: E402
from diffmem.data import TrainingSet  # noqa: E402
from diffmem.evaluate import generate  # noqa: E402
from diffmem.memorization import nearest_neighbours, to_pixels  # noqa: E402
from diffmem.precision import full_precision  # noqa: E402
from diffmem.train import build_denoiser, train  # noqa: E402

VARIANTS = {   # name -> (precision, channels_last, compile)
    "fp32": ("fp32", False, False), "fp32+cl": ("fp32", True, False), "fp32+cl+compile": ("fp32", True, True),
    "tf32+cl": ("tf32", True, False), "bf16+cl": ("bf16", True, False), "bf16+cl+compile": ("bf16", True, True)}
SMOKE_MODEL = {"model.channels": 16, "model.channel_mult": [1, 2], "model.num_blocks": 1, "model.attn_resolutions": []}


def synthetic_set(size: int, resolution: int, seed: int = 0) -> TrainingSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, 3, resolution, resolution), generator=g, dtype=torch.uint8)
    return TrainingSet(images.float() / 127.5 - 1, None, 0, np.arange(size))


def measure_training(name: str, data: TrainingSet, args, device: torch.device) -> dict:
    precision, channels_last, compile_ = VARIANTS[name]
    warm, total = args.warmup * args.batch, (args.warmup + args.steps) * args.batch
    overrides = {**(SMOKE_MODEL if args.smoke else {}), "data.size": len(data.images), "train.batch_size": args.batch,
                 "train.duration": f"{total / 1000}kimg", "eval.every": f"{warm / 1000}kimg",
                 "train.log_every": f"{total / 1000}kimg", "train.lr_warmup": "0",
                 "train.precision": precision, "train.channels_last": channels_last, "train.compile": compile_,
                 "train.device": device.type, "eval.num_samples": 8, "eval.batch_size": 8, "eval.num_steps": 2}
    cfg = load_config(None, overrides)
    marks = []
    diffmem.train.training_set = lambda _: data   # the synthetic set instead of a dataset on disk
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    train(cfg, report=lambda metrics, saved: marks.append(metrics), log=lambda *_: None)
    wall = time.perf_counter() - start
    (first, last) = marks[0], marks[-1]
    t_first = first["images_seen"] / first["images_per_sec"]
    t_last = last["images_seen"] / last["images_per_sec"]
    steady = (last["images_seen"] - first["images_seen"]) / max(t_last - t_first, 1e-9)
    return {"variant": name, "images_per_sec": steady, "ms_per_step": 1000 * args.batch / steady,
            "first_window_s": t_first, "wall_s": wall, "final_loss": last["loss"],
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")}


def measure_evaluation(data: TrainingSet, args, device: torch.device) -> dict:
    cfg = load_config(None, {**(SMOKE_MODEL if args.smoke else {}), "data.size": len(data.images),
                             "eval.num_samples": args.eval_samples, "eval.batch_size": args.eval_batch,
                             "eval.num_steps": 3 if args.smoke else 18})
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg, data).to(device, memory_format=torch.channels_last).eval()
    on_device = TrainingSet(data.images.to(device), None, 0, data.indices)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    small = load_config(None, {**(SMOKE_MODEL if args.smoke else {}), "eval.num_samples": 2, "eval.batch_size": 2})
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--batch", type=int, default=64, help="images per step (64: one GPU's share of 512 on 8)")
    p.add_argument("--warmup", type=int, default=20, help="steps in the first window (compilation, cuDNN search)")
    p.add_argument("--steps", type=int, default=100, help="timed steps after it")
    p.add_argument("--size", type=int, default=50000, help="|D|, synthetic 32x32x3 images held on the device")
    p.add_argument("--eval-samples", type=int, default=2000, help="seeds sampled to time sampling (scaled to 10k)")
    p.add_argument("--eval-batch", type=int, default=1000, help="eval.batch_size")
    p.add_argument("--nn-samples", type=int, default=10000, help="samples in the timed nearest-neighbour search")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation timing")
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU (compile through Dynamo's eager backend)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if args.smoke:
        args.batch, args.warmup, args.steps, args.size = 8, 2, 3, 32
        args.eval_samples, args.eval_batch, args.nn_samples = 4, 4, 16
        diffmem.train.COMPILE_OPTIONS = {"backend": "eager"}
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}; torch {torch.__version__}; batch {args.batch}; |D| {args.size}; "
          f"{args.warmup} + {args.steps} steps per variant", flush=True)
    data = synthetic_set(args.size, 8 if args.smoke else 32)
    rows = []
    print(f"{'variant':18s} {'images/s':>10s} {'ms/step':>8s} {'first window s':>15s} {'peak GiB':>9s} {'loss':>9s}")
    for variant in args.variants.split(","):
        row = measure_training(variant, data, args, device)
        rows.append(row)
        print(f"{variant:18s} {row['images_per_sec']:10.1f} {row['ms_per_step']:8.2f} {row['first_window_s']:15.1f} "
              f"{row['peak_gib']:9.2f} {row['final_loss']:9.3f}", flush=True)
    base = next((r for r in rows if r["variant"] == "fp32"), rows[0])
    for row in rows:
        row["speedup_vs_" + base["variant"]] = row["images_per_sec"] / base["images_per_sec"]
    print("speed-up against " + base["variant"] + ": "
          + ", ".join(f"{r['variant']} {r['speedup_vs_' + base['variant']]:.2f}x" for r in rows))
    evaluation = None
    if not args.no_eval:
        evaluation = measure_evaluation(data, args, device)
        print(f"evaluation (exact fp32, channels-last): sampling {evaluation['sampling_s']:.1f} s for "
              f"{args.eval_samples} seeds -> {evaluation['sampling_s_per_10k']:.1f} s per 10k; nearest neighbours of "
              f"{args.nn_samples} samples in {args.size} images {evaluation['nn_search_s']:.2f} s; one evaluation "
              f"of 10k samples ~{evaluation['evaluation_s_per_10k']:.1f} s", flush=True)
    figures = {"device": name, "torch": torch.__version__, "batch": args.batch, "size": args.size,
               "training": rows, "evaluation": evaluation}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()

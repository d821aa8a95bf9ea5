"""Train one EDM model on one training subset and measure how much it memorizes.

The paper's procedure (paper.md §6): Adam with L2 weight decay, linear lr warm-up, EMA, no augmentation,
one fixed shuffle cycled every epoch; a snapshot every `eval.every`, whose EMA model is sampled and scored;
the reported number is the highest memorization ratio over snapshots. Once that running maximum reaches
`eval.stop_at` the answer cannot change, so training may stop there.

Speed (train.precision, train.channels_last, train.compile; diffmem/precision.py): the training subset is
moved to the device once and every batch is an index gather there, so there is no DataLoader and nothing to
pin. The step never waits for the GPU: the loss is summed on the device and read (and checked for NaN) only
at log and evaluation points; the EMA is one fused multi-tensor lerp. Under DDP every rank samples its share
of the evaluation seeds (diffmem/evaluate.py).

    python -m diffmem.train --config experiments/digits.yaml --set data.size=64
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from diffmem.config import Config, ConfigError, duration_images
from diffmem.data import TrainingSet, save_grid, training_set
from diffmem.edm import PRECONDITIONERS, denoising_loss
from diffmem.evaluate import evaluate_denoiser, nn_grid_rows
from diffmem.networks import DDPMpp
from diffmem.pictures import nn_grid_picture, nn_ratio_markdown
from diffmem.precision import autocast, training_precision

CHECKPOINT = "checkpoint/checkpoint.pt"   # in its own folder: the sweep hands that folder to Tune
COMPILE_OPTIONS: dict = {}   # keyword arguments of torch.compile under train.compile, e.g. {"mode": "max-autotune"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: this training's result would be garbage."""


@dataclass
class TrainResult:
    best_mem_ratio: float
    images_seen: int
    steps: int
    stopped_early: bool
    history: list = field(default_factory=list)   # one dict per evaluation
    train_seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))
    if device.type == "cuda" and device.index is None:   # the worker's own GPU (Ray Train sets it per worker)
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def build_denoiser(cfg: Config, train_set: TrainingSet) -> torch.nn.Module:
    m = cfg.model
    channels, resolution = train_set.images.shape[1], train_set.images.shape[-1]
    net = DDPMpp(img_resolution=resolution, in_channels=channels, out_channels=channels,
                 label_dim=train_set.label_dim, model_channels=m.channels, channel_mult=m.channel_mult,
                 channel_mult_emb=m.channel_mult_emb, num_blocks=m.num_blocks,
                 attn_resolutions=m.attn_resolutions, dropout=m.dropout, embedding=m.embedding,
                 skip_connections=m.skip_connections)
    return PRECONDITIONERS[m.precond](net)


def ema_beta(cfg: Config, batch: int, images_seen: int, size: int) -> float:
    """EDM's EMA with the paper's scaling: half-life in epochs of |D|, ramped up to <= rampup * images seen."""
    t = cfg.train
    rampup = images_seen * t.ema_rampup if t.ema_rampup else math.inf
    beta_ramp = 0.5 ** (batch / max(rampup, 1e-8))
    if t.ema_beta is not None:           # paper Table 3: a fixed beta after the ramp-up
        return min(t.ema_beta, beta_ramp)
    halflife = min(duration_images(t.ema_halflife, size), rampup)
    return 0.5 ** (batch / max(halflife, 1e-8))


def train(cfg: Config, run_dir: str | Path | None = None,
          report: Callable[[dict, Path | None], None] | None = None, writer=None, log=print,
          train_set: TrainingSet | None = None) -> TrainResult:
    """Train cfg on its subset (or on `train_set`, e.g. a benchmark's synthetic images); resume from
    run_dir/checkpoint/checkpoint.pt if present. report(metrics, checkpoint) is called after every evaluation
    (the sweep layer forwards it; this package knows nothing of Ray)."""
    cudnn_benchmark = torch.backends.cudnn.benchmark
    try:
        with training_precision(cfg.train.precision):
            # EDM's setting: cuDNN picks the fastest convolution algorithm per shape (shapes never change here)
            torch.backends.cudnn.benchmark = resolve_device(cfg.train.device).type == "cuda"
            return _train(cfg, run_dir, report, writer, log, train_set)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark


def _train(cfg: Config, run_dir, report, writer, log, train_set=None) -> TrainResult:
    t, e = cfg.train, cfg.eval
    device = resolve_device(t.device)
    # Under torch.distributed (DDP, one process per worker) each worker takes its slice of the global batch
    # (rows rank, rank + world, ...) and, from a noise generator seeded alike on every rank, the noise levels and
    # noise that one process draws for those rows (denoising_loss's shard); DDP averages gradients, so the
    # update is the single-process one (paper: 512 = 8 x 64) up to float rounding (tests/test_fast_path.py).
    # Only dropout masks (the default generator, seed + rank) are each rank's own.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the {world} workers")
    torch.manual_seed(t.seed + rank)
    data = train_set if train_set is not None else training_set(cfg.data)
    layout = torch.channels_last if t.channels_last else torch.contiguous_format
    images = data.images.to(device).contiguous(memory_format=layout)   # on the device once, for the whole run
    labels = None if data.labels is None else data.labels.to(device)
    n, batch = len(images), t.batch_size
    total = duration_images(t.duration, n, "train.duration")
    warmup = 0 if str(t.lr_warmup).strip() in ("0", "0ep", "0kimg") else duration_images(t.lr_warmup, n)
    eval_every = duration_images(e.every, n, "eval.every")
    log_every = duration_images(t.log_every, n, "train.log_every")

    denoiser = build_denoiser(cfg, data).to(device, memory_format=layout).train()
    net = denoiser.net
    if distributed:   # every rank starts from rank 0's weights, the EMA included (DDP would sync only the net)
        for tensor in [*denoiser.parameters(), *denoiser.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    opt = torch.optim.Adam(denoiser.parameters(), lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay)
    noise_rng = torch.Generator(device=device).manual_seed(t.seed)   # the same stream on every rank
    order = torch.randperm(n, generator=torch.Generator().manual_seed(t.seed)).to(device)  # one shuffle, every epoch
    state = {"step": 0, "images_seen": 0, "best": 0.0, "history": [], "train_seconds": 0.0,
             "eval_seconds": 0.0}

    run_dir = Path(run_dir) if run_dir is not None else None
    ckpt_path = run_dir / CHECKPOINT if run_dir is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        if ckpt["world"] == world:   # the same workers continue their own random streams
            noise_rng.set_state(ckpt["noise_rng"][rank].to(noise_rng.get_state().device))
            torch.set_rng_state(ckpt["torch_rng"][rank])
            cuda_rng = ckpt.get("cuda_rng", [None] * world)[rank]
            if cuda_rng is not None and device.type == "cuda":   # dropout draws from the GPU's generator
                torch.cuda.set_rng_state(cuda_rng, device)
        state = ckpt["state"]
        log(f"resumed from {ckpt_path} at {state['images_seen']} images")
    if distributed:
        denoiser.net = torch.nn.parallel.DistributedDataParallel(net)
    if t.compile:   # training only: the EMA copy is sampled uncompiled (DDP first, then compile, as PyTorch advises)
        denoiser.net = torch.compile(denoiser.net, **COMPILE_OPTIONS)
    ema_params, params = list(ema.parameters()), list(denoiser.parameters())

    def stopped():
        return e.stop_at is not None and state["best"] >= e.stop_at

    if state["history"] and (state["images_seen"] >= total or stopped()) and report is not None:
        report(state["history"][-1], ckpt_path)   # resumed after its last evaluation: say the answer again
    next_eval = (state["images_seen"] // eval_every + 1) * eval_every
    next_log = (state["images_seen"] // log_every + 1) * log_every
    tic, loss_sum, loss_count = time.perf_counter(), torch.zeros((), device=device), 0

    def check_finite():   # read on the host only here, so the steps in between never wait for the GPU
        if not torch.isfinite(loss_sum):
            raise TrainingDiverged(f"loss became {loss_sum.item()} within the {loss_count} steps up to step "
                                   f"{state['step']} ({state['images_seen']} images seen); lower train.lr "
                                   f"(now {t.lr:g}) or check the data")

    while state["images_seen"] < total and not stopped():
        idx = order[(torch.arange(batch, device=device) + state["images_seen"]) % n][rank::world]
        lr = t.lr * min(state["images_seen"] / warmup, 1.0) if warmup else t.lr
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast(t.precision, device):   # bf16: forward and loss only; backward follows the forward's dtypes
            loss = denoising_loss(denoiser, images[idx], None if labels is None else labels[idx], noise_rng,
                                  (rank, world)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in params:   # EDM/paper: sanitise NaN/Inf gradients
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt.step()
        state["step"] += 1
        state["images_seen"] += batch
        beta = ema_beta(cfg, batch, state["images_seen"], n)
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - beta)
        loss_sum, loss_count = loss_sum + loss.detach(), loss_count + 1

        if state["images_seen"] >= next_log:
            next_log += log_every
            if distributed:   # the global batch's loss, as one process logs it (every rank ran loss_count steps)
                torch.distributed.all_reduce(loss_sum)
                loss_sum = loss_sum / world
            check_finite()
            if writer is not None:
                writer.add_scalar("train/loss", loss_sum.item() / loss_count, state["images_seen"])
                writer.add_scalar("train/lr", lr, state["images_seen"])
            loss_sum, loss_count = torch.zeros((), device=device), 0

        if state["images_seen"] >= next_eval or state["images_seen"] >= total:
            next_eval += eval_every
            check_finite()
            last_loss = loss.detach().clone()
            if distributed:   # the last step's loss over the global batch
                torch.distributed.all_reduce(last_loss)
                last_loss = last_loss / world
            if device.type == "cuda":
                torch.cuda.synchronize(device)   # the clock stops when the GPU, not the host, is done
            state["train_seconds"] += time.perf_counter() - tic
            metrics = None
            # Every worker samples its share of the seeds; rank 0 gathers them and scores (others get None).
            eval_tic = time.perf_counter()
            result = evaluate_denoiser(ema, data, e, device=device, rank=rank, world=world)
            state["eval_seconds"] = state.get("eval_seconds", 0.0) + time.perf_counter() - eval_tic
            if rank == 0:
                state["best"] = max(state["best"], result.ratio)
                metrics = {"images_seen": state["images_seen"], "planned_images": total, "epoch": state["images_seen"] / n,
                           "step": state["step"], "loss": last_loss.item(), "lr": lr, "mem_ratio": result.ratio,
                           "best_mem_ratio": state["best"],
                           "images_per_sec": state["images_seen"] / max(state["train_seconds"], 1e-9),
                           "step_seconds": state["train_seconds"], "eval_seconds": state["eval_seconds"]}
            if distributed:
                shared = [metrics]
                torch.distributed.broadcast_object_list(shared, src=0)
                metrics = shared[0]
                state["best"] = metrics["best_mem_ratio"]
            state["history"].append(metrics)
            rng = _gather_rng(noise_rng, world, device)
            saved = None
            if rank == 0 and ckpt_path is not None:
                saved = _save_checkpoint(ckpt_path, net, ema, opt, rng, world, state)
            if rank == 0:
                _log_evaluation(writer, run_dir, log, metrics, result, data)
            if report is not None:
                report(metrics, saved)
            tic = time.perf_counter()
    state["train_seconds"] += time.perf_counter() - tic
    return TrainResult(state["best"], state["images_seen"], state["step"], stopped() and state["images_seen"] < total,
                       state["history"], state["train_seconds"])


def measure_speed(cfg: Config, warmup: int, steps: int, train_set: TrainingSet | None = None) -> dict:
    """Time cfg's training through train() itself: `warmup` steps (compilation, cuDNN's algorithm search, the
    allocator), then `steps` timed steps, with an evaluation (cfg.eval as given) every `warmup` steps and at
    the end. cfg's duration, lr warm-up, logging and early stop are replaced for the purpose; the data is
    cfg.data's subset, or `train_set`. Returns images_per_sec and ms_per_step of the timed steps, the
    seconds of one evaluation after the first (eval_seconds), the first window's seconds, the wall time, the
    last loss and, on a GPU, the peak memory. Used by bench/train_step.py and sweeps/emm_search.py --estimate."""
    cfg = copy.deepcopy(cfg)
    batch = cfg.train.batch_size
    warm, total = warmup * batch, (warmup + steps) * batch
    cfg.train.duration, cfg.train.lr_warmup = f"{total / 1000}kimg", "0"
    cfg.train.log_every, cfg.eval.every, cfg.eval.stop_at = f"{total / 1000}kimg", f"{warm / 1000}kimg", None
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    marks = []
    start = time.perf_counter()
    train(cfg, report=lambda metrics, saved: marks.append(metrics), log=lambda *_: None, train_set=train_set)
    wall = time.perf_counter() - start
    first, last = marks[0], marks[-1]
    steady = (last["images_seen"] - first["images_seen"]) / max(last["step_seconds"] - first["step_seconds"], 1e-9)
    return {"images_per_sec": steady, "ms_per_step": 1000 * batch / steady, "first_window_s": first["step_seconds"],
            "eval_seconds": (last["eval_seconds"] - first["eval_seconds"]) / max(len(marks) - 1, 1),
            "wall_s": wall, "final_loss": last["loss"],
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")}


def _gather_rng(noise_rng, world: int, device: torch.device) -> tuple[list, list, list]:
    """Every worker's RNG states (noise, CPU, and on a GPU its default generator, which draws the dropout masks),
    so a resumed run continues the same random streams."""
    mine = (noise_rng.get_state().cpu(), torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    if world == 1:
        everyone = [mine]
    else:
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, mine)
    return [s[0] for s in everyone], [s[1] for s in everyone], [s[2] for s in everyone]


def _save_checkpoint(path: Path, net, ema, opt, rng, world: int, state) -> Path:
    """Model, EMA, optimizer, step and RNG states; written to a temporary name, then renamed (atomic). With the
    config (the data subset and the shuffle follow from it) this file is all a resumed run needs: it is the one
    file of the folder the sweep hands to Tune / Ray Train, and the one sweeps/trainable.py copies back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "noise_rng": rng[0], "torch_rng": rng[1], "cuda_rng": rng[2], "world": world, "state": state}, tmp)
    os.replace(tmp, path)
    return path


def _log_evaluation(writer, run_dir, log, metrics, result, data) -> None:
    step = metrics["images_seen"]
    if writer is not None:
        for key in ("mem_ratio", "best_mem_ratio"):
            writer.add_scalar(f"memorization/{key}", metrics[key], step)
        writer.add_scalar("train/images_per_sec", metrics["images_per_sec"], step)
        # the picture carries each sample's distance ratio under its column; the text tab has them as a table
        writer.add_image("samples/generated_nn1_nn2", nn_grid_picture(result, data), step, dataformats="HWC")
        writer.add_text("samples/nn_ratio", nn_ratio_markdown(result), step)
    if run_dir is not None:
        save_grid(run_dir / "samples.png", nn_grid_rows(result, data))
    log(f"{step:>10d} img  epoch {metrics['epoch']:8.1f}  loss {metrics['loss']:.4f}  "
        f"mem_ratio {metrics['mem_ratio']:.4f}  best {metrics['best_mem_ratio']:.4f}")


def main(argv=None) -> int:
    from diffmem.cli import run_cli

    def run(cfg, run_dir, writer):
        result = train(cfg, run_dir, writer=writer)
        print(f"|D|={cfg.data.size}: best memorization ratio {result.best_mem_ratio:.4f} over "
              f"{len(result.history)} evaluations, {result.images_seen} images, {result.train_seconds:.1f} s"
              f"{' (stopped early)' if result.stopped_early else ''}; run folder {run_dir}")
        return 0

    return run_cli("diffmem.train", "train one EDM model and print its memorization ratio", run, argv)


if __name__ == "__main__":   # through the imported module, so its exception classes are the ones caught
    from diffmem.train import main
    raise SystemExit(main())

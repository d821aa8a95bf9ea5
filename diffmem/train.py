"""Train one EDM model on one training subset and measure how much it memorizes.

The paper's procedure (paper.md §6): Adam with L2 weight decay, linear lr warm-up, EMA, no augmentation,
one fixed shuffle cycled every epoch; a snapshot every `eval.every`, whose EMA model is sampled and scored;
the reported number is the highest memorization ratio over snapshots. Once that running maximum reaches
`eval.memorized_at` the answer cannot change, so training may stop there.

With eval.adaptive a snapshot's evaluation may stop early, once its sequential test decides
(diffmem/sequential.py); its ratio is then over the samples it used (num_samples in the metrics) and lies on
the side of memorized_at it decided, so "the running maximum reaches memorized_at" still means "some
snapshot decided memorized", as with the fixed evaluation. Each snapshot is one decision: an early one is
wrong about that snapshot's true ratio with probability <= eval.adaptive_error. The maximum over S snapshots
is the paper's rule and is biased upwards with either evaluation (the luckiest of S draws); the adaptive one
adds at most eval.adaptive_error per snapshot to the chance that a snapshot whose true ratio is below
memorized_at is called memorized (bench/eval_adaptive.py measures how often it decides unlike all seeds).

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
from diffmem.data import TrainingSet, save_png, training_set
from diffmem.edm import PRECONDITIONERS, denoising_loss
from diffmem.ema import ema_beta, halflife_images, rampup_end
from diffmem.evaluate import evaluate_denoiser, sequential_test
from diffmem.sequential import ratio_interval
from diffmem.networks import SongUNet
from diffmem.pictures import nn_grid_picture, nn_ratio_markdown
from diffmem.precision import autocast, training_precision

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8   # EDM and the paper: Adam with these, L2 weight decay
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
    step_seconds: float = 0.0       # inside training steps (no evaluation, no start-up)


def resolve_device(name: str) -> torch.device:
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available()
                          else ("cpu" if name == "auto" else name))
    if device.type == "cuda" and device.index is None:   # the worker's own GPU (Ray Train sets it per worker)
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def build_denoiser(cfg: Config, train_set: TrainingSet) -> torch.nn.Module:
    m = cfg.model
    channels, resolution = train_set.images.shape[1], train_set.images.shape[-1]
    net = SongUNet(img_resolution=resolution, in_channels=channels, out_channels=channels,
                   label_dim=train_set.label_dim, model_channels=m.channels, channel_mult=m.channel_mult,
                   channel_mult_emb=m.channel_mult_emb, num_blocks=m.num_blocks,
                   attn_resolutions=m.attn_resolutions, dropout=m.dropout, embedding=m.embedding,
                   channel_mult_noise=m.channel_mult_noise, encoder=m.encoder,
                   resample_filter=m.resample_filter, skip_connections=m.skip_connections)
    return PRECONDITIONERS[m.precond](net)


@dataclass(frozen=True)
class Schedule:
    """What a training of cfg on `size` images follows, every count in images (printed by --dry-run). The
    learning rate and the EMA decay of a step are those of the images seen before it, as in EDM's loop."""
    size: int
    batch: int
    total: int
    lr: float
    warmup: int
    eval_every: int
    log_every: int
    ema_schedule: str
    ema_halflife: int
    ema_rampup: float | None
    ema_final: float | None

    @property
    def steps(self) -> int:
        return -(-self.total // self.batch)

    def learning_rate(self, seen: int) -> float:
        return self.lr * min(seen / self.warmup, 1.0) if self.warmup else self.lr   # linear warm-up, no decay

    def ema_beta(self, seen: int) -> float:
        return ema_beta(self.ema_schedule, self.ema_halflife, self.ema_rampup, self.batch, seen, self.size,
                        self.ema_final)

    def evaluates(self, before: int, after: int) -> bool:
        """A snapshot is evaluated when a step crosses a multiple of eval_every, and after the last step."""
        return after // self.eval_every > before // self.eval_every or after >= self.total

    def evaluations(self) -> list[int]:
        """Images seen at every evaluation."""
        end = self.steps * self.batch
        crossings = {-(-k * self.eval_every // self.batch) * self.batch for k in range(1, end // self.eval_every + 1)}
        return sorted(crossings | {end})


def schedule(cfg: Config, size: int) -> Schedule:
    t, e = cfg.train, cfg.eval
    warmup = 0 if str(t.lr_warmup).strip() in ("0", "0ep", "0kimg") else duration_images(t.lr_warmup, size)
    return Schedule(size=size, batch=t.batch_size, total=duration_images(t.duration, size, "train.duration"),
                    lr=t.lr, warmup=warmup, eval_every=duration_images(e.every, size, "eval.every"),
                    log_every=duration_images(t.log_every, size, "train.log_every"), ema_schedule=t.ema_schedule,
                    ema_halflife=duration_images(t.ema_halflife, size, "train.ema_halflife"),
                    ema_rampup=t.ema_rampup, ema_final=t.ema_beta)


@dataclass
class Prepared:
    """A training before its first step: its data on the device, schedule, networks, optimizer and random streams."""
    data: TrainingSet
    images: torch.Tensor
    labels: torch.Tensor | None
    plan: Schedule
    denoiser: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Adam
    noise_rng: torch.Generator
    order: torch.Tensor
    state: dict


def prepare(cfg: Config, train_set: TrainingSet | None, device: torch.device, rank: int = 0,
            layout=torch.contiguous_format) -> Prepared:
    """Seed, data, network initialisation and random streams of a training, in this order, so that a training is
    the same wherever it runs (alone, as a DDP rank, or packed with others: diffmem/packed.py)."""
    t = cfg.train
    torch.manual_seed(t.seed + rank)
    data = train_set if train_set is not None else training_set(cfg.data)
    images = data.images.to(device).contiguous(memory_format=layout)   # on the device once, for the whole run
    labels = None if data.labels is None else data.labels.to(device)
    n = len(images)
    denoiser = build_denoiser(cfg, data).to(device, memory_format=layout).train()
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    opt = torch.optim.Adam(denoiser.parameters(), lr=t.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=t.weight_decay)
    noise_rng = torch.Generator(device=device).manual_seed(t.seed)   # the same stream on every rank
    order = torch.randperm(n, generator=torch.Generator().manual_seed(t.seed)).to(device)  # one shuffle, every epoch
    state = {"step": 0, "images_seen": 0, "best": 0.0, "history": [], "step_seconds": 0.0, "eval_seconds": 0.0}
    return Prepared(data, images, labels, schedule(cfg, n), denoiser, ema, opt, noise_rng, order, state)


def load_checkpoint(path: Path, run: Prepared, world: int, rank: int, device: torch.device) -> dict:
    """Load a checkpoint into a prepared training; returns its state (step, images seen, best, history, times)."""
    ckpt = torch.load(path, map_location=device, weights_only=True)   # tensors, numbers, lists: no code
    run.denoiser.net.load_state_dict(ckpt["model"])
    run.ema.load_state_dict(ckpt["ema"])
    run.opt.load_state_dict(ckpt["optimizer"])
    if ckpt["world"] == world:   # the same workers continue their own random streams
        run.noise_rng.set_state(ckpt["noise_rng"][rank].to(run.noise_rng.get_state().device))
        torch.set_rng_state(ckpt["torch_rng"][rank])
        cuda_rng = ckpt.get("cuda_rng", [None] * world)[rank]
        if cuda_rng is not None and device.type == "cuda":   # dropout draws from the GPU's generator
            torch.cuda.set_rng_state(cuda_rng, device)
    run.state = ckpt["state"]
    if "train_seconds" in run.state:   # a checkpoint written before step_seconds had its name
        run.state["step_seconds"] = run.state.pop("train_seconds")
    return run.state


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
    # noise that one process draws for those rows (diffmem.edm.draw_noise's shard); DDP averages gradients, so the
    # update is the single-process one (paper: 512 = 8 x 64) up to float rounding (tests/test_fast_path.py).
    # Only dropout masks (the default generator, seed + rank) are each rank's own.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the {world} workers")
    layout = torch.channels_last if t.channels_last else torch.contiguous_format
    run = prepare(cfg, train_set, device, rank, layout)
    data, images, labels, plan, state = run.data, run.images, run.labels, run.plan, run.state
    denoiser, ema, opt, noise_rng, order, net = (run.denoiser, run.ema, run.opt, run.noise_rng, run.order,
                                                 run.denoiser.net)
    n, batch, total = plan.size, t.batch_size, plan.total
    if distributed:   # every rank starts from rank 0's weights, the EMA included (DDP would sync only the net)
        for tensor in [*denoiser.parameters(), *denoiser.buffers(), *ema.parameters(), *ema.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)

    run_dir = Path(run_dir) if run_dir is not None else None
    ckpt_path = run_dir / CHECKPOINT if run_dir is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, run, world, rank, device)
        log(f"resumed from {ckpt_path} at {state['images_seen']} images")
    if distributed:
        denoiser.net = torch.nn.parallel.DistributedDataParallel(net)
    if t.compile:   # training only: the EMA copy is sampled uncompiled (DDP first, then compile, as PyTorch advises)
        denoiser.net = torch.compile(denoiser.net, **COMPILE_OPTIONS)
    ema_params, params = list(ema.parameters()), list(denoiser.parameters())

    def stopped():
        return e.memorized_at is not None and state["best"] >= e.memorized_at

    if state["history"] and (state["images_seen"] >= total or stopped()) and report is not None:
        report(state["history"][-1], ckpt_path)   # resumed after its last evaluation: say the answer again
    tic, loss_sum, loss_count = time.perf_counter(), torch.zeros((), device=device), 0

    def check_finite():   # read on the host only here, so the steps in between never wait for the GPU
        check_loss(loss_sum, loss_count, state, t.lr)

    while state["images_seen"] < total and not stopped():
        seen = state["images_seen"]
        idx = order[(torch.arange(batch, device=device) + seen) % n][rank::world]
        lr = plan.learning_rate(seen)
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
        with torch.no_grad():   # ema <- beta * ema + (1 - beta) * net (diffmem/ema.py)
            torch._foreach_lerp_(ema_params, params, 1 - plan.ema_beta(seen))
        state["step"] += 1
        state["images_seen"] = seen + batch
        loss_sum, loss_count = loss_sum + loss.detach(), loss_count + 1

        if state["images_seen"] // plan.log_every > seen // plan.log_every:
            if distributed:   # the global batch's loss, as one process logs it (every rank ran loss_count steps)
                torch.distributed.all_reduce(loss_sum)
                loss_sum = loss_sum / world
            check_finite()
            mean_loss = loss_sum.item() / loss_count
            if writer is not None:
                writer.add_scalar("train/loss", mean_loss, state["images_seen"])
                writer.add_scalar("train/lr", lr, state["images_seen"])
            log(f"{state['images_seen']:>10d} img  loss {mean_loss:.4f}  lr {lr:.3g}")   # no silence until evaluating
            loss_sum, loss_count = torch.zeros((), device=device), 0

        if plan.evaluates(seen, state["images_seen"]):
            check_finite()
            last_loss = loss.detach().clone()
            if distributed:   # the last step's loss over the global batch
                torch.distributed.all_reduce(last_loss)
                last_loss = last_loss / world
            if device.type == "cuda":
                torch.cuda.synchronize(device)   # the clock stops when the GPU, not the host, is done
            state["step_seconds"] += time.perf_counter() - tic
            metrics = None
            # Every worker samples its share of the seeds; rank 0 gathers them and scores (others get None).
            eval_tic = time.perf_counter()
            result = evaluate_denoiser(ema, data, e, device=device, rank=rank, world=world)
            state["eval_seconds"] = state.get("eval_seconds", 0.0) + time.perf_counter() - eval_tic
            if rank == 0:
                metrics = snapshot_metrics(state, result, plan, last_loss.item(), lr)
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
    state["step_seconds"] += time.perf_counter() - tic
    return TrainResult(state["best"], state["images_seen"], state["step"], stopped() and state["images_seen"] < total,
                       state["history"], state["step_seconds"])


def check_loss(loss_sum: torch.Tensor, loss_count: int, state: dict, lr: float) -> None:
    """Raise TrainingDiverged if the loss summed over the last loss_count steps is NaN or infinite."""
    if not torch.isfinite(loss_sum):
        raise TrainingDiverged(f"loss became {loss_sum.item()} within the {loss_count} steps up to step "
                               f"{state['step']} ({state['images_seen']} images seen); lower train.lr "
                               f"(now {lr:g}) or check the data")


def snapshot_metrics(state: dict, result, plan: Schedule, loss: float, lr: float) -> dict:
    """The metrics of one evaluated snapshot; updates the training's best ratio in `state` (the paper's rule: the
    highest ratio over snapshots)."""
    samples = len(result.nn_ratio)   # fewer than eval.num_samples when the adaptive test stopped early
    interval = ratio_interval(result.copies, samples)   # 95 %, over the samples
    # The best ratio comes with the interval of the snapshot that gave it, that snapshot's own. The maximum over
    # snapshots is biased upwards (the luckiest of several draws), which no single snapshot's interval accounts for.
    if result.ratio >= state["best"]:
        state["best"], state["best_interval"], state["best_samples"] = result.ratio, interval, samples
    best_low, best_high = state.get("best_interval", (math.nan, math.nan))   # nan: an older checkpoint
    seen = state["images_seen"]
    return {"images_seen": seen, "planned_images": plan.total, "epoch": seen / plan.size, "step": state["step"],
            "loss": loss, "lr": lr, "mem_ratio": result.ratio, "mem_ratio_low": interval[0],
            "mem_ratio_high": interval[1], "num_samples": samples, "best_mem_ratio": state["best"],
            "best_mem_ratio_low": best_low, "best_mem_ratio_high": best_high,
            "best_num_samples": state.get("best_samples", 0), "eval_stopped_early": int(result.stopped_early),
            "images_per_sec": seen / max(state["step_seconds"], 1e-9), "step_seconds": state["step_seconds"],
            "eval_seconds": state["eval_seconds"]}


def measure_speed(cfg: Config, warmup: int, steps: int, train_set: TrainingSet | None = None, pack: int = 1) -> dict:
    """Time cfg's training through train() itself: `warmup` steps (compilation, cuDNN's algorithm search, the
    allocator), then `steps` timed steps, with an evaluation (cfg.eval as given) every `warmup` steps and at
    the end. cfg's duration, lr warm-up, logging and early stop are replaced for the purpose; the data is
    cfg.data's subset, or `train_set`. pack > 1: that many trainings (seeds seed, seed + 1, ...) packed in one
    process (diffmem/packed.py). Returns images_per_sec of the timed steps (all trainings together),
    ms_per_step, the seconds of one evaluation after the first (eval_seconds, per training), the first window's
    seconds, the wall time, the last loss and, on a GPU, the peak memory. Used by bench/train_step.py and
    sweeps/emm_search.py --estimate."""
    cfg = copy.deepcopy(cfg)
    batch = cfg.train.batch_size
    warm, total = warmup * batch, (warmup + steps) * batch
    cfg.train.duration, cfg.train.lr_warmup = f"{total / 1000}kimg", "0"
    cfg.train.log_every, cfg.eval.every, cfg.eval.memorized_at = f"{total / 1000}kimg", f"{warm / 1000}kimg", None
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    marks = [[] for _ in range(pack)]
    start = time.perf_counter()
    if pack == 1:
        train(cfg, report=lambda metrics, saved: marks[0].append(metrics), log=lambda *_: None, train_set=train_set)
    else:
        from diffmem.packed import Member, train_packed   # packed builds on this module
        members = []
        for k in range(pack):
            member_cfg = copy.deepcopy(cfg)
            member_cfg.train.seed = cfg.train.seed + k
            members.append(Member(member_cfg, report=lambda metrics, saved, k=k: marks[k].append(metrics),
                                  log=lambda *_: None, train_set=train_set))
        for result in train_packed(members):
            if isinstance(result, BaseException):
                raise result
    wall = time.perf_counter() - start
    first, last = marks[0][0], marks[0][-1]
    steady = (last["images_seen"] - first["images_seen"]) / max(last["step_seconds"] - first["step_seconds"], 1e-9)
    return {"images_per_sec": pack * steady, "ms_per_step": 1000 * batch / steady,
            "first_window_s": first["step_seconds"],
            "eval_seconds": (last["eval_seconds"] - first["eval_seconds"]) / max(len(marks[0]) - 1, 1),
            "wall_s": wall, "final_loss": last["loss"], "pack": pack,
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
            for name in (key, f"{key}_low", f"{key}_high"):
                writer.add_scalar(f"memorization/{name}", metrics[name], step)
        writer.add_scalar("memorization/num_samples", metrics["num_samples"], step)   # adaptive: the samples used
        writer.add_scalar("train/images_per_sec", metrics["images_per_sec"], step)
    # the picture carries each sample's NN ratio under its column, copies framed; TensorBoard and samples.png
    picture = nn_grid_picture(result, data) if writer is not None or run_dir is not None else None
    if writer is not None:
        writer.add_image("samples/generated_nn1_nn2", picture, step, dataformats="HWC")
        writer.add_text("samples/nn_ratio", nn_ratio_markdown(result), step)   # the same ratios as a table
    if run_dir is not None:
        save_png(run_dir / "samples.png", picture)
    log(f"{step:>10d} img  epoch {metrics['epoch']:8.1f}  loss {metrics['loss']:.4f}  "
        f"mem_ratio {metrics['mem_ratio']:.4f} [{metrics['mem_ratio_low']:.4f}, {metrics['mem_ratio_high']:.4f}]  "
        f"best {metrics['best_mem_ratio']:.4f} [{metrics['best_mem_ratio_low']:.4f}, "
        f"{metrics['best_mem_ratio_high']:.4f}] of {metrics['num_samples']} samples"
        + (" (adaptive: decided early)" if metrics["eval_stopped_early"] else ""))


def adaptive_line(e) -> str:
    """How an evaluation decides: the adaptive test's looks and boundaries, or all seeds."""
    test = sequential_test(e)
    if e.memorized_at is None:
        return "none asked (eval.memorized_at null): every seed sampled, training runs its whole duration"
    if test is None or len(test.looks) == 1:
        why = "eval.adaptive false" if test is None else "one look: eval.batch_size >= eval.num_samples"
        return f"memorized iff ratio >= {e.memorized_at:g} over all {e.num_samples:,} samples ({why})"
    bounds = ", ".join(f"n={n:,}: >= {a} memorized, <= {b} not" for n, a, b in zip(test.looks, test.above, test.below))
    return (f"memorized iff ratio >= {e.memorized_at:g}; adaptive (error <= {e.adaptive_error:g}), copies at the looks "
            f"{bounds}; else all {e.num_samples:,}")


def describe(cfg: Config, data: TrainingSet) -> str:
    """The resolved config and the schedule a training of it would follow (python -m diffmem.train --dry-run)."""
    import yaml
    plan, t, e = schedule(cfg, len(data.images)), cfg.train, cfg.eval
    n, batch = plan.size, plan.batch

    def images(count: float) -> str:
        return f"{count:,.0f} images ({count / n:,.1f} epochs, {-(-count // batch):,.0f} steps)"

    points = plan.evaluations()
    ramp_end = rampup_end(plan.ema_halflife, plan.ema_rampup)
    after = plan.ema_beta(max(ramp_end, points[-1]))
    first = plan.ema_beta(points[0] - batch)   # the step that reaches the first snapshot
    shown = ", ".join(f"{p:,}" for p in points[:3]) + (f", ..., {points[-1]:,}" if len(points) > 3 else "")
    denoiser = build_denoiser(cfg, data)
    params = sum(p.numel() for p in denoiser.parameters())
    final = f", train.ema_beta {t.ema_beta}" if t.ema_beta is not None else ""
    lines = [
        yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
        "",
        f"schedule at |D| = {n:,}, batch {batch}",
        f"  training       {images(plan.total)}",
        f"  lr warm-up     linear from 0 to {t.lr:g} over {images(plan.warmup)}, then constant",
        f"  EMA            train.ema_schedule {t.ema_schedule}{final}, "
        f"train.ema_halflife h = {plan.ema_halflife:,} images, "
        f"ramp-up " + (f"{t.ema_rampup:g} x images seen, over the first {images(ramp_end)}"
                       if t.ema_rampup else "none"),
        f"    beta at the first snapshot  {first:.5f} (half-life {halflife_images(first, batch):,.0f} images)",
        f"    beta after the ramp-up      {after:.5f} (half-life {halflife_images(after, batch):,.0f} images, "
        f"{halflife_images(after, batch) / batch:,.1f} steps)"
        + (" -- never reached: the ramp-up outlasts the training" if ramp_end >= plan.total else ""),
        f"  evaluations    {len(points)}, every {plan.eval_every:,} images, at {shown} images seen",
        f"  samples        {e.num_samples:,} per evaluation (seeds 0-{e.num_samples - 1}), {e.num_steps} Heun steps "
        f"({2 * e.num_steps - 1} network evaluations each)"
        + (f", labels from {e.sample_classes} classes" if data.labels is not None else ""),
        f"  decision       {adaptive_line(e)}",
        f"  network        {cfg.model.arch} ({type(denoiser.net).__name__}), {params:,} parameters, "
        f"{cfg.model.precond} preconditioning",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    from diffmem.cli import run_cli

    def run(cfg, run_dir, writer):
        result = train(cfg, run_dir, writer=writer)
        last = result.history[-1]
        print(f"|D|={cfg.data.size}: best memorization ratio {result.best_mem_ratio:.4f} "
              f"[{last['best_mem_ratio_low']:.4f}, {last['best_mem_ratio_high']:.4f}] (95 % Wilson interval over "
              f"{last['best_num_samples']} samples) over {len(result.history)} evaluations, "
              f"{result.images_seen} images, "
              f"{result.step_seconds:.1f} s"
              f"{' (stopped early)' if result.stopped_early else ''}; run folder {run_dir}")
        return 0

    return run_cli("diffmem.train", "train one EDM model and print its memorization ratio", run, argv, describe)


if __name__ == "__main__":   # through the imported module, so its exception classes are the ones caught
    from diffmem.train import main
    raise SystemExit(main())

"""Several trainings in one process as one batched computation: a pack.

A small model leaves an accelerator mostly idle: the digits' 16-channel U-Net runs ~100 convolutions per step of
a few microseconds of arithmetic each, behind as many kernel launches. A pack stacks the parameters of K
trainings of one architecture and runs their K forward and backward passes as one call vmapped over the
trainings (torch.func: grouped convolutions, batched matrix products), so one step of the pack costs one launch
sequence for all K. On a CPU, where a convolution's arithmetic is not hidden behind launches, it gains little:
bench/train_step.py --packed measures both.

Each member is the training diffmem.train.train runs alone, step for step: the same seed, initialisation,
subset, shuffle and noise stream (diffmem.train.prepare; diffmem.edm.draw_noise from the member's own
generator), its own learning-rate schedule, weight decay, EMA schedule, evaluations, early stop and checkpoint
file, in the solo format (a member resumes alone and a solo run resumes in a pack). Losses and memorization
ratios equal the solo run's up to float rounding (tests/test_packed.py). Members join and leave between steps;
one whose loss diverges leaves with its error while the others go on.

Members share the model config, the image shape, label_dim, batch size, device and precision (pack_key).
A pack is one process: no DDP and no train.compile; train.channels_last is a layout and is not used. Dropout
masks come from the process's generator (vmap randomness "different"), not from each member's seed, so with
model.dropout > 0 a member is a valid training but not bit for bit the solo one.
"""
from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.func import functional_call, vmap

from diffmem.config import Config, ConfigError
from diffmem.data import TrainingSet
from diffmem.edm import denoising_loss, draw_noise
from diffmem.evaluate import evaluate_denoiser
from diffmem.precision import autocast, training_precision
from diffmem.train import (ADAM_BETAS, ADAM_EPS, CHECKPOINT, TrainingDiverged, TrainResult, _gather_rng, check_loss,
                           _log_evaluation, _save_checkpoint, load_checkpoint, prepare, resolve_device,
                           snapshot_metrics)


@dataclass
class Member:
    """One training of a pack: what diffmem.train.train takes."""
    cfg: Config
    run_dir: str | Path | None = None
    report: Callable[[dict, Path | None], None] | None = None
    writer: object = None
    log: Callable = print
    train_set: TrainingSet | None = None


def pack_key(cfg: Config, train_set: TrainingSet) -> tuple:
    """Trainings with equal keys can share a pack: the model, image shape, label_dim, batch size, device, precision."""
    t = cfg.train
    return (repr(cfg.model), tuple(train_set.images.shape[1:]), train_set.label_dim, t.batch_size,
            str(resolve_device(t.device)), t.precision)


_INDICES = itertools.count()   # members' indices, unique in the process (a prepared member may join any pack)


class _Functional:
    """The denoiser with one member's parameters, as denoising_loss calls it (inside vmap)."""

    def __init__(self, template, params, buffers):
        self.template, self.params, self.buffers = template, params, buffers

    def __call__(self, x, sigma, class_labels=None):
        return functional_call(self.template, (self.params, self.buffers), (x, sigma, class_labels))

    def loss_weight(self, sigma):
        return self.template.loss_weight(sigma)


class _Run:
    """A member inside the pack: its prepared training (diffmem.train.prepare, whose modules hold its weights only
    at evaluations and checkpoints), its running loss and its clock."""

    def __init__(self, index: int, member: Member, device: torch.device):
        self.index, self.member, self.cfg, self.device = index, member, member.cfg, device
        self.prep = prepare(member.cfg, member.train_set, device)
        self.run_dir = Path(member.run_dir) if member.run_dir is not None else None
        self.ckpt_path = self.run_dir / CHECKPOINT if self.run_dir is not None else None
        if self.ckpt_path is not None and self.ckpt_path.exists():
            load_checkpoint(self.ckpt_path, self.prep, 1, 0, device)
            member.log(f"resumed from {self.ckpt_path} at {self.state['images_seen']} images")
        self.loss_sum, self.loss_count = torch.zeros((), device=device), 0
        self.tic = self.paused_at_tic = 0.0

    @property
    def state(self) -> dict:
        return self.prep.state

    def stopped(self) -> bool:
        m = self.cfg.eval.memorized_at
        return m is not None and self.state["best"] >= m

    def done(self) -> bool:
        return self.state["images_seen"] >= self.prep.plan.total or self.stopped()

    def result(self) -> TrainResult:
        s = self.state
        return TrainResult(s["best"], s["images_seen"], s["step"],
                           self.stopped() and s["images_seen"] < self.prep.plan.total,
                           s["history"], s["step_seconds"])

    def check_finite(self):
        check_loss(self.loss_sum, self.loss_count, self.state, self.cfg.train.lr)


def prepare_member(member: Member) -> _Run:
    """The member's training prepared (and resumed from its checkpoint) outside any pack; pack_key(run.cfg,
    run.prep.data) says which pack it can join."""
    if member.cfg.train.compile:
        raise ConfigError("train.compile is not supported in a pack (one vmapped computation); set "
                          "train.compile=false or pack one training per worker")
    return _Run(next(_INDICES), member, resolve_device(member.cfg.train.device))


class Pack:
    """Trainings stepped together. add() a member (a finished one answers at once); step() advances every member by
    one step of its own and returns those that finished: (index, TrainResult or the exception that ended it)."""

    def __init__(self):
        self.runs: list[_Run] = []
        self.key = self.template = self.device = None
        self.params, self.buffers, self.ema, self.exp_avg, self.exp_avg_sq = {}, {}, {}, {}, {}
        self.adam_steps: list[int] = []
        self.paused = 0.0   # seconds the pack spent in evaluations and checkpoints, kept out of training time

    def __len__(self) -> int:
        return len(self.runs)

    def add(self, member: Member) -> tuple[int, TrainResult] | int:
        """Join a member; returns its index, or (index, result) if its checkpoint says it has already finished."""
        return self.admit(prepare_member(member))

    def admit(self, run: "_Run") -> tuple[int, TrainResult] | int:
        """Join a prepared member (prepare_member); (index, result) at once if it has already finished."""
        key = pack_key(run.cfg, run.prep.data)
        if self.runs and key != self.key:
            names = ("model", "image shape", "label_dim", "train.batch_size", "device", "train.precision")
            diff = next(n for n, a, b in zip(names, key, self.key) if a != b)
            raise ConfigError(f"a pack holds trainings of one {diff}: this training's differs from the pack's; "
                              f"train it in another pack")
        if run.done():
            if run.state["history"] and run.member.report is not None:   # resumed after its last evaluation
                run.member.report(run.state["history"][-1], run.ckpt_path)
            return run.index, run.result()
        if not self.runs:
            self.key, self.device = key, run.device
            self.template = copy.deepcopy(run.prep.denoiser).to("meta")
        opt_state = run.prep.opt.state
        named = list(run.prep.denoiser.named_parameters())
        first = next(iter(opt_state.values()), None)
        self.adam_steps.append(int(first["step"]) if first is not None else 0)
        joined = {
            "params": {n: p.detach() for n, p in named},
            "buffers": dict(run.prep.denoiser.named_buffers()),
            "ema": dict(run.prep.ema.named_parameters()),
            "exp_avg": {n: opt_state[p]["exp_avg"] if p in opt_state else torch.zeros_like(p) for n, p in named},
            "exp_avg_sq": {n: opt_state[p]["exp_avg_sq"] if p in opt_state else torch.zeros_like(p) for n, p in named}}
        for field, tensors in joined.items():
            stack = getattr(self, field)
            for n, tensor in tensors.items():
                new = tensor.detach().unsqueeze(0)
                stack[n] = torch.cat([stack[n].detach(), new]) if n in stack else new.clone()
        for p in self.params.values():
            p.requires_grad_(True)
        run.tic, run.paused_at_tic = time.perf_counter(), self.paused
        self.runs.append(run)
        return run.index

    def drop(self, index: int) -> None:
        """Take a member out without a result (its trial went away); its checkpoint stays as it was."""
        if any(run.index == index for run in self.runs):
            self._leave({index})

    def _loss(self, params, buffers, images, sigma, noise, labels):
        denoiser = _Functional(self.template, params, buffers)
        return denoising_loss(denoiser, images, labels, drawn=(sigma, noise)).mean()

    def step(self) -> list[tuple[int, TrainResult | BaseException]]:
        with training_precision(self.runs[0].cfg.train.precision):   # the members share it (pack_key)
            return self._step()

    def _step(self) -> list[tuple[int, TrainResult | BaseException]]:
        runs, device = self.runs, self.device
        batch = runs[0].cfg.train.batch_size
        images, labels, sigmas, noises, seen = [], [], [], [], []
        for run in runs:   # each member's batch and noise, drawn exactly as alone
            s, n = run.state["images_seen"], run.prep.plan.size
            idx = run.prep.order[(torch.arange(batch, device=device) + s) % n]
            images.append(run.prep.images[idx])
            labels.append(None if run.prep.labels is None else run.prep.labels[idx])
            sigma, noise = draw_noise(run.prep.denoiser, images[-1].shape, device, run.prep.noise_rng)
            sigmas.append(sigma), noises.append(noise), seen.append(s)
        conditional = labels[0] is not None
        loss_of = vmap(self._loss, in_dims=(0, 0, 0, 0, 0, 0 if conditional else None), randomness="different")
        with autocast(runs[0].cfg.train.precision, device):
            losses = loss_of(self.params, self.buffers, torch.stack(images), torch.stack(sigmas), torch.stack(noises),
                             torch.stack(labels) if conditional else None)
        for p in self.params.values():
            p.grad = None
        losses.sum().backward()   # each member's gradient is that of its own mean loss
        lrs = [run.prep.plan.learning_rate(s) for run, s in zip(runs, seen)]
        self._adam([run.cfg.train.weight_decay for run in runs], lrs)
        self._ema([1 - run.prep.plan.ema_beta(s) for run, s in zip(runs, seen)])

        finished = []
        for k, (run, s, lr) in enumerate(zip(runs, seen, lrs)):
            run.state["step"] += 1
            run.state["images_seen"] = s + batch
            run.loss_sum, run.loss_count = run.loss_sum + losses[k].detach(), run.loss_count + 1
            try:
                self._after_step(k, run, s, lr, losses[k].detach())
            except TrainingDiverged as error:
                finished.append((run.index, error))
                continue
            if run.done():
                self._clock(run)
                finished.append((run.index, run.result()))
        if finished:
            self._leave({index for index, _ in finished})
        return finished

    def _adam(self, weight_decays: list[float], lrs: list[float]) -> None:
        """torch.optim.Adam's update (L2 weight decay, bias corrections), each member with its own lr and decay."""
        beta1, beta2 = ADAM_BETAS
        self.adam_steps = [s + 1 for s in self.adam_steps]
        bc1 = [1 - beta1 ** s for s in self.adam_steps]
        bc2_sqrt = [(1 - beta2 ** s) ** 0.5 for s in self.adam_steps]
        with torch.no_grad():
            for name, p in self.params.items():
                column = (len(self.runs),) + (1,) * (p.dim() - 1)

                def per_member(values, p=p, column=column):
                    return torch.tensor(values, dtype=p.dtype, device=p.device).reshape(column)

                grad = torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5)   # EDM/paper: sanitise NaN/Inf
                grad = grad + per_member(weight_decays) * p
                self.exp_avg[name].lerp_(grad, 1 - beta1)
                self.exp_avg_sq[name].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (self.exp_avg_sq[name].sqrt() / per_member(bc2_sqrt)).add_(ADAM_EPS)
                p.add_(self.exp_avg[name] / denom * per_member([-lr / b for lr, b in zip(lrs, bc1)]))

    def _ema(self, weights: list[float]) -> None:
        """ema <- beta * ema + (1 - beta) * net per member (diffmem/ema.py)."""
        with torch.no_grad():
            for name, p in self.params.items():
                column = (len(self.runs),) + (1,) * (p.dim() - 1)
                self.ema[name].lerp_(p.detach(), torch.tensor(weights, dtype=p.dtype, device=p.device).reshape(column))

    def _after_step(self, k: int, run: _Run, seen: int, lr: float, loss: torch.Tensor) -> None:
        """Logging and evaluation of member k after its step, as diffmem.train.train does them."""
        plan, state, writer = run.prep.plan, run.state, run.member.writer
        if state["images_seen"] // plan.log_every > seen // plan.log_every:
            run.check_finite()
            if writer is not None:
                writer.add_scalar("train/loss", run.loss_sum.item() / run.loss_count, state["images_seen"])
                writer.add_scalar("train/lr", lr, state["images_seen"])
            run.loss_sum, run.loss_count = torch.zeros((), device=self.device), 0
        if not plan.evaluates(seen, state["images_seen"]):
            return
        run.check_finite()
        self._clock(run)
        pause = time.perf_counter()
        self._write_back(k, run)
        tic = time.perf_counter()
        result = evaluate_denoiser(run.prep.ema, run.prep.data, run.cfg.eval, device=self.device)
        state["eval_seconds"] = state.get("eval_seconds", 0.0) + time.perf_counter() - tic
        metrics = snapshot_metrics(state, result, plan, loss.item(), lr)
        state["history"].append(metrics)
        saved = None
        if run.ckpt_path is not None:
            saved = _save_checkpoint(run.ckpt_path, run.prep.denoiser.net, run.prep.ema, run.prep.opt,
                                     _gather_rng(run.prep.noise_rng, 1, self.device), 1, state)
        _log_evaluation(writer, run.run_dir, run.member.log, metrics, result, run.prep.data)
        if run.member.report is not None:
            run.member.report(metrics, saved)
        self.paused += time.perf_counter() - pause
        run.tic, run.paused_at_tic = time.perf_counter(), self.paused

    def _clock(self, run: _Run) -> None:
        """Add the member's training seconds since its last mark: the pack's wall time less the pack's pauses (every
        member's steps take the whole pack's step time)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        run.state["step_seconds"] += (now - run.tic) - (self.paused - run.paused_at_tic)
        run.tic, run.paused_at_tic = now, self.paused

    def _write_back(self, k: int, run: _Run) -> None:
        """Member k's weights, EMA and Adam state into its own modules, which evaluation and checkpoints read."""
        with torch.no_grad():
            for name, p in run.prep.denoiser.named_parameters():
                p.copy_(self.params[name][k])
                run.prep.opt.state[p] = {"step": torch.tensor(float(self.adam_steps[k])),
                                         "exp_avg": self.exp_avg[name][k].clone(),
                                         "exp_avg_sq": self.exp_avg_sq[name][k].clone()}
            for name, p in run.prep.ema.named_parameters():
                p.copy_(self.ema[name][k])

    def _leave(self, indices: set) -> None:
        keep = [k for k, run in enumerate(self.runs) if run.index not in indices]
        self.runs = [self.runs[k] for k in keep]
        self.adam_steps = [self.adam_steps[k] for k in keep]
        rows = torch.tensor(keep, dtype=torch.long, device=self.device)
        for field in ("params", "buffers", "ema", "exp_avg", "exp_avg_sq"):
            setattr(self, field, {n: t.detach().index_select(0, rows) for n, t in getattr(self, field).items()})
        for p in self.params.values():
            p.requires_grad_(True)
        if not self.runs:   # empty: the next member may be of another architecture
            self.key = self.template = None
            self.params, self.buffers, self.ema, self.exp_avg, self.exp_avg_sq = {}, {}, {}, {}, {}


def train_packed(members: list[Member]) -> list[TrainResult | BaseException]:
    """Train every member in one pack until each has finished; results in the members' order (a member whose loss
    diverged gets its TrainingDiverged instead of a result)."""
    if not members:
        return []
    results: dict[int, TrainResult | BaseException] = {}
    pack = Pack()
    indices = []
    for member in members:
        joined = pack.add(member)
        if isinstance(joined, tuple):
            indices.append(joined[0])
            results[joined[0]] = joined[1]
        else:
            indices.append(joined)
    while len(pack):
        results.update(pack.step())
    return [results[index] for index in indices]

"""One memorization evaluation: sample a denoiser on fixed seeds, find nearest training images, score.

Sample i always comes from seed i (its own generator, as EDM's StackedRandomGenerator), so it does not
depend on the batch size or on how many samples are drawn. A class-conditional model gets a label drawn
uniformly by the same generator (paper.md §1), from the classes present in its training subset
(eval.sample_classes=present, diffmem's default) or from all label_dim classes (all, the paper's: EDM's
generate.py). The two are the same draw whenever every class has images; with random labels and C close to
|D| some classes are empty (C = |D| = 1000: about 37 % of them), and a sample of a class never trained on
says little about memorization, so the paper's draw lowers the ratio there.

Under DDP (one process per GPU) the sampling is spread over the workers: the seeds are cut into the same
batches of `eval.batch_size` as in one process, batch b is sampled by rank b mod world, and the samples are
gathered to rank 0 for the nearest-neighbour search. Every batch is thus computed exactly as the single
process computes it, so for the same EMA weights the result is the single-process one: bit for bit on CPU
(tests/test_fast_path.py), and on a GPU up to cuDNN's choice of convolution algorithm in each process. The
workers share the time evenly when the number of batches, ceil(num_samples / batch_size), is a multiple of
the world size (10,000 samples on 8 GPUs: batch_size 1250). Sampling dominates the cost (35 network
evaluations per image); the search against the training subset is one chunked matrix product.

Evaluation is exact fp32 whatever the training precision (diffmem/precision.py).
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from diffmem.config import EvalConfig
from diffmem.data import TrainingSet
from diffmem.edm import edm_sampler
from diffmem.memorization import nn_ratio_from_distances, is_copy, nearest_neighbours, to_pixels
from diffmem.precision import full_precision
from diffmem.sequential import SequentialTest


@dataclass
class Evaluation:
    ratio: float                  # memorization ratio: share of samples with NN ratio < threshold
    nn_ratio: torch.Tensor        # (samples used,) ||x - NN1|| / ||x - NN2||
    nn_index: torch.Tensor        # (samples used, 2) indices of NN1, NN2 in the training subset
    samples: torch.Tensor         # (samples used, C, H, W) in [-1, 1]
    memorized: bool | None = None   # the decision against eval.memorized_at (None: no question asked)
    stopped_early: bool = False   # the adaptive evaluation decided before using all eval.num_samples seeds
    threshold: float = 1 / 3      # eval.threshold: a sample is a copy when its NN ratio is below it

    @property
    def copies(self) -> int:
        return round(self.ratio * len(self.nn_ratio))


def seeded_latents(seeds, shape, classes: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latents (and labels drawn from `classes`) of the given seeds."""
    latents, labels = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        latents.append(torch.randn(shape, generator=g))
        if classes is not None:
            labels.append(classes[torch.randint(len(classes), (), generator=g)])
    return torch.stack(latents).to(device), (torch.stack(labels).to(device) if classes is not None else None)


def sample_classes(train_set: TrainingSet, draw: str) -> torch.Tensor | None:
    """The classes a conditional model's samples draw from (eval.sample_classes); None when unconditional."""
    if train_set.labels is None:
        return None
    return torch.unique(train_set.labels.cpu()) if draw == "present" else torch.arange(train_set.label_dim)


def sample_batches(num_samples: int, batch_size: int) -> list[range]:
    """The seed batches of one evaluation: [0, B), [B, 2B), ... (the same for any number of workers)."""
    return [range(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]


def sequential_test(cfg: EvalConfig) -> SequentialTest | None:
    """The adaptive evaluation's test (diffmem/sequential.py), or None: every seed is sampled (eval.adaptive
    false, or no eval.memorized_at to decide against)."""
    if not cfg.adaptive or cfg.memorized_at is None:
        return None
    return SequentialTest.build(cfg.memorized_at, cfg.adaptive_error, cfg.num_samples, cfg.batch_size)


@torch.no_grad()
def generate(denoiser, train_set: TrainingSet, cfg: EvalConfig, device=None, rank: int = 0, world: int = 1,
             seeds: range | None = None) -> torch.Tensor | None:
    """Samples of `seeds` (default 0..num_samples-1; a range of whole seed batches) in seed order; with world > 1
    (an initialised process group) batch b of the evaluation is sampled by rank b mod world, and rank 0 receives
    all of them (the other ranks get None)."""
    device = torch.device(device or train_set.images.device)
    shape = train_set.images.shape[1:]
    classes = sample_classes(train_set, cfg.sample_classes)
    seeds = seeds if seeds is not None else range(cfg.num_samples)
    batches = [b for b in sample_batches(cfg.num_samples, cfg.batch_size) if seeds.start <= b.start < seeds.stop]
    first = seeds.start // cfg.batch_size           # the evaluation's index of batches[0]
    mine = []
    with full_precision(device):
        for seeds in batches[(rank - first) % world::world]:
            latents, labels = seeded_latents(seeds, shape, classes, device)
            mine.append(edm_sampler(denoiser, latents, labels, cfg.num_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho))
    if world == 1:
        return torch.cat(mine)
    return _gather_batches(mine, batches, first, rank, world, (cfg.batch_size, *shape), device)


def _gather_batches(mine: list, batches: list, first: int, rank: int, world: int, batch_shape, device):
    """All ranks' batches to rank 0, in seed order (batch first + j was sampled by rank (first + j) mod world).
    Each rank sends a fixed-size buffer (all_gather works on gloo and NCCL alike); a rank with fewer or shorter
    batches pads with zeros that are cut away here."""
    per_rank = -(-len(batches) // world)
    buffer = torch.zeros((per_rank, *batch_shape), dtype=torch.float32, device=device)
    for j, samples in enumerate(mine):
        buffer[j, :len(samples)] = samples
    everyone = [torch.empty_like(buffer) for _ in range(world)]
    torch.distributed.all_gather(everyone, buffer)
    if rank != 0:
        return None
    return torch.cat([everyone[(first + j) % world][j // world, :len(seeds)] for j, seeds in enumerate(batches)])


@torch.no_grad()
def evaluate_denoiser(denoiser, train_set: TrainingSet, cfg: EvalConfig, device=None, rank: int = 0,
                      world: int = 1) -> Evaluation | None:
    """Sample, find the two nearest training images of every sample, score. With eval.adaptive the seeds go in
    at the looks of the sequential test and sampling stops once it decides (diffmem/sequential.py). With
    world > 1 every rank of the process group must call this; rank 0 returns the evaluation, the others None."""
    device = torch.device(device or train_set.images.device)
    test = sequential_test(cfg)
    looks = test.looks if test is not None else (cfg.num_samples,)
    with full_precision(device):
        train_px = train_set.images.to(device)
        if cfg.quantize:   # the paper saves samples as 8-bit PNG and compares on the 0..255 scale
            train_px = to_pixels(train_px).float()
    parts, ratios, indices, copies, decision, start = [], [], [], 0, None, 0
    for look, stop in enumerate(looks):
        samples = generate(denoiser, train_set, cfg, device, rank, world, range(start, stop))
        if samples is not None:   # rank 0: score the new samples
            with full_precision(device):
                d, idx = nearest_neighbours(to_pixels(samples).float() if cfg.quantize else samples, train_px, k=2)
                nn_ratio = nn_ratio_from_distances(d)
            parts.append(samples.cpu()), ratios.append(nn_ratio.cpu()), indices.append(idx.cpu())
            copies += int(is_copy(nn_ratio, cfg.threshold).sum())
            decision = test.decide(look, copies) if test is not None else None
        if world > 1 and test is not None:   # every rank goes on, or stops, with rank 0
            flag = torch.tensor([-1 if decision is None else int(decision)], device=device)
            torch.distributed.broadcast(flag, src=0)
            decision = None if flag.item() < 0 else bool(flag.item())
        start = stop
        if decision is not None:
            break
    if rank != 0:
        return None
    used = torch.cat(ratios)
    memorized = decision if test is not None else (
        None if cfg.memorized_at is None else copies / len(used) >= cfg.memorized_at)
    return Evaluation(copies / len(used), used, torch.cat(indices), torch.cat(parts), memorized,
                      stopped_early=len(used) < cfg.num_samples, threshold=cfg.threshold)


def nn_grid_rows(result: Evaluation, train_set: TrainingSet, n: int = 16) -> list[torch.Tensor]:
    """Rows for a picture: samples, their nearest and their second-nearest training images."""
    idx = result.nn_index[:n]
    train = train_set.images.cpu()
    return [result.samples[:n], train[idx[:, 0]], train[idx[:, 1]]]

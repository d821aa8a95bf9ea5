"""One memorization evaluation: sample a denoiser on fixed seeds, find nearest training images, score.

Sample i always comes from seed i (its own generator, as EDM's StackedRandomGenerator), so it does not
depend on the batch size or on how many samples are drawn. A class-conditional model gets a label drawn
uniformly by the same generator (paper.md §1) from the classes present in its training subset: the paper
draws from all label_dim classes, which is the same whenever every class has images (its C <= |D|); with
random labels and C close to |D| some classes are empty, and a sample of a class never trained on says
nothing about memorization.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from diffmem.config import EvalConfig
from diffmem.data import TrainingSet
from diffmem.edm import edm_sampler
from diffmem.memorization import distance_ratio, nearest_neighbours, to_pixels


@dataclass
class Evaluation:
    ratio: float                  # memorization ratio: share of samples with NN ratio < threshold
    nn_ratio: torch.Tensor        # (num_samples,) ||x - NN1|| / ||x - NN2||
    nn_index: torch.Tensor        # (num_samples, 2) indices of NN1, NN2 in the training subset
    samples: torch.Tensor         # (num_samples, C, H, W) in [-1, 1]


def seeded_latents(seeds, shape, classes: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latents (and labels drawn from `classes`) of the given seeds."""
    latents, labels = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        latents.append(torch.randn(shape, generator=g))
        if classes is not None:
            labels.append(classes[torch.randint(len(classes), (), generator=g)])
    return torch.stack(latents).to(device), (torch.stack(labels).to(device) if classes is not None else None)


@torch.no_grad()
def evaluate_denoiser(denoiser, train_set: TrainingSet, cfg: EvalConfig, device=None) -> Evaluation:
    device = device or train_set.images.device
    shape = train_set.images.shape[1:]
    classes = None if train_set.labels is None else torch.unique(train_set.labels.cpu())
    samples = []
    for start in range(0, cfg.num_samples, cfg.batch_size):
        seeds = range(start, min(start + cfg.batch_size, cfg.num_samples))
        latents, labels = seeded_latents(seeds, shape, classes, device)
        samples.append(edm_sampler(denoiser, latents, labels, cfg.num_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho))
    samples = torch.cat(samples)
    train = train_set.images.to(device)
    if cfg.quantize:   # the paper saves samples as 8-bit PNG and compares on the 0..255 scale
        gen_px, train_px = to_pixels(samples).float(), to_pixels(train).float()
    else:
        gen_px, train_px = samples, train
    d, idx = nearest_neighbours(gen_px, train_px, k=2)
    nn_ratio = distance_ratio(d)
    return Evaluation((nn_ratio < cfg.threshold).float().mean().item(), nn_ratio.cpu(), idx.cpu(), samples.cpu())


def nn_grid_rows(result: Evaluation, train_set: TrainingSet, n: int = 16) -> list[torch.Tensor]:
    """Rows for a picture: samples, their nearest and their second-nearest training images."""
    idx = result.nn_index[:n]
    train = train_set.images.cpu()
    return [result.samples[:n], train[idx[:, 0]], train[idx[:, 1]]]

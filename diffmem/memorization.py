"""The memorization criterion (paper §1): a generated image x is a copy when
||x - NN1|| / ||x - NN2|| < 1/3, with NN1, NN2 its nearest and second-nearest training images in flattened
pixel space. The memorization ratio is the share of generated images that are copies.

Exact nearest neighbours by matrix multiplication, ||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2, in chunks over
both sets so memory is bounded by the chunk sizes, never by (#generated x #train).
"""
from __future__ import annotations

import torch


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> the 8-bit values the paper measures on (EDM's PNG export: x * 127.5 + 128)."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def nearest_neighbours(generated: torch.Tensor, train: torch.Tensor, k: int = 2,
                       chunk_generated: int = 4096, chunk_train: int = 16384):
    """Exact k nearest training images of each generated image: (distances (N, k), indices (N, k))."""
    if len(train) < k:
        raise ValueError(f"need at least {k} training images for {k} nearest neighbours, got {len(train)}")
    device = generated.device
    # Centre on the training mean: same distances, smaller norms, less float32 cancellation.
    train = train.reshape(len(train), -1).float()
    mean = train.mean(0, keepdim=True)
    train = train - mean
    train_sq = (train ** 2).sum(1)
    dists, idxs = [], []
    for g in generated.reshape(len(generated), -1).float().split(chunk_generated):
        g = g.to(train.device) - mean
        g_sq = (g ** 2).sum(1, keepdim=True)
        best_d = torch.full((len(g), k), float("inf"), device=train.device)
        best_i = torch.zeros((len(g), k), dtype=torch.long, device=train.device)
        for start in range(0, len(train), chunk_train):
            t, t_sq = train[start:start + chunk_train], train_sq[start:start + chunk_train]
            d2 = (g_sq - 2 * g @ t.T + t_sq).clamp_min_(0)
            d, i = torch.topk(d2, min(k, len(t)), dim=1, largest=False)
            best_d, order = torch.topk(torch.cat([best_d, d], 1), k, dim=1, largest=False)
            best_i = torch.gather(torch.cat([best_i, i + start], 1), 1, order)
        dists.append(best_d.sqrt())
        idxs.append(best_i)
    return torch.cat(dists).to(device), torch.cat(idxs).to(device)


def distance_ratio(distances: torch.Tensor) -> torch.Tensor:
    """(N, 2) distances to NN1, NN2 -> ||x - NN1|| / ||x - NN2|| (0 for an exact copy, ~1 for a new image)."""
    return distances[:, 0] / distances[:, 1].clamp_min(torch.finfo(distances.dtype).tiny)


def nearest_neighbour_ratio(generated: torch.Tensor, train: torch.Tensor, **chunks) -> torch.Tensor:
    """Per generated image, ||x - NN1|| / ||x - NN2||."""
    return distance_ratio(nearest_neighbours(generated, train, k=2, **chunks)[0])


def memorization_ratio(generated: torch.Tensor, train: torch.Tensor, threshold: float = 1 / 3, **chunks) -> float:
    """Share of generated images whose NN ratio is strictly below the threshold."""
    return (nearest_neighbour_ratio(generated, train, **chunks) < threshold).float().mean().item()

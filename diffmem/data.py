"""Datasets and the paper's training subsets.

A dataset is loaded once as uint8 images (N, C, H, W) with integer class labels, the format of the
files people download. A training subset of size |D| is a prefix of a class-interleaved ordering, so it is
class-balanced (per-class counts differ by at most one) and nested (the subset of size n is a prefix of
the subset of size m > n), as the paper's `open_cifar10_balance` (paper.md §6). Labels follow §4:
none, true, random with C classes (drawn once per image with a seed), unique (label = index).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from diffmem.config import ConfigError, DataConfig


@dataclass
class ImageSet:
    """A whole dataset in memory: uint8 images (N, C, H, W) and their true class labels (N,)."""
    name: str
    images: np.ndarray
    labels: np.ndarray


@dataclass
class TrainingSet:
    """The subset one training sees: images in [-1, 1] and the conditioning labels (None: unconditional)."""
    images: torch.Tensor          # float32 (n, C, H, W) in [-1, 1]
    labels: torch.Tensor | None   # int64 (n,) in [0, label_dim)
    label_dim: int                # 0 for unconditional models
    indices: np.ndarray           # positions in the full dataset, for tracing a sample back


@functools.lru_cache(maxsize=None)
def _digits() -> ImageSet:
    """scikit-learn's bundled 8x8 handwritten digits: 1,797 real images, 10 classes, values 0..16."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]   # to the 8-bit scale of image files
    return ImageSet("digits", images, bunch.target.astype(np.int64))


DATASETS = {"digits": _digits}


def load_dataset(cfg: DataConfig) -> ImageSet:
    """The full dataset, resized to cfg.resolution when asked, restricted to the first C classes."""
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset '{cfg.dataset}'; available: {', '.join(DATASETS)}")
    full = DATASETS[cfg.dataset]()
    images, labels = full.images, full.labels
    if cfg.resolution is not None and cfg.resolution != images.shape[-1]:
        images = resize(images, cfg.resolution)
    if cfg.num_classes is not None:
        classes = np.unique(labels)
        if cfg.num_classes > len(classes):
            raise ConfigError(f"data.num_classes={cfg.num_classes} but {full.name} has {len(classes)} classes; "
                              f"use at most {len(classes)}")
        keep = np.isin(labels, classes[:cfg.num_classes])   # first C classes, as the paper (§4)
        images, labels = images[keep], labels[keep]
    return ImageSet(full.name, images, labels)


def resize(images: np.ndarray, resolution: int) -> np.ndarray:
    """Lanczos resampling of uint8 images, as the paper's dataset_tool (PIL)."""
    from PIL import Image
    out = []
    for img in images:
        hwc = img.transpose(1, 2, 0)
        pil = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
        arr = np.asarray(pil.resize((resolution, resolution), Image.LANCZOS))
        out.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    return np.stack(out)


def balanced_order(labels: np.ndarray, seed: int | None = None) -> np.ndarray:
    """Indices that interleave the classes: round k takes the k-th image of every class in class order.

    Within a class the order is file order (the paper's), or a seeded permutation. Any prefix is
    class-balanced; prefixes are nested by construction."""
    rng = np.random.default_rng(seed) if seed is not None else None
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if rng is not None:
            members = rng.permutation(members)
        rank[members] = np.arange(len(members))
    return np.lexsort((labels, rank))   # sort by rank within class, then by class


def to_unit_range(images_uint8) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (x / 127.5 - 1, as EDM)."""
    return torch.as_tensor(np.asarray(images_uint8)).float() / 127.5 - 1.0


def training_set(cfg: DataConfig, dataset: ImageSet | None = None) -> TrainingSet:
    """The class-balanced nested subset of size cfg.size with the labels cfg.labels asks for."""
    dataset = dataset or load_dataset(cfg)
    n_total = len(dataset.labels)
    if cfg.size > n_total:
        raise ConfigError(f"data.size={cfg.size} is larger than the {n_total} images of {dataset.name}"
                          f"{' with data.num_classes=' + str(cfg.num_classes) if cfg.num_classes else ''}; "
                          f"use data.size<={n_total}")
    order = balanced_order(dataset.labels, cfg.seed)[:cfg.size]
    images = to_unit_range(dataset.images[order])
    if cfg.labels == "none":
        labels, label_dim = None, 0
    elif cfg.labels == "true":
        label_dim = int(dataset.labels.max()) + 1
        labels = torch.as_tensor(dataset.labels[order])
    elif cfg.labels == "random":
        # One draw per image of the full dataset, so an image keeps its label in every nested subset.
        draws = np.random.default_rng(cfg.seed if cfg.seed is not None else 1024).integers(
            0, cfg.label_classes, size=n_total)
        labels, label_dim = torch.as_tensor(draws[order]), cfg.label_classes
    else:  # unique: label = index within the subset, C = |D| (paper's dataset_unique.py)
        labels, label_dim = torch.arange(cfg.size), cfg.size
    return TrainingSet(images, labels, label_dim, order)


def grid_array(rows: list[torch.Tensor], pad: int = 1) -> np.ndarray:
    """An (H, W, C) uint8 picture with one row per tensor of images in [-1, 1] (e.g. samples, NN1, NN2)."""
    n = min(len(r) for r in rows)
    c, h, w = rows[0].shape[1:]
    canvas = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        pix = (row[:n].detach().cpu().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy()
        for j, img in enumerate(pix):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = img.transpose(1, 2, 0)
    scale = max(1, 256 // max(canvas.shape[:2]))   # 8x8 digits are unreadable at 1:1
    canvas = canvas.repeat(scale, 0).repeat(scale, 1)
    return np.repeat(canvas, 3, 2) if c == 1 else canvas


def save_grid(path, rows: list[torch.Tensor]) -> None:
    """Write grid_array(rows) as a PNG (temporary name, then rename: never a half-written file)."""
    import os
    from pathlib import Path
    from PIL import Image
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(grid_array(rows)).save(tmp, format="PNG")
    os.replace(tmp, path)

"""The factors the paper varies (paper.md §4), each a named map from a value to config overrides.

A grid point is one value of one factor: {"label", "value", "overrides"}. The paper's values are the
defaults; a config's `sweep.factors.<name>` list replaces them (values that fit the embedded default live
in experiments/digits.yaml), and `--values` replaces both.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from diffmem.config import Config, ConfigError


@dataclass(frozen=True)
class Factor:
    name: str
    description: str
    paper_values: tuple
    overrides: Callable[[object, Config], dict]    # (value, base config) -> {dotted key: value}


def _dataset(base: Config):
    from diffmem.data import load_dataset   # torch, imported only when a value needs the data: --help, --status fast
    return load_dataset(base.data)


def _dataset_if_here(base: Config):
    """The base config's dataset, or None where it is not on this machine (a config is checked without its
    data; the sweep itself needs it and says so)."""
    try:
        return _dataset(base)
    except ConfigError:
        return None


def _random_labels(value, base: Config) -> dict:
    # Fig. 5: labels drawn uniformly from C classes per image; 'unique' is C = |D|; 'none' is unconditional.
    if value in ("none", "unique"):
        return {"data.labels": value}
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return {"data.labels": "random", "data.label_classes": value}
    raise ConfigError(f"random_labels value {value!r} must be a number of classes C >= 1, 'unique' or 'none'")


def _batch_size(value, base: Config) -> dict:
    # Table 1: the learning rate is scaled with the batch size, lr / batch = 2e-4 / 512.
    return {"train.batch_size": value, "train.lr": base.train.lr * value / base.train.batch_size}


def _mix_rate(value, base: Config) -> dict:
    # Fig. 2c: the class data.mix_class alone, a share alpha of it replaced by images from data.mix_path.
    if not base.data.mix_path:
        raise ConfigError("factor mix_rate needs data.mix_path, a folder or .zip of the images to mix into class "
                          f"data.mix_class={base.data.mix_class} (experiments/paper/intra_class_diversity.yaml)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"mix_rate value {value!r} must be a share alpha in [0, 1]")
    return {"data.mix_rate": float(value)}


def _resolution(value, base: Config) -> dict:
    # Fig. 2(a): attention stays at the second level (32 -> 16, 16 -> 8, 8 -> 4).
    data = _dataset_if_here(base) if base.data.resolution is None else None
    if data is not None and value == data.images.shape[-1]:
        return {}   # the dataset's own resolution is the base config (one ledger key)
    attn = [value // 2] if base.model.attn_resolutions else []
    return {"data.resolution": value, "model.attn_resolutions": attn}


def _num_classes(value, base: Config) -> dict:
    # Fig. 2(b): the first C classes, |D|/C each; all of the dataset's classes is the base config (one ledger key)
    data = _dataset_if_here(base) if base.data.num_classes is None else None
    if data is not None and value == len(set(data.labels.tolist())):
        return {}
    return {"data.num_classes": value}


def _skip_connections(value, base: Config) -> dict:
    mask = skip_mask(value, base)
    return {"model.skip_connections": None if all(mask) else mask}   # all on is the base model (None): one key


def skip_mask(value, base: Config) -> list[int]:
    """'all', 'single:k' (keep only skip k, 1-based in encoder order, Fig. 4), 'level:r' (keep the skips
    at resolution r), or an explicit 0/1 string such as '110000000'."""
    m = base.model
    per_level, levels = m.num_blocks + 1, len(m.channel_mult)
    n = per_level * levels
    text = str(value)
    if text == "all":
        return [1] * n
    if text.startswith("single:") and text[7:].isdigit() and 1 <= int(text[7:]) <= n:
        return [int(i == int(text[7:]) - 1) for i in range(n)]
    resolution = base.data.resolution or _dataset(base).images.shape[-1]
    resolutions = [resolution >> i for i in range(levels)]
    if text.startswith("level:") and text[6:].isdigit() and int(text[6:]) in resolutions:
        level = resolutions.index(int(text[6:]))
        return [int(i // per_level == level) for i in range(n)]
    if len(text) == n and set(text) <= {"0", "1"}:
        return [int(c) for c in text]
    raise ConfigError(f"skip_connections value {value!r} must be 'all', 'single:1'..'single:{n}', "
                      f"'level:<r>' with r in {resolutions}, or {n} zeros and ones")


FACTORS = {f.name: f for f in [
    Factor("data_size", "training-set size |D|: the memorization-ratio curve itself (no search)",
           (500, 1000, 2000, 4000, 8000, 16000), lambda v, b: {"data.size": v}),
    Factor("width", "model width, model_channels (Fig. 3)", (128, 192, 256, 320), lambda v, b: {"model.channels": v}),
    Factor("depth", "model depth, blocks per resolution (Fig. 3)", (2, 4, 6, 8, 10, 12),
           lambda v, b: {"model.num_blocks": v}),
    Factor("time_embedding", "noise-level embedding (Fig. 3)", ("positional", "fourier"),
           lambda v, b: {"model.embedding": v}),
    Factor("skip_connections", "which encoder-decoder skips are kept (Fig. 4)",
           ("all",) + tuple(f"single:{k}" for k in range(1, 10)) + ("level:32", "level:16", "level:8"),
           _skip_connections),
    Factor("class_labels", "unconditional vs true class labels (Fig. 5)", ("none", "true"),
           lambda v, b: {"data.labels": v}),
    Factor("random_labels", "conditioning on C uninformative random classes (Fig. 5)",
           ("none", 1, 2, 5, 10, 20, 50, 100, 500, 1000, "unique"), _random_labels),
    Factor("num_classes", "inter-class diversity: the first C classes (Fig. 2b)", (1, 2, 5, 10), _num_classes),
    Factor("mix_rate", "intra-class diversity: share alpha of data.mix_path images in class data.mix_class "
           "(Fig. 2c; 0 is that class alone)", (0.0, 0.2, 0.5, 0.8, 1.0), _mix_rate),
    Factor("resolution", "data dimension (Fig. 2a)", (32, 16, 8), _resolution),
    Factor("epochs", "training duration in epochs", (10000, 20000, 40000), lambda v, b: {"train.duration": f"{v}ep"}),
    Factor("batch_size", "batch size, lr scaled with it (Table 1)", (128, 256, 384, 512, 640, 768, 896), _batch_size),
    Factor("learning_rate", "Adam learning rate at a fixed batch size", (1e-4, 2e-4, 4e-4, 1e-3),
           lambda v, b: {"train.lr": v}),
    Factor("weight_decay", "Adam L2 weight decay (Table 2)", (0, 1e-5, 1e-4, 1e-3, 1e-2, 2e-2, 5e-2, 8e-2, 1e-1),
           lambda v, b: {"train.weight_decay": v}),
    Factor("ema", "EMA decay per step after ramp-up (Table 3)", (0.99929, 0.999, 0.99, 0.9, 0.8, 0.5, 0.2, 0.1, 0.0),
           lambda v, b: {"train.ema_schedule": "paper_final", "train.ema_beta": v}),   # the paper's mode4
]}


def get_factor(name: str) -> Factor:
    if name not in FACTORS:
        near = difflib.get_close_matches(name, FACTORS, n=1, cutoff=0.0)
        raise ConfigError(f"unknown factor '{name}'{f'; did you mean {near[0]!r}?' if near else ''} "
                          f"(--list-factors shows all)")
    return FACTORS[name]


def grid_points(factor: Factor, values, base: Config) -> list[dict]:
    """One grid point per value: {"label": "random_labels=10", "value": 10, "overrides": {...}}."""
    if not values:
        raise ConfigError(f"factor {factor.name} has no values; pass e.g. --values {factor.paper_values[0]}")
    points = []
    for value in values:
        overrides = factor.overrides(value, base)
        points.append({"label": f"{factor.name}={value}", "value": value, "overrides": overrides})
    labels = [p["label"] for p in points]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"factor {factor.name} has a repeated value in {list(values)}; list each value once")
    return points

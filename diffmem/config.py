"""Typed configuration: dataclasses for data, model, training and evaluation.

Loaded from YAML plus dotted overrides (`--set model.channels=64`). Every key is checked at load time:
an unknown key, a wrong type or an impossible value raises `ConfigError` with one line that names the
key and the closest valid one. Defaults are the paper's basic setup (paper.md §6): DDPM++ with VP
preconditioning, 128 channels, 2 blocks, batch 512, lr 2e-4, 40k epochs, the paper's EMA (0.99929 per step).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from diffmem.ema import SCHEDULES as EMA_SCHEDULES


class ConfigError(ValueError):
    """A configuration that cannot run. The message is one line that names the fix."""


@dataclass
class DataConfig:
    dataset: str = "digits"            # digits (embedded, scikit-learn's 8x8 handwritten digits), cifar10,
                                       # folder (PNG/JPEG folder or .zip), ffhq, imagenette (diffmem/data.py)
    path: str | None = None            # where an on-disk dataset lives (not needed for digits)
    resolution: int | None = None      # None: the dataset's own resolution
    size: int = 1000                   # |D|: training-set size
    num_classes: int | None = None     # keep only the first C classes (inter-class diversity); None: all
    labels: str = "none"               # none | true | random | unique (paper §4 conditioning)
    label_classes: int = 10            # C for random labels
    seed: int | None = None            # None: file order within each class (the paper's) and random labels
                                       # drawn with seed 1024 (the paper's); an int reseeds both
    mix_path: str | None = None        # intra-class diversity (paper §4): a folder or .zip of images mixed into
    mix_class: int = 5                 # this class (CIFAR-10 dogs in the paper) ...
    mix_rate: float = 0.0              # ... as this share alpha of |D|; with mix_path set, trains on that one
                                       # class only, alpha = 0 included (the paper's Fig. 2c starts at alpha = 0)


# EDM train.py --arch: the SongUNet knobs that tell DDPM++ from NCSN++ (paper.md §8); a null model key takes them.
ARCHITECTURES = {
    "ddpmpp": dict(embedding="positional", channel_mult_noise=1, encoder="standard", resample_filter=[1, 1]),
    "ncsnpp": dict(embedding="fourier", channel_mult_noise=2, encoder="residual", resample_filter=[1, 3, 3, 1]),
}


@dataclass
class ModelConfig:
    arch: str = "ddpmpp"               # ddpmpp (paper's basic setup) | ncsnpp (paper's Fig. 4, with precond ve):
                                       # the values of the four null keys below (ARCHITECTURES)
    precond: str = "vp"                # vp (paper's basic setup) | ve (NCSN++ in Fig. 4) | edm
    channels: int = 128                # width (model_channels)
    channel_mult: list[int] = field(default_factory=lambda: [2, 2, 2])
    channel_mult_emb: int = 4
    num_blocks: int = 2                # depth
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.13
    embedding: str | None = None       # positional | fourier (scale 16); null: the arch's (positional, fourier)
    channel_mult_noise: int | None = None   # noise-embedding width / channels; null: the arch's (1, 2)
    encoder: str | None = None         # standard | residual (input path joins every level); null: the arch's
    resample_filter: list[int] | None = None   # up/downsampling FIR taps; null: the arch's ([1,1], [1,3,3,1])
    skip_connections: list[int] | None = None   # 0/1 per encoder skip; None: all on

    def __post_init__(self):
        # A null knob takes the architecture's value, so the resolved config names the network it builds
        # (an explicit value wins: ncsnpp with embedding positional is the paper code's --arch=ncsnpp default).
        for key, value in ARCHITECTURES.get(self.arch, {}).items():   # an unknown arch fails in validate()
            if getattr(self, key) is None:
                setattr(self, key, list(value) if isinstance(value, list) else value)


@dataclass
class TrainConfig:
    duration: str = "40000ep"          # "<number>ep" (epochs of |D|) or "<number>kimg" (thousands of images)
    batch_size: int = 512
    lr: float = 2e-4
    lr_warmup: str = "200ep"           # linear warm-up (EDM's 10 Mimg at 50k scaled to |D|, paper §6)
    weight_decay: float = 0.0          # Adam's L2-coupled weight decay (not AdamW), paper Table 2
    ema_schedule: str = "paper"        # the per-step EMA decay beta (diffmem/ema.py, paper.md §6):
                                       # paper: the paper's default (its code's ema_mode=mode2), beta = 0.99929
                                       #   per step after the ramp-up at every |D| and batch size
                                       # paper_final: the paper's Table 3 (mode4), beta = train.ema_beta after it
                                       # halflife: EDM's (mode1), beta = 0.5 ** (batch / ema_halflife)
    ema_halflife: str = "10ep"         # h (paper: 0.5|D|/50 kimg = 10 epochs of |D|)
    ema_beta: float | None = None      # paper_final only: the per-step beta after the ramp-up (the paper's --final-ema)
    ema_rampup: float | None = 0.05    # EDM's ramp-up: h <= ema_rampup * images seen; null: no ramp-up
    seed: int = 1024
    device: str = "auto"               # auto | cpu | cuda (a checkpoint is saved at every eval.every snapshot)
    log_every: str = "10ep"
    # Speed (diffmem/precision.py; measured by bench/gpu_check.sh). The training subset already lives on the
    # device as one tensor (50k CIFAR-10 images are 600 MB in fp32), so batches are device-side index gathers:
    # no DataLoader, no pinned host memory, no copy per epoch. Evaluation is always exact fp32 (no autocast,
    # no TF32) whatever these say: a given EMA model gets the same memorization ratio under any of them.
    precision: str = "fp32"            # fp32: IEEE float32, TF32 off (the paper's setting, paper.md §6; the default)
                                       # tf32: TF32 tensor-core matmuls/convs on Ampere+ GPUs (same as fp32 on CPU)
                                       # bf16: autocast to bfloat16 around forward + loss; weights, grads, Adam,
                                       # EMA fp32
                                       # tf32 and bf16 change the arithmetic: a different training,
                                       # a different ledger key
    channels_last: bool = True         # NHWC model and batches: the same arithmetic up to summation order;
                                       # dropout draws its masks in memory order, so a different, equally
                                       # distributed draw (tests/test_fast_path.py compares at dropout 0)
    compile: bool = False              # torch.compile the network for training; pays on a GPU for long trainings
                                       # (the paper's 40k epochs), not on CPU or for trainings of a few minutes:
                                       # compiling costs a minute or more per process, again on every resume


@dataclass
class EvalConfig:
    every: str = "2500kimg"            # snapshot spacing (paper: every 2.5M images)
    num_samples: int = 10000           # generated images per evaluation, seeds 0..num_samples-1
    batch_size: int = 1000
    num_steps: int = 18                # EDM Heun sampler, 35 network evaluations
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    threshold: float = 1 / 3           # ||x-NN1|| / ||x-NN2|| strictly below counts as memorized
    memorized_at: float | None = None  # a ratio >= this is "memorized" (a sweep sets 1 - epsilon): training
                                       # stops once its running max reaches it, and the adaptive evaluation
                                       # decides against it; null: full duration, every seed sampled
    adaptive: bool = True              # sample the seeds in looks, stop once a sequential test decides
                                       # (diffmem/sequential.py); false: every seed, every snapshot
    adaptive_error: float = 0.01       # bound on a wrong early decision over all looks of one evaluation
    quantize: bool = True              # measure distances on 8-bit images, as the paper does
    sample_classes: str = "present"    # a conditional model's sample labels, drawn per seed uniformly from
                                       # present: the classes that hold a training image of the subset
                                       # all: all label_dim classes, the paper's (EDM's generate.py); at
                                       #   C close to |D| some have no image (evaluate.py says why that matters)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}
CHOICES = {
    "data.labels": ("none", "true", "random", "unique"),
    "model.arch": tuple(ARCHITECTURES),
    "model.precond": ("vp", "ve", "edm"),
    "model.embedding": ("positional", "fourier"),
    "model.encoder": ("standard", "residual"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.ema_schedule": EMA_SCHEDULES,
    "eval.sample_classes": ("present", "all"),
    "train.precision": ("fp32", "tf32", "bf16"),
}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(ep|kimg)\s*$")


def parse_duration(text: str, key: str = "duration") -> tuple[float, str]:
    """'40000ep' -> (40000.0, 'ep'); '2500kimg' -> (2500.0, 'kimg')."""
    m = _DURATION.match(str(text))
    if not m or not 0 < float(m.group(1)) < math.inf:
        raise ConfigError(f"{key}={text!r} is not a duration; write a positive number with a unit, "
                          f"e.g. '200ep' (epochs of |D|) or '2500kimg' (thousands of images)")
    return float(m.group(1)), m.group(2)


def duration_images(text: str, size: int, key: str = "duration") -> int:
    """A duration in images for a training set of `size` images."""
    value, unit = parse_duration(text, key)
    return max(1, round(value * size if unit == "ep" else value * 1000))


def _closest(name: str, options, prefix: str = "") -> str:
    near = difflib.get_close_matches(name, list(options), n=1, cutoff=0.0)
    return f"; did you mean '{prefix}{near[0]}'?" if near else ""


def _coerce(key: str, value, hint):
    """Check and convert one value against its type annotation; raise one clear line if it cannot."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[1,2]")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if hint is str:
        if isinstance(value, bool):   # YAML reads an unquoted true/false as a bool; the word is meant
            return "true" if value else "false"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {hint}")


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}"
        if name not in hints:
            raise ConfigError(f"unknown config key '{key}'{_closest(name, hints, prefix + '.')}")
        kwargs[name] = _coerce(key, value, hints[name])
    return cls(**kwargs)


# Keys that were accepted but never read, and why they are gone. What diffmem wrote itself (a sweep.json, a
# checkpoint) loads with them dropped; a user's config file or --set naming one is refused (check_retired).
RETIRED_KEYS = {("train", "checkpoint_every"): "a checkpoint is saved at every eval.every snapshot"}


def retired_in(raw: dict) -> list[tuple[str, str]]:
    """The retired keys a config's sections hold."""
    return [(section, name) for section, name in RETIRED_KEYS if isinstance(raw.get(section), dict)
            and name in raw[section]]


def check_retired(key: str, where: str) -> None:
    """A retired key given by the user: one line saying why it is gone, rather than ignoring it silently."""
    section, _, name = key.partition(".")
    if (section, name) in RETIRED_KEYS:
        raise ConfigError(f"{key} {where} is no longer a setting ({RETIRED_KEYS[section, name]}); delete it")


def from_dict(raw: dict) -> Config:
    raw = dict(raw or {})
    raw.pop("sweep", None)   # an experiment file's sweep settings belong to sweeps/, not to one training
    for section, key in retired_in(raw):
        raw[section] = {k: v for k, v in raw[section].items() if k != key}
    sections = {}
    for name in list(raw):
        if name in SECTIONS:
            sections[name] = _build(SECTIONS[name], raw.pop(name) or {}, name)
    if raw:
        name = next(iter(raw))
        raise ConfigError(f"unknown config section '{name}'{_closest(name, SECTIONS)}")
    cfg = Config(**sections)
    validate(cfg)
    return cfg


def parse_value(text: str, what: str = "value"):
    """A command-line value, read as YAML ('64', '[1,2]', 'none'); '4e-3' is a number, as meant. `what` names
    where it came from in the one line a value that is not YAML gets."""
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {text!r} is not valid YAML ({getattr(e, 'problem', None) or type(e).__name__}); "
                          f"write e.g. 64, 1e-3, none or [1, 2], and quote text") from None
    if isinstance(value, str):   # YAML 1.1 reads '4e-3' as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return value


def parse_override(text: str) -> tuple[str, object]:
    """'model.channels=64' -> ('model.channels', 64)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. model.channels=64")
    key, value = text.split("=", 1)
    check_retired(key.strip(), "in --set")
    return key.strip(), parse_value(value, f"the value of override {key.strip()}=")


def apply_overrides(raw: dict, overrides: dict) -> dict:
    """Set dotted keys in a nested dict (a copy). Unknown keys are caught by from_dict."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) != 2:
            raise ConfigError(f"override key '{key}' must be section.name, e.g. model.channels")
        section, name = parts
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}' in '{key}'{_closest(section, SECTIONS)}")
        out.setdefault(section, {})
        if out[section] is None:
            out[section] = {}
        out[section][name] = value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; pass a YAML file, e.g. --config "
                          f"experiments/digits.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass --config experiments/digits.yaml "
                          f"or another file under experiments/")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({getattr(e, 'strerror', None) or e}); "
                          f"fix its permissions or pass another --config") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file {str(path)!r}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    # every default is the paper's full setup (40,000 epochs of |D|): never meant by an empty file
    if raw is None or raw == {}:
        raise ConfigError(f"config file {str(path)!r} is empty, which would mean the paper's full setup (40,000 "
                          f"epochs per training); write its settings, e.g. start from experiments/digits.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (data, model, train, eval)")
    for section, name in retired_in(raw):
        check_retired(f"{section}.{name}", f"in config file {str(path)!r}")
    return raw


def load_config(path: str | Path | None = None, overrides=()) -> Config:
    """Load a YAML config (or the defaults) and apply 'key=value' overrides or a {key: value} dict."""
    raw = read_yaml(path) if path else {}
    if not isinstance(overrides, dict):
        overrides = dict(parse_override(o) for o in overrides)
    return from_dict(apply_overrides(raw, overrides))


def _check_choice(key: str, value):
    options = CHOICES[key]
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(options)}{_closest(str(value), options)}")


# What each number may be, said when it is not a finite number at all (NaN, inf).
FINITE = {"data.mix_rate": "in [0, 1]", "model.dropout": "in [0, 1)", "train.lr": "> 0",
          "train.weight_decay": ">= 0", "train.ema_beta": "in [0, 1), or null", "train.ema_rampup": "> 0, or null",
          "eval.sigma_min": "> 0", "eval.sigma_max": "> eval.sigma_min", "eval.rho": "> 0 (EDM: 7)",
          "eval.threshold": "in (0, 1]", "eval.memorized_at": "in (0, 1], or null",
          "eval.adaptive_error": "in (0, 0.5)"}
SEED_MAX = 2 ** 63 - 1   # torch seeds are 64-bit; train.seed + rank must stay one


def _group_norm_splits(channels: int) -> bool:
    """diffmem/networks.py group_norm: min(32, channels // 4) groups of equal size, at least one."""
    groups = min(32, channels // 4)
    return groups >= 1 and channels % groups == 0


def norm_channels(channels: int, channel_mult, num_blocks: int) -> list[int]:
    """Every channel count SongUNet (diffmem/networks.py) puts through group_norm, in the order it builds them:
    the encoder (input conv to `channels`, per level a downsampling block and num_blocks blocks to channels *
    mult), the decoder (middle or upsampling blocks, then num_blocks + 1 blocks that take a skip) and the output.
    tests/test_bad_input.py builds the network for many shapes to hold this to networks.py."""
    counts, skips, cout = [], [channels], channels
    for level, mult in enumerate(channel_mult):
        if level:                                   # the downsampling block, cout -> cout
            counts.append(cout)
            skips.append(cout)
        for _ in range(num_blocks):
            counts += [cout, channels * mult]
            cout = channels * mult
            skips.append(cout)
    for level in reversed(range(len(channel_mult))):
        counts.append(cout)                         # the two middle blocks, or the upsampling block
        for _ in range(num_blocks + 1):
            counts += [cout + skips.pop(), channels * channel_mult[level]]
            cout = channels * channel_mult[level]
    return counts + [cout]                          # the output norm


def _network_fits(m: ModelConfig, channels: int) -> bool:
    noise = channels * m.channel_mult_noise
    return noise >= 4 and noise % 2 == 0 and all(map(_group_norm_splits, norm_channels(channels, m.channel_mult,
                                                                                         m.num_blocks)))


def _check_group_norm(m: ModelConfig) -> None:
    bad = next((c for c in norm_channels(m.channels, m.channel_mult, m.num_blocks) if not _group_norm_splits(c)), None)
    if bad is None:
        return
    below = next((c for c in range(m.channels - 1, 0, -1) if _network_fits(m, c)), None)
    above = next((c for c in range(m.channels + 1, 4 * m.channels + 65) if _network_fits(m, c)), None)
    if bad < 4:
        raise ConfigError(f"model.channels={m.channels} is too small: GroupNorm needs at least 4 channels per group "
                          f"and the network's first layer has model.channels = {m.channels}; use model.channels>="
                          f"{above}")
    raise ConfigError(f"model.channels={m.channels} with model.channel_mult={m.channel_mult} gives a layer of {bad} "
                      f"channels that GroupNorm cannot split into min(32, {bad} // 4) = {min(32, bad // 4)} equal "
                      f"groups; use model.channels=" + " or ".join(str(c) for c in (below, above) if c))


def check_machine(cfg: Config) -> None:
    """What the config asks of the machine that runs it: a GPU for train.device=cuda."""
    if cfg.train.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but this machine has no GPU (torch.cuda.is_available() is False); "
                              "use train.device=auto (or cpu)")


def validate_with_data(cfg: Config, resolution: int, images: int, name: str) -> None:
    """The checks that need the dataset as loaded (its resolution, its number of images), where the caller has
    both: the network's depth against the resolution, random labels against the images."""
    m, d = cfg.model, cfg.data
    levels = len(m.channel_mult)
    if resolution >> (levels - 1) < 2:   # diffmem/networks.py: the lowest level must be at least 2x2
        most = max(1, int(math.log2(resolution)))
        raise ConfigError(f"model.channel_mult={m.channel_mult} has {levels} levels, too deep for the "
                          f"{resolution}x{resolution} images of {name}: each level halves the resolution and the "
                          f"lowest must be >= 2x2; use at most {most} levels, e.g. model.channel_mult="
                          f"{m.channel_mult[:most]}")
    if d.labels == "random" and d.label_classes > images:
        raise ConfigError(f"data.label_classes={d.label_classes} is more than the {images} images of {name}: random "
                          f"labels leave at least {d.label_classes - images} classes without an image; use "
                          f"data.label_classes<={images}, or data.labels=unique for one class per image")


def validate(cfg: Config) -> None:
    """Impossible values fail here, before anything is trained."""
    for key in CHOICES:
        section, name = key.split(".")
        _check_choice(key, getattr(getattr(cfg, section), name))
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                key = f"{section}.{f.name}"
                raise ConfigError(f"{key}={value} must be a finite number"
                                  + (f" {FINITE[key]}" if key in FINITE else ""))
    d, m, t, e = cfg.data, cfg.model, cfg.train, cfg.eval
    for key, seed in (("data.seed", d.seed), ("train.seed", t.seed)):
        if seed is not None and not 0 <= seed <= SEED_MAX:
            raise ConfigError(f"{key}={seed} must be an integer in [0, 2**63 - 1]"
                              + (", or null for file order and the paper's label seed 1024"
                                 if key == "data.seed" else ""))
    positive = {"data.size": d.size, "data.label_classes": d.label_classes, "model.channels": m.channels,
                "model.num_blocks": m.num_blocks, "model.channel_mult_emb": m.channel_mult_emb,
                "model.channel_mult_noise": m.channel_mult_noise,
                "train.batch_size": t.batch_size, "train.lr": t.lr, "eval.num_samples": e.num_samples,
                "eval.batch_size": e.batch_size, "eval.num_steps": e.num_steps}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    if d.num_classes is not None and d.num_classes <= 0:
        raise ConfigError(f"data.num_classes={d.num_classes} must be positive (or null for all classes)")
    if not 0 <= d.mix_rate <= 1:
        raise ConfigError(f"data.mix_rate={d.mix_rate} must be in [0, 1], the share of data.mix_path images in |D|")
    if d.mix_class < 0:
        raise ConfigError(f"data.mix_class={d.mix_class} must be a class index >= 0")
    if d.mix_rate > 0 and not d.mix_path:
        raise ConfigError(f"data.mix_rate={d.mix_rate} needs data.mix_path, a folder or .zip of the images to mix "
                          f"into class data.mix_class={d.mix_class}")
    if d.resolution is not None and (d.resolution < 8 or d.resolution & (d.resolution - 1)):
        raise ConfigError(f"data.resolution={d.resolution} must be a power of two >= 8, e.g. 8, 16 or 32")
    if not m.channel_mult or any(c <= 0 for c in m.channel_mult):
        raise ConfigError(f"model.channel_mult={m.channel_mult} must be a non-empty list of positive ints")
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if t.weight_decay < 0:
        raise ConfigError(f"train.weight_decay={t.weight_decay} must be >= 0")
    if t.ema_schedule == "paper_final" and t.ema_beta is None:
        raise ConfigError("train.ema_schedule=paper_final needs train.ema_beta, the per-step beta after the ramp-up "
                          "(the paper's --final-ema, e.g. train.ema_beta=0.99929)")
    if t.ema_schedule != "paper_final" and t.ema_beta is not None:
        raise ConfigError(f"train.ema_beta={t.ema_beta} is read only by train.ema_schedule=paper_final (the paper's "
                          f"Table 3); set train.ema_schedule=paper_final or remove train.ema_beta")
    if t.ema_beta is not None and not 0 <= t.ema_beta < 1:
        raise ConfigError(f"train.ema_beta={t.ema_beta} must be in [0, 1)")
    if t.ema_rampup is not None and not 0 < t.ema_rampup < math.inf:
        raise ConfigError(f"train.ema_rampup={t.ema_rampup} must be a positive share of the images seen (EDM: 0.05), "
                          f"or null for no ramp-up")
    for key in ("train.duration", "train.lr_warmup", "train.ema_halflife", "train.log_every", "eval.every"):
        section, name = key.split(".")
        if key == "train.lr_warmup" and str(getattr(t, name)).strip() in ("0", "0ep", "0kimg"):
            continue
        parse_duration(getattr(getattr(cfg, section), name), key)
    if not 0 < e.threshold <= 1:
        raise ConfigError(f"eval.threshold={e.threshold} must be in (0, 1]; the paper uses 1/3")
    if e.memorized_at is not None and not 0 < e.memorized_at <= 1:
        raise ConfigError(f"eval.memorized_at={e.memorized_at} must be in (0, 1] or null")
    if not 0 < e.adaptive_error < 0.5:
        raise ConfigError(f"eval.adaptive_error={e.adaptive_error} must be in (0, 0.5): the chance an early decision "
                          f"of the adaptive evaluation is wrong (default 0.01), or set eval.adaptive=false")
    if not 0 < e.sigma_min < e.sigma_max:
        raise ConfigError(f"eval.sigma_min={e.sigma_min} and eval.sigma_max={e.sigma_max} need 0 < min < max")
    if not e.rho > 0:
        raise ConfigError(f"eval.rho={e.rho} must be > 0 (EDM: 7), the exponent that spaces the sampler's noise levels")
    _check_group_norm(m)
    if m.channels * m.channel_mult_noise % 2 or m.channels * m.channel_mult_noise < 4:
        raise ConfigError(f"model.channels * model.channel_mult_noise = {m.channels * m.channel_mult_noise} "
                          f"must be even and >= 4 (the noise embedding's sin/cos pairs)")
    f = m.resample_filter
    if len(f) < 2 or len(f) % 2 or any(v < 0 for v in f) or sum(f) <= 0:
        raise ConfigError(f"model.resample_filter={f} must be an even number of taps >= 0 with a positive sum, "
                          f"e.g. [1, 1] (DDPM++) or [1, 3, 3, 1] (NCSN++); or null for model.arch's")
    if m.skip_connections is not None:
        expected = len(m.channel_mult) * (m.num_blocks + 1)
        if len(m.skip_connections) != expected or any(s not in (0, 1) for s in m.skip_connections):
            raise ConfigError(f"model.skip_connections has {len(m.skip_connections)} entries, expected {expected} "
                              f"= len(channel_mult) * (num_blocks + 1) zeros and ones; e.g. {[1] * expected}")

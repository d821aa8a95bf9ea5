"""The sweep as data: its spec (OUTPUT/sweep.json, everything that defines it, built from the command line by
build_spec, read back whole and of this version by --resume, --status and report.py), the checks of a folder
it is to go into or continue in, and what every trial of it gets (trial_settings). No Ray; torch only where a
new sweep's datasets are loaded."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from diffmem.config import (SEED_MAX, ConfigError, apply_overrides, check_machine, from_dict, parse_override,
                            parse_value, read_yaml, validate_with_data)
from sweeps import curve
from sweeps.curve import POINT, is_curve
from sweeps.factors import get_factor, grid_points
from sweeps.folder import SPEC_FILE, SweepFolder, atomic_write
from sweeps.ray_cluster import check_local_capacity

ROOT = Path(__file__).resolve().parent.parent


SPEC_FORMAT = "diffmem.emm_search"   # sweep.json's "format": how a folder written by this tool is recognized
SPEC_VERSION = 2                     # 2: "format" added; ledger version 2 (data fingerprint, device, torch)
SPEC_KEYS = ("factor", "values", "grid_points", "base", "epsilon", "tolerance", "size_range", "allowed_sizes",
             "workers", "gpus_per_worker", "ddp", "max_failures", "max_concurrent", "ledger", "no_reuse", "config_file")


@dataclass
class Sweep:
    """Everything that defines a sweep, resolved and checked (build_spec), as OUTPUT/sweep.json holds it
    (write_spec, read_spec). The keys after config_file came later; a sweep.json written before one of them
    reads as the default given here."""
    factor: str
    values: list
    grid_points: list            # [{label, value, overrides}], the factor's values as configs (sweeps/factors.py)
    base: dict                   # the resolved config every training starts from
    epsilon: float               # memorized: best ratio >= 1 - epsilon (docs/paper.md §2)
    tolerance: float             # a bracket [low, high) is closed when high / low <= 1 + tolerance
    size_range: list             # [LO, HI] sizes the search starts from (a curve: its smallest and largest)
    allowed_sizes: list          # the |D| grid: multiples of sweep.size_step up to the dataset's size
    workers: int                 # workers per training (DDP above 1)
    gpus_per_worker: int
    ddp: bool
    max_failures: int            # Tune's retries of a failed training
    max_concurrent: int | None   # --max-concurrent; None: what the cluster holds
    ledger: str | None           # the results ledger's path (None: an estimate, which records nothing)
    no_reuse: bool
    config_file: str
    preset: str | None = None
    seeds: int = 1               # training seeds per grid point (--seeds)
    pack_size: int = 1           # trainings packed per worker (--pack-size; sweeps/packing.py)
    tracking: dict = field(default_factory=dict)   # --wandb, --mlflow (both keys always there: __post_init__)
    storage: str | None = None   # --storage URI of the Tune experiment (sweeps/storage.py); None: the folder
    output: str | None = None    # where the folder was made (a moved folder resumes where it is now)
    format: str = SPEC_FORMAT
    version: int = SPEC_VERSION

    def __post_init__(self):
        self.tracking = {"wandb": None, "mlflow": None, **(self.tracking or {})}

    @classmethod
    def from_dict(cls, d: dict) -> Sweep:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


# The types of the keys of sweep.json that --resume, --status and report.py read.
SPEC_TYPES = {"factor": str, "values": list, "grid_points": list, "base": dict, "epsilon": (int, float),
              "tolerance": (int, float), "size_range": list, "allowed_sizes": list, "workers": int,
              "gpus_per_worker": int, "max_failures": int, "max_concurrent": (int, type(None)), "ledger": str,
              "config_file": str}


def read_spec(output: Path, use: str = "resume") -> Sweep:
    """The sweep.json of a folder this tool wrote, whole and of this version; else one line (ConfigError).
    `--resume` checks it before Tune touches the folder: Tune's own files there (tuner.pkl, trial state) are
    pickles, and unpickling runs code. `use` ("resume", "status", "report") words the fix."""
    fix = "resume only a folder a sweep wrote (pass its --output folder)" if use == "resume" else \
        "pass the --output folder of a sweep"
    path = SweepFolder(output).spec
    if not path.is_file():
        raise ConfigError(f"{output} is not a sweep folder (no {SPEC_FILE}); pass the --output folder of a sweep")
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        spec, why = None, f"unreadable: {type(e).__name__}"
    else:
        why = "no diffmem format key"
    ours = isinstance(spec, dict) and (spec.get("format") == SPEC_FORMAT or (   # version 1 had no format key
        "format" not in spec and spec.get("version") == 1 and {"factor", "grid_points", "base"} <= set(spec)))
    if not ours:
        raise ConfigError(f"{path} was not written by diffmem's emm_search ({why}); {fix}")
    if spec.get("version") != SPEC_VERSION and use == "resume":   # --status and report.py only read the folder
        raise ConfigError(f"{path} was written by another version of emm_search (format {spec.get('version')}); "
                          f"start a new sweep")
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ConfigError(f"{path} is incomplete (no '{missing[0]}'); "
                          + ("start a new sweep" if use == "resume" else "it cannot be read"))
    wrong = [k for k, t in SPEC_TYPES.items() if not isinstance(spec[k], t) or isinstance(spec[k], bool)]
    if not wrong and not all(isinstance(p, dict) and "label" in p for p in spec["grid_points"]):
        wrong = ["grid_points"]
    seeds = spec.get("seeds", 1)
    if not wrong and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        wrong = ["seeds"]
    storage = spec.get("storage")
    if not wrong and storage is not None and not (isinstance(storage, str) and "://" in storage):
        wrong = ["storage"]
    if wrong:
        raise ConfigError(f"{path} is damaged ('{wrong[0]}' is {json.dumps(spec[wrong[0]], default=str)[:60]}); "
                          + ("start a new sweep" if use == "resume" else "it cannot be read"))
    return Sweep.from_dict(spec)


def write_spec(output: Path, spec: Sweep) -> None:
    output.mkdir(parents=True, exist_ok=True)
    text = json.dumps(spec.to_dict(), indent=1, default=str)
    atomic_write(SweepFolder(output).spec, lambda p: p.write_text(text))


def pack_servers(spec: Sweep, trainings: int) -> int:
    """Pack servers for `trainings` at once: one per slot, each training up to pack_size (sweeps/packing.py)."""
    return -(-trainings // spec.pack_size)


def trial_points(spec: Sweep) -> list[dict]:
    """The grid points as the trials see them: a curve's trials are one grid point that differ only in |D|."""
    return [POINT] if is_curve(spec.factor) else spec.grid_points


def trial_settings(spec: Sweep, output: Path, trainings: int = 1) -> dict:
    """What every trial of the sweep gets (sweeps.trainable) when `trainings` run at once."""
    return settings_of(spec.base, spec.epsilon, output, spec.ledger, early_stop=not is_curve(spec.factor),
                       workers=spec.workers, gpus_per_worker=spec.gpus_per_worker, no_reuse=spec.no_reuse,
                       max_failures=spec.max_failures, pack_size=spec.pack_size, storage=spec.storage,
                       pack_servers=pack_servers(spec, trainings))


def settings_of(base: dict, epsilon: float, output: Path, ledger: str | None, *, early_stop: bool = True,
                workers: int = 1, gpus_per_worker: int = 0, no_reuse: bool = False, max_failures: int = 1,
                pack_size: int = 1, storage: str | None = None, pack_servers: int = 1, **extra) -> dict:
    """A trial's settings, the one place they are assembled (an emm_search sweep's through trial_settings,
    explore's with its `extra`): the base config, the stop rule (1 - epsilon, unless early_stop is off), where
    it writes, its ledger (no_reuse: record, never answer from it), its workers and its retries. A dict: Tune
    hands it to the trials, and pickles it with the sweep's callbacks."""
    return {"base": base, "epsilon": epsilon, "output": str(Path(output).resolve()), "early_stop": early_stop,
            "workers": workers, "gpus_per_worker": gpus_per_worker, "threads_per_worker": 1, "ledger": ledger,
            "no_reuse": bool(no_reuse), "max_failures": max_failures, "pack_size": pack_size, "storage": storage,
            "pack_servers": pack_servers, **extra}


# ---- building a new sweep's spec from the command line ----

PRESETS = ROOT / "experiments" / "presets"


def read_with_preset(config: str, preset: str | None) -> dict:
    """The config file as a dict, with experiments/presets/<preset>.yaml laid over it."""
    raw = read_yaml(config)
    if preset:
        path = PRESETS / f"{preset}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
            raise ConfigError(f"unknown preset '{preset}'; available: {known}")
        raw = _deep_merge(raw, read_yaml(path))
    return raw


def build_spec(args, output: Path | None = None) -> Sweep:
    """Everything that defines the sweep, resolved and validated, to be saved as OUTPUT/sweep.json; without
    `output` (--estimate) no ledger."""
    from diffmem.data import load_dataset   # torch: not imported by --status and --help
    raw = read_with_preset(args.config, args.preset)
    sweep = dict(raw.get("sweep") or {})
    unknown = set(sweep) - {"size_range", "size_step", "factors", "max_values", "pack_size"}
    if unknown:
        raise ConfigError(f"unknown key 'sweep.{sorted(unknown)[0]}'; sweep takes size_range, size_step, "
                          f"factors, max_values, pack_size")
    where = f"in {args.config}" + (f" with --preset {args.preset}" if args.preset else "")
    step = _sweep_int(sweep, "size_step", where)
    max_values = _sweep_int(sweep, "max_values", where)
    pack_size = args.pack_size if args.pack_size is not None else _sweep_int(sweep, "pack_size", where)
    # The numbers of the command line, before anything is loaded.
    if not 0 < args.epsilon < 1:
        raise ConfigError(f"--epsilon {args.epsilon} must be in (0, 1): memorized iff best ratio >= 1 - epsilon "
                          f"(default 0.1)")
    if not 0 < args.tolerance < math.inf:
        raise ConfigError(f"--tolerance {args.tolerance} must be a finite number > 0: a bracket closes at high/low "
                          f"<= 1 + tolerance (default 0.1)")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {args.max_concurrent} must be >= 1 (trainings at once; leave it out "
                          f"for what the machine holds)")
    if args.workers_per_trial < 1 or args.gpus_per_trial < 0 or args.max_failures < 0:
        raise ConfigError("--workers-per-trial must be >= 1, --gpus-per-trial >= 0 and --max-failures >= 0")
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds} must be >= 1 (training seeds per grid point, default 1)")
    if pack_size < 1:
        raise ConfigError(f"--pack-size {pack_size} must be >= 1 (trainings packed per worker; 1: one at a time)")
    if pack_size > 1 and (args.gpus_per_trial > 1 or args.workers_per_trial > 1):
        raise ConfigError(f"--pack-size {pack_size} packs trainings of one worker each; drop --workers-per-trial/"
                          f"--gpus-per-trial above 1 (DDP), or pack one training per worker (--pack-size 1)")
    if pack_size > 1 and args.address:
        raise ConfigError(f"--pack-size {pack_size} runs on a local sweep for now (its pack servers start with the "
                          f"local Ray); on a cluster, leave it out")
    overrides = dict(parse_override(o) for o in args.overrides)
    if args.seed is not None:
        overrides["train.seed"] = args.seed
    base_cfg = from_dict(apply_overrides(raw, overrides))       # the config itself loads
    if base_cfg.train.seed + args.seeds - 1 > SEED_MAX:
        raise ConfigError(f"--seeds {args.seeds} from train.seed={base_cfg.train.seed} goes past the largest seed "
                          f"2**63 - 1; use a smaller --seed")
    if base_cfg.train.device == "cuda" and not args.gpus_per_trial:
        raise ConfigError("train.device=cuda needs --gpus-per-trial N: a trial trains only on the GPUs it reserves "
                          "(or use train.device=auto)")
    if not args.address and not args.estimate:   # a local cluster is this machine
        check_machine(base_cfg)
    for key in ("path", "mix_path"):   # trials run in their own working directories
        if getattr(base_cfg.data, key):
            setattr(base_cfg.data, key, str(Path(getattr(base_cfg.data, key)).expanduser().resolve()))
    base = base_cfg.to_dict()

    factor = get_factor(args.factor)
    values = [parse_value(v, "--values") for v in args.values] if args.values else \
        list((sweep.get("factors") or {}).get(factor.name) or factor.paper_values)
    if max_values and not args.values and len(values) > max_values:
        k = max_values   # spread over the list, first and last included
        values = [values[round(i * (len(values) - 1) / max(k - 1, 1))] for i in range(k)]
    points = grid_points(factor, values, base_cfg)

    # Every grid point's config loads and its dataset exists; sizes must fit the smallest of them.
    available, resolved = [], {}
    source = "--values" if args.values else f"the {factor.name} values {where}"
    for point in points:
        cfg = from_dict(apply_overrides(base, point["overrides"]))
        dataset = load_dataset(cfg.data)
        validate_with_data(cfg, dataset.images.shape[-1], len(dataset.labels), dataset.name)
        available.append(len(dataset.labels))
        key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
        twins = ([resolved[key]] if key in resolved else []) + [v for v in resolved.values()
                                                                if _same_number(v, point["value"])]
        if twins:
            twin = twins[0]
            raise ConfigError(f"{source} {twin!r} and {point['value']!r} are the same {factor.name}; give each value "
                              f"once")
        resolved[key] = point["value"]
    max_size = min(available)
    if is_curve(factor.name):
        size_range = curve.size_range(values, max_size, step, args.seeds)
    else:
        size_range = search_size_range(args.size_range, sweep.get("size_range"), where, max_size, step)
    workers = args.gpus_per_trial or args.workers_per_trial
    if base_cfg.train.batch_size % workers:
        raise ConfigError(f"train.batch_size={base_cfg.train.batch_size} must be divisible by the {workers} "
                          f"workers per trial")
    if not args.address and not args.estimate:   # a local cluster must hold one training
        check_local_capacity(args.gpus_per_trial, args.workers_per_trial)
    from sweeps.folder import check_storage
    return Sweep(factor=factor.name, values=values, grid_points=points, base=base, config_file=str(args.config),
                 preset=args.preset, epsilon=args.epsilon, tolerance=args.tolerance, size_range=size_range,
                 allowed_sizes=list(range(step, max_size + 1, step)), workers=workers,
                 gpus_per_worker=1 if args.gpus_per_trial else 0,
                 ddp=args.gpus_per_trial > 0 or args.workers_per_trial > 1, max_failures=args.max_failures,
                 max_concurrent=args.max_concurrent, seeds=args.seeds, pack_size=pack_size,
                 tracking={"wandb": args.wandb, "mlflow": args.mlflow},
                 storage=check_storage(args.storage, pack_size),
                 ledger=None if output is None else
                 str(Path(args.ledger or SweepFolder(output).ledger).expanduser().resolve()),
                 no_reuse=args.no_reuse,
                 output=None if output is None else str(output.resolve()))   # where it was made


def search_size_range(given: list | None, configured, where: str, max_size: int, step: int) -> list[int]:
    """The |D| range an EMM search brackets in: --size-range, else the config's sweep.size_range, else all the
    dataset holds from one size step; one line if it cannot be searched."""
    size_range = given or configured or [step, max_size]
    size_range = list(size_range) if isinstance(size_range, (list, tuple)) else [size_range]
    if len(size_range) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size_range):
        raise ConfigError(f"sweep.size_range {size_range} {where} must be two integers [LO, HI]")
    lo, hi = size_range
    shown = f"sweep.size_range [{lo}, {hi}] {where}" if not given and configured else f"--size-range {lo} {hi}"
    if not 1 <= lo < hi:
        raise ConfigError(f"{shown} is impossible; give LO < HI, both >= 1")
    if hi > max_size:
        raise ConfigError(f"{shown} goes past the {max_size} images available; use HI <= {max_size}")
    if lo < step:
        raise ConfigError(f"{shown} starts below the size step {step} (class-balanced subsets); "
                          f"use LO >= {step}")
    return size_range


def _sweep_int(sweep: dict, key: str, where: str) -> int | None:
    """sweep.size_step or sweep.pack_size (default 1), or sweep.max_values (default none) of the config: an
    integer >= 1."""
    value = sweep.get(key, None if key == "max_values" else 1)
    if value is None and key == "max_values":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        what = {"size_step": "the |D| grid's spacing, e.g. the number of classes",
                "max_values": "how many of the factor's values to sweep",
                "pack_size": "trainings packed per worker"}[key]
        raise ConfigError(f"sweep.{key}={value!r} {where} must be an integer >= 1 ({what})")
    return value


def _same_number(a, b) -> bool:
    """8 and 8.0: one number in two spellings (True and 1 are not numbers here)."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return numbers and a == b


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---- a folder that holds a sweep: new, resumed, moved ----

def check_new_output(output: Path) -> None:
    """A new sweep writes only into a folder that does not exist yet or is empty: never among files it did not
    write. A folder a sweep wrote (its sweep.json, read_spec) is continued with --resume, not overwritten."""
    if not output.exists() and not output.is_symlink():
        return
    if not output.is_dir():
        raise ConfigError(f"--output {output} is a file, not a folder; choose a folder that does not exist yet")
    if SweepFolder(output).spec.exists():
        try:
            read_spec(output)
        except ConfigError as e:
            if "was not written by" in str(e):
                raise ConfigError(f"--output {output} holds a {SPEC_FILE} that diffmem did not write; choose a "
                                  f"folder that does not exist yet") from None
        raise ConfigError(f"{output} already holds a sweep; continue it with --resume {output} "
                          f"or choose another --output")
    try:
        entries = sorted(p.name for p in output.iterdir())
    except OSError as e:
        raise ConfigError(f"--output {output} cannot be read ({e.strerror}); choose a folder that does not exist "
                          f"yet") from None
    if entries:
        more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
        raise ConfigError(f"--output {output} already exists and was not written by diffmem (it holds "
                          f"{entries[0]}{more}); choose a folder that does not exist yet, or an empty one")


# What --resume would silently drop: the sweep's own settings (sweep.json) are what it continues with.
# --address and --no-dashboard only say how Ray starts. --max-concurrent is not honoured either: Tune restores
# its TuneConfig (max_concurrent_trials) and the searcher from the experiment's own files.
RESUME_FIXED = {"factor": "--factor", "values": "--values", "config": "--config", "preset": "--preset",
                "overrides": "--set", "seed": "--seed", "epsilon": "--epsilon", "tolerance": "--tolerance",
                "size_range": "--size-range", "max_concurrent": "--max-concurrent",
                "workers_per_trial": "--workers-per-trial", "gpus_per_trial": "--gpus-per-trial",
                "max_failures": "--max-failures", "ledger": "--ledger", "no_reuse": "--no-reuse",
                "output": "--output", "seeds": "--seeds", "pack_size": "--pack-size", "wandb": "--wandb",
                "mlflow": "--mlflow", "storage": "--storage"}


def check_resume_flags(output: Path, spec: Sweep, given: set[str]) -> None:
    """--resume continues a sweep as it was started: a flag that would change it is refused, with the sweep's value."""
    own = {"factor": spec.factor, "values": spec.values, "config": spec.config_file,
           "preset": spec.preset, "overrides": "its config in sweep.json 'base'",
           "seed": f"train.seed {spec.base.get('train', {}).get('seed')}", "epsilon": spec.epsilon,
           "tolerance": spec.tolerance, "size_range": spec.size_range,
           "max_concurrent": spec.max_concurrent or "what the machine holds",
           "workers_per_trial": spec.workers if not spec.gpus_per_worker else 1,
           "gpus_per_trial": spec.workers * spec.gpus_per_worker, "max_failures": spec.max_failures,
           "ledger": spec.ledger, "no_reuse": spec.no_reuse, "output": str(output), "seeds": spec.seeds,
           "pack_size": spec.pack_size, "storage": spec.storage or "none",
           **{k: v or "none" for k, v in spec.tracking.items()}}
    flags = [dest for dest in RESUME_FIXED if dest in given]
    if flags:
        said = ", ".join(f"{RESUME_FIXED[d]} (the sweep's: {own[d]})" for d in flags)
        raise ConfigError(f"--resume {output} continues that sweep with its own settings; drop {said}, or start a "
                          f"new sweep in another --output")


def moved_here(output: Path, spec: Sweep) -> None:
    """A sweep folder resumed somewhere else than where it was made (moved or copied off a scratch disk): what lies
    inside it (its own ledger) is read here, a shared --ledger outside stays where it is, and sweep.json says so.
    Tune follows by itself (it restores from the path given), the searcher's ledger lookup in EMMSearcher.restore
    and the TensorBoard summary from the trials (sweeps/progress.py)."""
    from sweeps.trainable import relocated
    here, made = str(output.resolve()), spec.output
    if made is None or made == here:   # a sweep.json from before this key: taken to be where it was made
        return
    spec.ledger, spec.output = relocated(spec.ledger, made, here), here
    write_spec(output, spec)
    print(f"sweep folder moved from {made}: resuming it here")

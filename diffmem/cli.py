"""The shared command line of `python -m diffmem.train` and `python -m diffmem.optimum`.

Bad input (unknown key, missing file, size larger than the dataset, NaN loss) ends with one line on stderr
that names the fix and a non-zero exit; the run folder keeps whatever was already measured.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

CHECKOUT = Path(__file__).resolve().parent.parent   # the checkout diffmem is installed from (pip install -e .)
DEFAULT_CONFIG = str(CHECKOUT / "experiments" / "digits.yaml")   # the embedded default, wherever the shell is


def default_folder(kind: str, name: str, stamp: bool = True) -> Path:
    """Where a command writes without --output: <checkout>/<kind>/<name>-<time> (kind: runs, results), so the
    output does not depend on the shell's folder; stamp=False for a folder the same command continues."""
    return CHECKOUT / kind / (f"{name}-{time.strftime('%Y%m%d-%H%M%S')}" if stamp else name)


def version() -> str:
    """diffmem's version, from the installed package's metadata (pyproject.toml is its one home)."""
    from importlib.metadata import PackageNotFoundError, version as installed
    try:
        return f"diffmem {installed('diffmem')}"
    except PackageNotFoundError:
        return "diffmem (not installed: pip install -e . in the checkout)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its own errors (a bad or missing flag) as one line naming the flag and --help, exit 2,
    instead of the usage block; every command has --version."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)   # docstring examples as written
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=version())

    def error(self, message):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default experiments/digits.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.channels=64 (repeatable)")


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def run_cli(prog: str, description: str, run, argv=None, dry_run=None) -> int:
    """Load and check the config, then run(cfg, run_dir, writer) in a run folder; with dry_run(cfg, data) given,
    --dry-run prints what it returns instead and writes nothing."""
    from diffmem.config import ConfigError, check_machine, load_config, validate_with_data
    from diffmem.data import load_dataset, training_set
    from diffmem.train import TrainingDiverged

    parser = ArgumentParser(prog=f"python -m {prog}", description=description)
    add_config_arguments(parser)
    parser.add_argument("--output", help="run folder (default runs/<name>-<time> in the checkout); an existing one "
                        "is resumed")
    if dry_run is not None:
        parser.add_argument("--dry-run", action="store_true",
                            help="print the resolved config and the schedule the training would follow, then exit")
    args = parser.parse_args(argv)
    dry = getattr(args, "dry_run", False)   # diffmem.optimum has no --dry-run
    try:
        cfg = load_config(args.config, args.overrides)
        dataset = load_dataset(cfg.data)
        data = training_set(cfg.data, dataset)   # a missing dataset or impossible size fails now, before any work
        validate_with_data(cfg, dataset.images.shape[-1], len(dataset.labels), dataset.name)
        if not dry:
            check_machine(cfg)
    except ConfigError as e:
        return fail(str(e))
    if dry:
        print(dry_run(cfg, data))
        return 0
    run_dir = Path(args.output) if args.output else default_folder("runs", prog.split(".")[-1])
    config_file = run_dir / "config.yaml"
    resolved = yaml.safe_dump(cfg.to_dict(), sort_keys=True)
    if config_file.exists() and config_file.read_text() != resolved:
        return fail(f"run folder {run_dir} holds a run of a different config; choose another --output")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_file.write_text(resolved)
    except OSError as e:
        return fail(f"--output {run_dir} cannot be written ({e.strerror}); choose a folder you can write")
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(run_dir)) as writer:
        try:
            return run(cfg, run_dir, writer)
        except TrainingDiverged as e:
            return fail(str(e), code=1)

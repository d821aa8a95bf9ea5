"""Every bad input is one line on stderr naming the fix, exit 2, no traceback, nothing written and no Ray started
(issues 17 and 18): impossible config values, flags a --resume would drop, unwritable folders and ledgers, broken
sweep.json files, argparse's own errors. And a local sweep's Ray listens on the loopback interface only."""
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffmem.train
import sweeps.emm_search as emm_search
import sweeps.explore as explore
import sweeps.report as report
from diffmem.config import ConfigError, load_config
from diffmem.networks import SongUNet
from sweeps.spec import read_spec, write_spec

ROOT = Path(__file__).resolve().parent.parent
DIGITS = str(ROOT / "experiments" / "digits.yaml")
HAS_GPU = torch.cuda.is_available()


# ---- what a case sets up in its own tmp folder: returns the argv ------------------------------------------------

def _file(name, text):
    def setup(tmp):
        (tmp / name).write_text(text)
        return ["--config", str(tmp / name)]
    return setup


def _sweep_yaml(sweep: str):
    """digits.yaml with its sweep section replaced."""
    def setup(tmp):
        text = Path(DIGITS).read_text().split("\n# Read by sweeps/emm_search.py")[0]
        (tmp / "c.yaml").write_text(text + "\nsweep:\n" + sweep + "\n")
        return ["--config", str(tmp / "c.yaml")]
    return setup


def _sweep_folder(tmp) -> Path:
    """A sweep folder as a new sweep leaves it before Ray starts (sweep.json, ledger, tune/)."""
    from sweeps.ledger import Ledger
    spec = emm_search.build_spec(emm_search.parse_args(["--preset", "smoke"]), tmp / "s")
    write_spec(tmp / "s", spec)
    Ledger(spec.ledger)
    (tmp / "s" / "tune").mkdir()
    return tmp / "s"


def _resume(*flags):
    def setup(tmp):
        return ["--resume", str(_sweep_folder(tmp)), *flags]
    return setup


def _spec(text: str, flag="--status"):
    def setup(tmp):
        (tmp / "s").mkdir()
        (tmp / "s" / "sweep.json").write_text(text)
        return [flag, str(tmp / "s")] if flag else [str(tmp / "s")]
    return setup


def _damaged_spec(**change):
    def setup(tmp):
        folder = _sweep_folder(tmp)
        spec = json.loads((folder / "sweep.json").read_text())
        for key, value in change.items():
            if value is KeyError:
                del spec[key]
            else:
                spec[key] = value
        (folder / "sweep.json").write_text(json.dumps(spec))
        return ["--status", str(folder)]
    return setup


def _read_only(path: Path) -> None:
    """Make path read-only even for root (chattr +i), or skip the case."""
    if os.geteuid() != 0:
        path.chmod(0o555 if path.is_dir() else 0o444)
        return
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("cannot make a path read-only for root here (chattr)")


def _writable_again(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        if os.geteuid() == 0 and shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(p)], capture_output=True)
        else:
            p.chmod(0o755 if p.is_dir() else 0o644)


def _read_only_output(tmp):
    (tmp / "ro").mkdir()
    _read_only(tmp / "ro")
    return ["--output", str(tmp / "ro" / "out")]


def _read_only_empty_output(tmp):
    (tmp / "empty").mkdir()
    _read_only(tmp / "empty")
    return ["--output", str(tmp / "empty")]


def _output_is_a_file(tmp):
    (tmp / "notes.txt").write_text("x")
    return ["--output", str(tmp / "notes.txt")]


def _output_under_a_file(tmp):
    (tmp / "notes.txt").write_text("x")
    return ["--output", str(tmp / "notes.txt" / "out")]


def _ledger_is_a_folder(tmp):
    (tmp / "ledgers").mkdir()
    return ["--ledger", str(tmp / "ledgers")]


def _read_only_ledger(tmp):
    from sweeps.ledger import Ledger
    (tmp / "l").mkdir()
    Ledger(tmp / "l" / "ledger.sqlite")
    _read_only(tmp / "l" / "ledger.sqlite")
    return ["--ledger", str(tmp / "l" / "ledger.sqlite")]


def _read_only_version_3_ledger(tmp):
    import sqlite3

    from sweeps.ledger import Ledger
    (tmp / "l").mkdir()
    Ledger(tmp / "l" / "ledger.sqlite")
    with sqlite3.connect(tmp / "l" / "ledger.sqlite") as db:   # as the version 3 code wrote it
        db.execute("ALTER TABLE trainings RENAME COLUMN step_seconds TO train_seconds")
        db.execute("UPDATE meta SET value = '3' WHERE name = 'version'")
    _read_only(tmp / "l" / "ledger.sqlite")
    return ["--ledger", str(tmp / "l" / "ledger.sqlite")]


def _ledger_in_read_only_folder(tmp):
    (tmp / "ro").mkdir()
    _read_only(tmp / "ro")
    return ["--ledger", str(tmp / "ro" / "ledger.sqlite")]


def _run_folder_is_a_file(tmp):
    (tmp / "run").write_text("x")
    return ["--config", DIGITS, "--output", str(tmp / "run")]


def _train(*flags):
    return lambda tmp: ["--config", DIGITS, "--output", str(tmp / "run"), *flags]


P = r"\S+"   # a path
RESUME = rf"--resume {P} continues that sweep with its own settings; drop "
CASES = {
    # -- impossible config values (diffmem/config.py validate, one line naming key, value and what is allowed)
    "model.channels=1": (["--set", "model.channels=1"], r"model.channels=1 is too small: GroupNorm needs at least 4 "
                         r"channels per group .*; use model.channels>=4"),
    "model.channels=6 (18-channel layer)": (["--set", "model.channels=6"], r"model.channels=6 with model.channel_mult="
                                            r"\[1, 2\] gives a layer of 18 channels that GroupNorm cannot split into "
                                            r"min\(32, 18 // 4\) = 4 equal groups; use model.channels=4 or 8"),
    "model.channels=136 (32 groups)": (["--set", "model.channels=136"], r"model.channels=136 .* 32 equal groups; use "
                                       r"model.channels=128 or 160"),
    "data.seed=-1": (["--set", "data.seed=-1"], r"data.seed=-1 must be an integer in \[0, 2\*\*63 - 1\], or null"),
    "--seed -1": (["--seed", "-1"], r"train.seed=-1 must be an integer in \[0, 2\*\*63 - 1\]"),
    "train.lr=nan": (["--set", "train.lr=nan"], r"train.lr=nan must be a finite number > 0"),
    "train.lr=inf": (["--set", "train.lr=inf"], r"train.lr=inf must be a finite number > 0"),
    "train.weight_decay=nan": (["--set", "train.weight_decay=.nan"],
                               r"train.weight_decay=nan must be a finite number >= 0"),
    "train.ema_rampup=-1": (["--set", "train.ema_rampup=-1"], r"train.ema_rampup=-1.0 must be a positive share"),
    "train.ema_rampup=nan": (["--set", "train.ema_rampup=nan"], r"train.ema_rampup=nan must be a finite number > 0"),
    "eval.sigma_max=inf": (["--set", "eval.sigma_max=inf"], r"eval.sigma_max=inf must be a finite number > "
                           r"eval.sigma_min"),
    "eval.rho=-1": (["--set", "eval.rho=-1"], r"eval.rho=-1.0 must be > 0 \(EDM: 7\)"),
    "eval.rho=nan": (["--set", "eval.rho=nan"], r"eval.rho=nan must be a finite number > 0"),
    "eval.threshold=nan": (["--set", "eval.threshold=nan"], r"eval.threshold=nan must be a finite number in \(0, 1\]"),
    "--address 127.0.0.1:1": (["--address", "127.0.0.1:1"], r"no Ray cluster answers at --address 127.0.0.1:1 "
                              r"\(Connection refused\); start one there with `ray start --head --port=1`"),
    "--address host only": (["--address", "nohost"], r"--address nohost is not host:port"),
    "--workers-per-trial > CPUs": (["--workers-per-trial", str(2 * (os.cpu_count() or 1))],
                                   r"--workers-per-trial \d+ needs \d+ CPUs per training but this machine has \d+"),
    "eval.adaptive_error=0.5": (["--set", "eval.adaptive_error=0.5"], r"eval.adaptive_error=0.5 must be in \(0, 0.5\)"),
    "eval.adaptive_error=0": (["--set", "eval.adaptive_error=0"], r"eval.adaptive_error=0.0 must be in \(0, 0.5\)"),
    "model.dropout=inf": (["--set", "model.dropout=inf"], r"model.dropout=inf must be a finite number in \[0, 1\)"),
    "train.duration=1e400ep": (["--set", "train.duration=1e400ep"], r"train.duration='1e400ep' is not a duration"),
    "channel_mult deeper than 8x8": (["--set", "model.channel_mult=[1,1,1,1]"], r"model.channel_mult=\[1, 1, 1, 1\] "
                                     r"has 4 levels, too deep for the 8x8 images of digits: .*; use at most 3 levels"),
    "data.label_classes > images": (["--set", "data.labels=random", "--set", "data.label_classes=5000",
                                     "--factor", "width", "--values", "16"],
                                    r"data.label_classes=5000 is more than the 1797 images of digits: .*use "
                                    r"data.label_classes<=1797, or data.labels=unique"),
    "random_labels value > images": (["--values", "5000"], r"data.label_classes=5000 is more than the 1797 images"),
    "train.device=cuda, no --gpus-per-trial": (["--set", "train.device=cuda"], r"train.device=cuda needs "
                                               r"--gpus-per-trial N"),
    "empty config file": (_file("empty.yaml", ""), rf"config file '{P}' is empty, which would mean the paper's full "
                          r"setup \(40,000 epochs per training\)"),
    "config of comments only": (_file("c.yaml", "# nothing yet\n"), r"config file '\S+' is empty"),
    "config is a directory": (lambda tmp: ["--config", str(tmp)],
                              r"config file '\S+' is a directory; pass a YAML file"),
    "config YAML syntax error": (_file("bad.yaml", "data: [1,\n"), r"config file '\S+' line \d+ is not valid YAML"),
    # -- the command line's numbers and values
    "--factor widht": (["--factor", "widht"], r"unknown factor 'widht'; did you mean 'width'\?"),
    "--values ten": (["--values", "ten"], r"random_labels value 'ten' must be a number of classes C >= 1"),
    "--size-range past the data": (["--size-range", "10", "5000"], r"--size-range 10 5000 goes past the 1797 images "
                                   r"available"),
    "--size-range 300 30": (["--size-range", "300", "30"], r"--size-range 300 30 is impossible"),
    "--set key typo": (["--set", "model.chanels=4"], r"unknown config key 'model.chanels'; did you mean "
                       r"'model.channels'\?"),
    "--set a retired key": (["--set", "train.checkpoint_every=5ep"], r"train.checkpoint_every in --set is no longer "
                            r"a setting \(a checkpoint is saved at every eval.every snapshot\); delete it"),
    "--config missing": (["--config", "experiments/nope.yaml"], r"config file 'experiments/nope.yaml' does not exist"),
    "--preset smok": (["--preset", "smok"], r"unknown preset 'smok'; available: smoke"),
    "--resume not a sweep": (["--resume", "."], r"\. is not a sweep folder"),
    "--estimate --size-range 300 30": (["--estimate", "--size-range", "300", "30"],
                                       r"--size-range 300 30 is impossible; give LO < HI, both >= 1"),
    "--estimate --resume": (lambda tmp: ["--estimate", "--resume", str(tmp)], r"--estimate prices a new sweep; for one "
                            r"under way, --status DIR"),
    "--tolerance nan": (["--tolerance", "nan"], r"--tolerance nan must be a finite number > 0"),
    "--tolerance inf": (["--tolerance", "inf"], r"--tolerance inf must be a finite number > 0"),
    "--epsilon nan": (["--epsilon", "nan"], r"--epsilon nan must be in \(0, 1\)"),
    "--max-concurrent 0": (["--max-concurrent", "0"], r"--max-concurrent 0 must be >= 1"),
    "--max-concurrent -2": (["--max-concurrent", "-2"], r"--max-concurrent -2 must be >= 1"),
    "--seeds 0": (["--seeds", "0"], r"--seeds 0 must be >= 1 \(training seeds per grid point, default 1\)"),
    "--pack-size 0": (["--pack-size", "0"], r"--pack-size 0 must be >= 1 \(trainings packed per worker"),
    "--pack-size with DDP": (["--pack-size", "2", "--workers-per-trial", "2"], r"--pack-size 2 packs trainings of "
                             r"one worker each; drop --workers-per-trial/--gpus-per-trial above 1"),
    "--storage a relative path": (["--storage", "shared/sweeps"], r"--storage 'shared/sweeps' is not a URI; give one "
                                  r"every node reaches, e\.g\. s3://bucket/sweeps"),
    "--storage unknown scheme": (["--storage", "s4://bucket/x"], r"--storage s4://bucket/x: pyarrow cannot open it "
                                 r"\(.*\); give a URI of s3://, gs://, abfs://, hdfs:// or file://"),
    "--storage with packs": (["--storage", "file:///tmp/bucket", "--pack-size", "2"], r"--pack-size > 1 needs the "
                             r"sweep folder on storage every node shares; drop --storage, or --pack-size"),
    "sweep.pack_size: two": (_sweep_yaml("  pack_size: two"), r"sweep.pack_size='two' in \S+ must be an integer "
                             r">= 1 \(trainings packed per worker\)"),
    "--seeds -3": (["--seeds", "-3"], r"--seeds -3 must be >= 1"),
    "--seeds past the largest seed": (["--seed", str(2 ** 63 - 2), "--seeds", "3"], r"--seeds 3 from "
                                      r"train.seed=9223372036854775806 goes past the largest seed 2\*\*63 - 1"),
    "--seeds 2 with data_size": (["--factor", "data_size", "--values", "20", "--seeds", "2"],
                                 r"--seeds applies to the EMM search; data_size trains each size once"),
    "data_size below the size step": (["--factor", "data_size", "--values", "5", "20"],
                                      r"data_size value 5 is below the size step 10 \(class-balanced subsets\); use "
                                      r"sizes >= 10"),
    "--values 8 8.0": (["--factor", "width", "--values", "8", "8.0"], r"--values 8 and 8.0 are the same width; give "
                       r"each value once"),
    "--values all 1111 (same mask)": (["--factor", "skip_connections", "--values", "all", "1111"],
                                      r"--values 'all' and 1111 are the same skip_connections"),
    "--set YAML syntax error": (["--set", "model.channel_mult=[1,2"], r"the value of override model.channel_mult= "
                                r"'\[1,2' is not valid YAML"),
    "--values YAML syntax error": (["--factor", "width", "--values", "[8"], r"--values '\[8' is not valid YAML"),
    "sweep.size_step: 0": (_sweep_yaml("  size_step: 0"), r"sweep.size_step=0 in \S+ must be an integer >= 1"),
    "sweep.max_values: x": (_sweep_yaml("  max_values: x"), r"sweep.max_values='x' in \S+ must be an integer >= 1"),
    "sweep.size_range: [10]": (_sweep_yaml("  size_range: [10]"), r"sweep.size_range \[10\] in \S+ must be two "
                               r"integers"),
    "sweep.size_range past the data": (_sweep_yaml("  size_range: [10, 5000]"), r"sweep.size_range \[10, 5000\] in "
                                       r"\S+ goes past the 1797 images"),
    # -- argparse's own errors: one line naming the flag and --help
    "--size-range 10.5 80": (["--size-range", "10.5", "80"], r"argument --size-range: invalid int value: '10.5'; see "
                             r"emm_search.py --help"),
    "unknown flag": (["--epsilom", "0.1"], r"unrecognized arguments: --epsilom 0.1; see emm_search.py --help"),
    # -- folders and ledgers
    "--output is a file": (_output_is_a_file, r"--output \S+ is a file, not a folder"),
    "--output under a file": (_output_under_a_file, r"--output \S+ cannot be created or written \(Not a directory\)"),
    "--output under /proc": (lambda tmp: ["--output", "/proc/diffmem-test/out"], r"--output /proc/diffmem-test/out "
                             r"cannot be created or written"),
    "--output in a read-only folder": (_read_only_output, r"--output \S+ cannot be created or written"),
    "--output an empty read-only folder": (_read_only_empty_output, r"--output \S+ cannot be created or written"),
    "--ledger is a folder": (_ledger_is_a_folder, r"ledger \S+ is a folder, not a ledger file"),
    "--ledger read-only": (_read_only_ledger, r"ledger \S+ is read-only, and a sweep records every training in it"),
    "--ledger version 3, read-only": (_read_only_version_3_ledger, r"ledger \S+ has format version 3, which this "
                                      r"code upgrades in place .*, but cannot write it \(SQLite: .*\); make it "
                                      r"writable once, or pass a --ledger path where no file exists"),
    "--ledger in a read-only folder": (_ledger_in_read_only_folder, r"ledger \S+ is in a read-only folder"),
    "--ledger under /proc": (lambda tmp: ["--ledger", "/proc/diffmem-ledger.sqlite"],
                             r"ledger /proc/diffmem-ledger.sqlite (cannot be created|is in a read-only folder)"),
    # -- --resume with flags it would drop
    "--resume --factor": (_resume("--factor", "width"), RESUME + r"--factor \(the sweep's: random_labels\), or start"),
    "--resume --values": (_resume("--values", "1", "4"), RESUME + r"--values \(the sweep's: \['none', 'unique'\]\)"),
    "--resume --epsilon --config": (_resume("--epsilon", "0.2", "--config", DIGITS),
                                    RESUME + r"--config \(the sweep's: \S+digits.yaml\), "
                                    r"--epsilon \(the sweep's: 0.1\)"),
    "--resume --set": (_resume("--set", "model.channels=8"), RESUME + r"--set \(the sweep's: its config in sweep.json"),
    "--resume --max-concurrent": (_resume("--max-concurrent", "3"), RESUME + r"--max-concurrent \(the sweep's: what "
                                  r"the machine holds\)"),
    "--resume --seeds": (_resume("--seeds", "3"), RESUME + r"--seeds \(the sweep's: 1\), or start"),
    # -- sweep.json that is garbage or incomplete, to --status and to report.py
    "--status: garbage sweep.json": (_spec("{not json"), r"\S+sweep.json was not written by diffmem's emm_search "
                                     r"\(unreadable: JSONDecodeError\); pass the --output folder of a sweep"),
    "--status: sweep.json a list": (_spec("[1, 2]"), r"\S+sweep.json was not written by diffmem's emm_search"),
    "--status: sweep.json incomplete": (_damaged_spec(values=KeyError), r"\S+sweep.json is incomplete \(no 'values'\); "
                                        r"it cannot be read"),
    "--status: sweep.json damaged": (_damaged_spec(epsilon="x"), r"\S+sweep.json is damaged \('epsilon' is \"x\"\)"),
    "--status: sweep.json seeds 0": (_damaged_spec(seeds=0), r"\S+sweep.json is damaged \('seeds' is 0\)"),
    "--status: sweep.json storage a path": (_damaged_spec(storage="/shared"),
                                            r"\S+sweep.json is damaged \('storage' is \"/shared\"\)"),
}
TRAIN_CASES = {   # python -m diffmem.train (diffmem/cli.py)
    "train: model.channels=1": (_train("--set", "model.channels=1"), r"model.channels=1 is too small"),
    "train: channel_mult too deep": (_train("--set", "model.channel_mult=[1,1,1,1]"), r"model.channel_mult=\[1, 1, 1, "
                                     r"1\] has 4 levels, too deep for the 8x8 images of digits"),
    "train: label_classes > images": (_train("--set", "data.labels=random", "--set", "data.label_classes=1798"),
                                      r"data.label_classes=1798 is more than the 1797 images of digits"),
    "train: --set YAML syntax error": (_train("--set", "model.channels=[1"), r"the value of override model.channels= "
                                       r"'\[1' is not valid YAML"),
    "train: --output is a file": (_run_folder_is_a_file, r"--output \S+ cannot be written"),
    "train: argparse": (_train("--sett", "x"), r"unrecognized arguments: --sett x; see python -m diffmem.train --help"),
    "train: a retired key in the config": (lambda tmp: _file("old.yaml", "train:\n  checkpoint_every: 100ep\n")(tmp)
                                           + ["--output", str(tmp / "run")],
                                           r"train.checkpoint_every in config file '\S+' is no longer a setting"),
    "train: unknown dataset": (_train("--set", "data.dataset=mnist"), r"unknown dataset 'mnist'; available: digits"),
    "train: data.size past the data": (_train("--set", "data.size=5000"), r"data.size=5000 is larger than the 1797 "
                                       r"images of digits; use data.size<=1797"),
    "train: skip_connections length": (_train("--set", "model.skip_connections=[1,0]"),
                                       r"model.skip_connections has 2 entries, expected 4"),
    "train: empty config": (lambda tmp: _file("e.yaml", "")(tmp) + ["--output", str(tmp / "run")],
                            r"config file '\S+' is empty"),
}
if not HAS_GPU:
    CASES["--gpus-per-trial without a GPU"] = (["--gpus-per-trial", "1"],
                                                r"--gpus-per-trial 1 but this machine has 0 GPUs; "
                                                r"leave --gpus-per-trial out")
    CASES["train.device=cuda without a GPU"] = (["--set", "train.device=cuda", "--gpus-per-trial", "1"],
                                                r"train.device=cuda but this machine has no GPU .*; "
                                                r"use train.device=auto")
    TRAIN_CASES["train: train.device=cuda without a GPU"] = (_train("--set", "train.device=cuda"),
                                                             r"train.device=cuda but this machine has no GPU")
REPORT_CASES = {   # sweeps/report.py, sweeps/explore.py
    "report: garbage sweep.json": (_spec("{not json", flag=None), r"\S+sweep.json was not written by diffmem's "
                                   r"emm_search \(unreadable: JSONDecodeError\)"),
    "report: no folder given": (lambda tmp: [], r"the following arguments are required: OUTPUT; see report.py --help"),
    "explore: argparse": (lambda tmp: ["--size", "x"],
                          r"argument --size: invalid int value: 'x'; see explore.py --help"),
}
MAINS = {"search": emm_search.main, "train": diffmem.train.main, "report": report.main, "explore": explore.main}


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _refused(main, argv, tmp_path, monkeypatch, capsys) -> str:
    """main(argv): exit 2, one line on stderr, no traceback, nothing written under tmp_path, Ray never started."""
    import ray
    monkeypatch.setattr(emm_search, "start_ray", lambda *a: pytest.fail("Ray would start"))
    monkeypatch.chdir(tmp_path)   # a default results/ or runs/ folder would land here
    before = _snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:       # argparse's errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert _snapshot(tmp_path) == before
    assert not ray.is_initialized()
    return err


@pytest.mark.parametrize("entry, case", [("search", c) for c in CASES] + [("train", c) for c in TRAIN_CASES]
                         + [(c.split(":")[0], c) for c in REPORT_CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(entry, case, tmp_path, monkeypatch, capsys):
    setup, message = {**CASES, **TRAIN_CASES, **REPORT_CASES}[case]
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    try:
        argv = setup(sandbox) if callable(setup) else list(setup)
        if entry == "search" and not {"--output", "--resume", "--status"} & set(argv):
            argv += ["--output", str(sandbox / "out")]
        err = _refused(MAINS[entry], argv + (["--no-dashboard"] if entry == "search" else []), sandbox,
                       monkeypatch, capsys)
    finally:
        _writable_again(sandbox)
    assert re.fullmatch(f"error: {message}.*\n", err), err


def test_address_auto_is_resolved_as_ray_resolves_it_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """--address auto reads RAY_ADDRESS first (Ray 2.60's own resolution); a cluster that does not answer there is
    one line, before the output folder exists, in seconds rather than ray.init's minutes of retries."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    err = _refused(emm_search.main, ["--address", "auto", "--preset", "smoke", "--output", str(tmp_path / "out")],
                   tmp_path, monkeypatch, capsys)
    # Ray resolves 127.0.0.1 to the node's address (services.resolve_ip_for_localhost)
    assert re.match(r"error: no Ray cluster answers at --address auto = [\d.]+:1 \(Connection refused\)", err), err


def test_resume_starts_a_sweep_that_stopped_before_tune_saved_anything(tmp_path):
    """A sweep whose cluster could not be reached after its folder was written (tune/ empty) is started, not
    refused, by --resume; one Tune saved is restored."""
    folder = _sweep_folder(tmp_path)
    spec = read_spec(folder)
    assert not emm_search.started(spec, folder)
    (folder / "tune" / "tuner.pkl").write_bytes(b"")   # what Tune writes first when it starts an experiment
    assert emm_search.started(spec, folder)


@pytest.mark.parametrize("argv, message", [
    ([sys.executable, "sweeps/emm_search.py", "--size-range", "10.5", "80"],
     "error: argument --size-range: invalid int value: '10.5'; see emm_search.py --help\n"),
    ([sys.executable, "-m", "diffmem.train", "--set", "model.channels=1"],
     "error: model.channels=1 is too small: GroupNorm needs at least 4 channels per group and the network's first "
     "layer has model.channels = 1; use model.channels>=4\n"),
])
def test_the_command_lines_say_it_in_one_line(argv, message, tmp_path):
    """The same through real processes: exit status 2, exactly the one line, nothing in the working folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([*argv, "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env=env)
    assert (run.returncode, run.stderr) == (2, message)
    assert list(tmp_path.iterdir()) == []


# ---- the GroupNorm bound of validate() against the network itself ----------------------------------------------

SHAPES = [([1], 1), ([1, 2], 1), ([2, 2, 2], 2), ([1, 3], 1), ([1, 2, 4], 1)]


@pytest.mark.parametrize("mult, blocks", SHAPES)
def test_validate_accepts_exactly_the_widths_the_network_builds(mult, blocks):
    """For every width 1..48: load_config accepts it iff SongUNet builds; the smallest accepted runs forward."""
    accepted = []
    for channels in range(1, 49):
        overrides = {"model.channels": channels, "model.channel_mult": mult, "model.num_blocks": blocks,
                     "model.attn_resolutions": [4]}
        try:
            load_config(None, overrides)
            ok = True
        except ConfigError:
            ok = False
        try:
            SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=channels, channel_mult=mult,
                     num_blocks=blocks, attn_resolutions=[4])
            builds = True
        except (ValueError, ZeroDivisionError, RuntimeError):
            builds = False
        assert ok == builds, (channels, mult, blocks, ok, builds)
        if ok:
            accepted.append(channels)
    smallest = min(accepted)
    assert smallest == 4   # the input conv's `channels` outputs are normalized: one group of 4
    net = SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=smallest, channel_mult=mult,
                   num_blocks=blocks, attn_resolutions=[4])
    out = net(torch.randn(2, 1, 8, 8), torch.rand(2))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


# ---- a local sweep's Ray listens on loopback only --------------------------------------------------------------

LISTENERS = r"""
import json, os, socket, sys, time
sys.path.insert(0, sys.argv[1])
from sweeps.ray_cluster import start_ray
start_ray(None, dashboard=True)                     # a local cluster with the dashboard, as a sweep starts it
import psutil, ray                                  # psutil comes with ray
@ray.remote
def pid():
    return os.getpid()
ray.get([pid.remote() for _ in range(2)])           # worker processes, with their gRPC servers
time.sleep(5)                                       # the agents start in the background
me = psutil.Process()
rows = []
for p in [me, *me.children(recursive=True)]:
    try:
        name, conns = p.name(), p.net_connections(kind="inet")
    except psutil.Error:
        continue
    for c in conns:
        if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
            rows.append([name, c.laddr.ip, c.laddr.port])
print(json.dumps(rows))
ray.shutdown()
"""


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


@pytest.mark.slow
def test_a_local_sweeps_ray_listens_on_loopback_only(tmp_path):
    """start_ray without --address, dashboard on: every socket the driver and the processes Ray started listen on
    (GCS, raylet, object manager, dashboard and its agents, workers) is on 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    run = subprocess.run([sys.executable, "-c", LISTENERS, str(ROOT)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    # Ray's own start lines are replaced by the sweep's one line with the address and the token note (issue 15.4)
    console = run.stdout + run.stderr
    assert console.count("Ray dashboard: http://127.0.0.1:") == 1 and "token auth" in console, console[-3000:]
    assert "View the dashboard at" not in console and "Token authentication is enabled" not in console
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    names = {name for name, _, _ in rows}
    # the processes were found: GCS, raylet, the dashboard's agents, the workers
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, rows
    assert len(rows) >= 8 and any(name.startswith("ray::IDLE") for name in names), rows
    assert any(port == 8265 or "dashboard" in name.lower() for name, _, port in rows), rows
    open_to_the_network = [row for row in rows if not _loopback(row[1])]
    assert open_to_the_network == [], open_to_the_network

"""Run the paper's findings as one study: a list of factor sweeps sharing one ledger, then the findings page.

    python sweeps/study.py experiments/studies/digits.yaml              # output results/study-digits
    python sweeps/study.py experiments/studies/digits.yaml --estimate   # what the whole study would cost
    python sweeps/study.py experiments/studies/digits.yaml --page       # the findings page of what is finished
    python sweeps/study.py experiments/studies/digits.yaml --factors ema,epochs   # only these now

Each factor is exactly an emm_search.py sweep (run as one, in its own process) into OUTPUT/<factor>/, all of them
with --ledger OUTPUT/ledger.sqlite: a training that recurs across factors (the basic setup, at each size and seed
a search asks for) runs once. Ctrl-C (or SIGTERM) stops the running sweep as it stops on its own; the same
command continues: finished factors are kept, a started one resumes (--resume), the rest start. After each
factor, and after a stop with what is known, OUTPUT/findings.md and findings.png are rewritten
(sweeps/findings.py). The study file holds the factors, their values at this scale, the seeds and, per factor,
the paper's finding it tests, as data (experiments/studies/digits.yaml says what each key means).
"""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:      # `python sweeps/study.py` from a checkout
    sys.path.insert(0, str(ROOT))

from diffmem.cli import ArgumentParser, default_folder  # noqa: E402
from diffmem.config import ConfigError, read_yaml  # noqa: E402
from sweeps.factors import get_factor  # noqa: E402
from sweeps.findings import DIRECTIONS, factor_result, write_page  # noqa: E402
from sweeps.folder import SweepFolder, atomic_write  # noqa: E402

STATE_FILE = "study.json"
STATE_FORMAT, STATE_VERSION = "diffmem.study", 1
EMM_SEARCH = ROOT / "sweeps" / "emm_search.py"
STUDY_KEYS = {"config", "preset", "seeds", "size_range", "epsilon", "tolerance", "set", "factors", "not_run"}
FACTOR_KEYS = {"factor", "values", "size_range", "set", "finding", "note", "paper_config"}
FINDING_KEYS = {"where", "direction", "verified", "paper"}
NOT_RUN_KEYS = {"factor", "reason", "paper_config", "finding"}
DESCRIPTIVE_KEYS = {"finding", "note", "paper_config"}   # what the page says of a factor, not how its sweep runs


def _keys(d, allowed: set, required: set, where: str) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(sorted(allowed))}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}' in {where}; it takes {', '.join(sorted(allowed))}")
    missing = sorted(required - set(d))
    if missing:
        raise ConfigError(f"{where} has no '{missing[0]}'; give it")


def _finding(f, where: str) -> None:
    _keys(f, FINDING_KEYS, {"where", "direction", "paper"}, where)
    if f["direction"] not in DIRECTIONS:
        raise ConfigError(f"{where}.direction {f['direction']!r} must be one of {', '.join(DIRECTIONS)}")


def read_study(path: Path) -> dict:
    """The study file, checked: every key known, every factor real, every finding with a direction. The config it
    names is resolved against the study file's folder."""
    if not path.is_file():
        raise ConfigError(f"study file {path} not found; give a YAML file such as experiments/studies/digits.yaml")
    study = read_yaml(str(path)) or {}
    _keys(study, STUDY_KEYS, {"config", "factors"}, str(path))
    if not config_path(path, study).is_file():
        raise ConfigError(f"config {study['config']} named in {path} not found (paths are relative to the study file)")
    if not isinstance(study["factors"], list) or not study["factors"]:
        raise ConfigError(f"factors in {path} must be a list of at least one factor")
    seen = set()
    for i, entry in enumerate(study["factors"]):
        where = f"factors[{i}] of {path}"
        _keys(entry, FACTOR_KEYS, {"factor", "values", "finding"}, where)
        get_factor(entry["factor"])
        if entry["factor"] in seen:
            raise ConfigError(f"factor {entry['factor']} is listed twice in {path}; list each factor once")
        seen.add(entry["factor"])
        if not isinstance(entry["values"], list) or len(entry["values"]) < 2:
            raise ConfigError(f"{where}.values must list at least two values of {entry['factor']} (a direction "
                              f"needs two)")
        _finding(entry["finding"], f"{where}.finding")
        _paper_config(entry["paper_config"], where)
    for i, entry in enumerate(study.get("not_run") or []):
        _keys(entry, NOT_RUN_KEYS, NOT_RUN_KEYS, f"not_run[{i}] of {path}")
        _finding(entry["finding"], f"not_run[{i}].finding of {path}")
        _paper_config(entry["paper_config"], f"not_run[{i}] of {path}")
    return study


def _paper_config(name, where: str) -> None:
    """The config that runs the factor at paper scale, named from the checkout's root as the page prints it."""
    if not isinstance(name, str) or not (ROOT / name).is_file():
        raise ConfigError(f"{where}.paper_config {name!r} is not a file of the checkout; name one such as "
                          f"experiments/paper/conditioning.yaml")


def sweeps_of(study: dict) -> dict:
    """The part of a study that decides what its sweeps run: everything but the factors' descriptions."""
    return {**{k: v for k, v in study.items() if k != "not_run"},
            "factors": [{k: v for k, v in e.items() if k not in DESCRIPTIVE_KEYS} for e in study["factors"]]}


def config_path(study_file: Path, study: dict) -> Path:
    """The study's config, named relative to the study file (so a moved checkout continues its study)."""
    return (study_file.parent / study["config"]).resolve()


def chosen(study: dict, names: str | None) -> list[dict]:
    """The study's factors that --factors names (all without it), in the study's order."""
    known = [entry["factor"] for entry in study["factors"]]
    wanted = [n.strip() for n in names.split(",") if n.strip()] if names is not None else known
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ConfigError(f"--factors {names!r}: {unknown[0] if unknown else 'nothing'} is not a factor of the "
                          f"study; choose from {', '.join(known)}")
    return [entry for entry in study["factors"] if entry["factor"] in wanted]


def sweep_argv(study: dict, entry: dict, folder: Path, ledger: Path, args) -> list[str]:
    """emm_search.py's command line for one factor of the study."""
    argv = ["--factor", entry["factor"], "--values", *(json.dumps(v) for v in entry["values"]),
            "--config", str(config_path(Path(args.study), study)), "--seeds", str(study.get("seeds", 1)),
            "--output", str(folder), "--ledger", str(ledger)]
    if study.get("preset"):
        argv += ["--preset", study["preset"]]
    size_range = entry.get("size_range") or study.get("size_range")
    if size_range:
        argv += ["--size-range", *(str(s) for s in size_range)]
    for key in ("epsilon", "tolerance"):
        if study.get(key) is not None:
            argv += [f"--{key}", str(study[key])]
    for key, value in {**(study.get("set") or {}), **(entry.get("set") or {})}.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    if args.max_concurrent:
        argv += ["--max-concurrent", str(args.max_concurrent)]
    return argv


def read_state(output: Path, study: dict) -> dict:
    """OUTPUT/study.json: which factors finished, the seconds spent; a study started from another study file is
    refused (its factors' sweeps were made with other settings), one whose descriptions (findings, notes, paper
    configs) changed continues with the new ones."""
    path = output / STATE_FILE
    if not path.exists():
        if output.exists() and any(output.iterdir()):
            raise ConfigError(f"--output {output} holds files no study wrote (no {STATE_FILE}); choose another "
                              f"folder")
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "study": study, "factors": {}, "seconds": 0.0}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({type(e).__name__}); choose another --output") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise ConfigError(f"{path} was not written by this version of sweeps/study.py; choose another --output")
    ours, theirs = sweeps_of(study), sweeps_of(state["study"])
    if ours != theirs:
        changed = next((e["factor"] for e, o in zip(ours["factors"], theirs["factors"]) if e != o), None)
        raise ConfigError(f"the study file differs from the one {output} was started with"
                          + (f" (factor {changed})" if changed else "") + "; restore it, or give a new --output")
    return {**state, "study": study}


def write_state(output: Path, state: dict) -> None:
    atomic_write(output / STATE_FILE, lambda p: p.write_text(json.dumps(state, indent=1, default=str)))


def run_sweep(argv: list[str]) -> int:
    """One emm_search.py sweep in its own session, so a terminal's Ctrl-C reaches it once, through us: Tune takes
    a second Ctrl-C as 'quit now'."""
    child = subprocess.Popen([sys.executable, str(EMM_SEARCH), *argv], start_new_session=True)
    received = []

    def forward(signum, frame):
        if not received:
            child.send_signal(signum)
        received.append(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = child.wait()
        return 128 - rc if rc < 0 else rc   # killed by a signal: the shell's 128 + its number
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def header(args, state: dict) -> list[str]:
    from importlib.metadata import version   # torch's, without importing it (seconds) to write a page
    done = len([f for f in state["factors"].values() if f.get("done")])
    seeds, hours = state["study"].get("seeds", 1), state["seconds"] / 3600
    wall = f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.0f} min"
    return [f"Command: `python sweeps/study.py {args.study}` ({done} of {len(state['study']['factors'])} factors "
            f"finished).",
            f"Wall time: {wall} (the sweeps', summed over runs of the command). Machine: {platform.machine()}, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {version('torch')}; {seeds} training "
            f"seed{'s' * (seeds > 1)} per value; written {time.strftime('%Y-%m-%d')}."]


def write_findings(output: Path, args, state: dict) -> str:
    results = [factor_result(entry, SweepFolder(output / entry["factor"]).emm_csv
                             if state["factors"].get(entry["factor"], {}).get("done") else None)
               for entry in state["study"]["factors"]]
    return write_page(output, state["study"], results, header(args, state))


def estimate_study(study: dict, args) -> str:
    """Every factor's emm_search --estimate, and their sum; the shared ledger can only lower it."""
    from sweeps import emm_search
    from sweeps.estimate import duration_text, estimate
    figures = []
    for entry in study["factors"]:
        sweep_args = emm_search.parse_args(sweep_argv(study, entry, Path("unused"), Path("unused"), args))
        figures.append(estimate(emm_search.build_spec(sweep_args), sweep_args))
    (median, worst), (wall, worst_wall) = ([sum(pair) for pair in zip(*(getattr(f, key) for f in figures))]
                                           for key in ("trainings", "wall_seconds"))
    return "\n".join([f.text.splitlines()[0] for f in figures] + [
        f"study: {median} trainings (median) / {worst} (worst), ~{duration_text(wall)} wall (worst "
        f"~{duration_text(worst_wall)}), the factors one after another; the shared ledger answers what recurs "
        f"(the basic setup in most factors), so the study costs less"])


def main(argv=None) -> int:
    p = ArgumentParser(prog="study.py", description="\n\n".join(__doc__.split("\n\n")[:2]))
    p.add_argument("study", help="study file, e.g. experiments/studies/digits.yaml")
    p.add_argument("--output", help="study folder (default results/study-<study file name> in the checkout); "
                   "the same folder continues")
    p.add_argument("--estimate", action="store_true", help="print what the study would cost and exit")
    p.add_argument("--page", action="store_true", help="rewrite findings.md and findings.png from the factors "
                   "finished so far, train nothing")
    p.add_argument("--factors", help="comma-separated factors of the study to run now, in the study's order (the "
                   "others stay as they are, and the page shows all); default all")
    p.add_argument("--max-concurrent", type=int,
                   help="trainings at once in each sweep (default: what the machine holds)")
    args = p.parse_args(argv)
    try:
        study = read_study(Path(args.study))
        factors = chosen(study, args.factors)
        if args.estimate:
            print(estimate_study({**study, "factors": factors}, args))
            return 0
        output = (Path(args.output) if args.output else
                  default_folder("results", f"study-{Path(args.study).stem}", stamp=False)).resolve()
        state = read_state(output, study)
        if args.page:
            if not (output / STATE_FILE).is_file():
                raise ConfigError(f"{output} holds no study yet; run it first (without --page)")
            print(write_findings(output, args, state))
            return 0
        output.mkdir(parents=True, exist_ok=True)
        write_state(output, state)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ledger = SweepFolder(output).ledger   # one ledger for the study's sweeps
    for entry in factors:
        name = entry["factor"]
        mine = state["factors"].setdefault(name, {"done": False, "seconds": 0.0})
        if mine["done"]:
            continue
        folder = output / name
        resume = SweepFolder(folder).spec.is_file()
        print(f"study: {'resuming' if resume else 'starting'} {name} ({folder})", flush=True)
        start = time.time()
        rc = run_sweep(["--resume", str(folder)] if resume else sweep_argv(study, entry, folder, ledger, args))
        spent = time.time() - start
        mine["seconds"] += spent
        state["seconds"] += spent
        mine["done"] = rc == 0
        write_state(output, state)
        write_findings(output, args, state)
        if rc != 0:
            print(f"study: {name} stopped (exit {rc}); the same command continues: "
                  f"python sweeps/study.py {args.study}" + (f" --output {args.output}" if args.output else "")
                  + (f" --factors {args.factors}" if args.factors else ""),
                  file=sys.stderr)
            return rc
    summary = write_findings(output, args, state)
    done = sum(bool(f.get("done")) for f in state["factors"].values())
    print(f"\nstudy: {done} of {len(study['factors'])} factors finished, {state['seconds'] / 3600:.1f} h; "
          f"{output / 'findings.md'}\n")
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

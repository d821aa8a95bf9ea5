"""Folders and ledgers that are not ours are refused before anything is written or unpickled, and --no-reuse
never answers from the ledger (issues 17 and 18)."""
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import sweeps.emm_search as emm_search
from sweeps.spec import trial_settings, write_spec

ROOT = Path(__file__).resolve().parent.parent
SEARCH = str(ROOT / "sweeps" / "emm_search.py")
USER_CSV = "value,emm\nmine,42\n"


class _Payload:
    """A crafted pickle: unpickling it creates a file (it could run anything)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _crafted_tune(folder: Path) -> None:
    (folder / "tune").mkdir(parents=True)
    for name in ("tuner.pkl", "trainable.pkl"):
        (folder / "tune" / name).write_bytes(pickle.dumps(_Payload(str(folder.parent / "UNPICKLED"))))


def _user_folder(tmp):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "emm.csv").write_text(USER_CSV)
    return ["--output", str(tmp / "mine")]


def _output_is_a_file(tmp):
    (tmp / "notes.txt").write_text("x")
    return ["--output", str(tmp / "notes.txt")]


def _foreign_sweep_json(tmp):
    (tmp / "other").mkdir()
    (tmp / "other" / "sweep.json").write_text('{"version": 1, "name": "my own sweep"}')
    return ["--output", str(tmp / "other")]


def _resume(sweep_json: str):
    def setup(tmp):
        _crafted_tune(tmp / "s")
        (tmp / "s" / "sweep.json").write_text(sweep_json)
        return ["--resume", str(tmp / "s")]
    return setup


def _ledger(content: bytes):
    def setup(tmp):
        (tmp / "ledger.sqlite").write_bytes(content)
        return ["--output", str(tmp / "out"), "--ledger", str(tmp / "ledger.sqlite")]
    return setup


def _resume_with_empty_ledger(tmp):
    """A sweep folder whose ledger a crash truncated to 0 bytes: its records are gone; never start afresh."""
    spec = emm_search.build_spec(emm_search.parse_args(["--preset", "smoke"]), tmp / "s")
    write_spec(tmp / "s", spec)
    _crafted_tune(tmp / "s")
    (tmp / "s" / "ledger.sqlite").write_bytes(b"")
    return ["--resume", str(tmp / "s")]


OLD_SPEC = '{"version": 1, "factor": "width", "grid_points": [], "base": {}}'   # what version 1 wrote

CASES = {
    "output holds the user's files": (_user_folder, r"--output \S+ already exists and was not written by diffmem "
                                                    r"\(it holds emm.csv\); choose a folder that does not exist yet"),
    "output is a file": (_output_is_a_file, r"--output \S+ is a file, not a folder"),
    "output holds a foreign sweep.json": (_foreign_sweep_json, r"--output \S+ holds a sweep.json that diffmem did "
                                                                r"not write"),
    "resume: sweep.json is garbage": (_resume("{not json"), r"\S+sweep.json was not written by diffmem's "
                                                            r"emm_search \(unreadable: JSONDecodeError\); resume only"),
    "resume: foreign sweep.json": (_resume('{"version": 1}'), r"\S+sweep.json was not written by diffmem's "
                                                              r"emm_search \(no diffmem format key\)"),
    "resume: an older sweep": (_resume(OLD_SPEC), r"\S+ was written by another version of emm_search \(format 1\); "
                                                  r"start a new sweep"),
    "ledger is 0 bytes": (_ledger(b""), r"ledger \S+ is empty \(0 bytes\), not a diffmem ledger"),
    "ledger is not SQLite": (_ledger(USER_CSV.encode()), r"ledger \S+ is not a SQLite file, so not a diffmem ledger"),
    "resume: ledger is 0 bytes": (_resume_with_empty_ledger, r"ledger \S+ is empty \(0 bytes\)"),
}


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_a_folder_or_ledger_that_is_not_ours_is_refused_before_anything_is_written(case, tmp_path, monkeypatch,
                                                                                 capsys):
    """One line naming the fix, exit 2, nothing written or changed, nothing unpickled, Ray never started."""
    import ray
    setup, message = CASES[case]
    args = setup(tmp_path)
    before = _snapshot(tmp_path)
    monkeypatch.setattr(emm_search, "start_ray", lambda *a: pytest.fail("Ray would start"))
    monkeypatch.chdir(tmp_path)          # a default results/ folder would land here
    capsys.readouterr()
    assert emm_search.main([*args, "--no-dashboard"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"error: {message}.*\n", err), err
    assert err.count("\n") == 1
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "UNPICKLED").exists() and not ray.is_initialized()


def test_a_new_sweep_takes_a_fresh_or_an_empty_folder(tmp_path):
    emm_search.check_new_output(tmp_path / "new")          # does not exist yet
    (tmp_path / "empty").mkdir()
    emm_search.check_new_output(tmp_path / "empty")
    assert not (tmp_path / "new").exists()


def test_the_users_file_survives_the_cli(tmp_path):
    """The same refusal through the command line: exit 2, one line, no traceback, the file as it was."""
    args = _user_folder(tmp_path)
    run = subprocess.run([sys.executable, SEARCH, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert "was not written by diffmem (it holds emm.csv)" in run.stderr
    assert (tmp_path / "mine" / "emm.csv").read_text() == USER_CSV and len(list((tmp_path / "mine").iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.slow
def test_no_reuse_trains_and_from_ledger_is_counted(tmp_path):
    """A ledger that holds a (made-up) record of the very training a sweep needs: with --no-reuse the sweep
    trains it (before: the restored-trial path answered from the ledger in 0 s and the table said 'from
    ledger 0'); without, the record answers and the table counts it as from the ledger, zero trainings.
    data_size trains each size in a Tune trial, so the answer comes through the trial path, not the searcher."""
    from sweeps import curve
    from sweeps.ledger import Ledger
    from sweeps.trainable import trial_key
    args = ["--preset", "smoke", "--factor", "data_size", "--values", "10", "--no-dashboard"]
    ledger = tmp_path / "ledger.sqlite"
    spec = emm_search.build_spec(emm_search.parse_args([*args, "--ledger", str(ledger)]), tmp_path / "s")
    config = {"grid_index": 0, "grid_label": curve.LABEL, "grid_value": None, "overrides": {}, "size": 10}
    key, resolved, context = trial_key(trial_settings(spec, tmp_path), config)
    made_up = {"best_mem_ratio": 0.123, "best_num_samples": 64, "images_seen": 16000, "planned_images": 16000}
    Ledger(ledger).put(key, resolved, context, made_up, 1.0)

    def sweep(name, *extra):
        run = subprocess.run([sys.executable, SEARCH, *args, "--ledger", str(ledger), "--output",
                              str(tmp_path / name), *extra], capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        return pd.read_csv(tmp_path / name / "emm.csv"), pd.read_csv(tmp_path / name / "trials.csv")

    emm, trials = sweep("no-reuse", "--no-reuse")
    assert (emm.trainings[0], emm.from_ledger[0]) == (1, 0) and emm.training_images[0] > 0
    assert list(trials.status) == ["done"] and trials.best_mem_ratio[0] != 0.123
    assert list((tmp_path / "no-reuse" / "tensorboard" / "data_size" / "D=10").glob("events.*"))   # it trained

    emm, trials = sweep("reuse")
    assert (emm.trainings[0], emm.from_ledger[0], emm.training_images[0]) == (0, 1, 0)
    assert list(trials.status) == ["from_ledger"] and trials.best_mem_ratio[0] == 0.123
    assert "| 0 | 1 |" in (tmp_path / "reuse" / "emm.md").read_text()
    status = subprocess.run([sys.executable, SEARCH, "--status", str(tmp_path / "reuse")], capture_output=True,
                            text=True, timeout=60)
    assert re.search(r"\ndata_size\s+\|D\|=10\s+0\.123", status.stdout), status.stdout
    assert status.stdout.startswith(f"sweep data_size in {tmp_path / 'reuse'}: finished"), status.stdout
    assert len(Ledger(ledger)) == 1          # the first record of a key wins


def test_a_moved_sweep_folder_takes_its_own_ledger_and_leaves_a_shared_one(tmp_path):
    """sweeps.trainable.relocated: what lies inside the folder moves with it; a --ledger outside stays."""
    from sweeps.trainable import KnownResults, relocated
    old, new = str(tmp_path / "scratch" / "sweep"), str(tmp_path / "home" / "sweep")
    assert relocated(f"{old}/ledger.sqlite", old, new) == f"{new}/ledger.sqlite"
    assert relocated(str(tmp_path / "shared.sqlite"), old, new) == str(tmp_path / "shared.sqlite")
    assert relocated(f"{old}-other/ledger.sqlite", old, new) == f"{old}-other/ledger.sqlite"   # a sibling, not inside
    known = KnownResults({"output": old, "ledger": f"{old}/ledger.sqlite", "base": {}})
    known.moved_to(new)
    assert known.settings["output"] == new and known.settings["ledger"] == f"{new}/ledger.sqlite"

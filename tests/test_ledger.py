"""The results ledger: durable, keyed by what determines a training, consulted before training again."""
import json
import random
import sqlite3
from dataclasses import replace

import pytest
from conftest import a_sweep
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray.tune.search import Searcher

from diffmem.config import ConfigError, load_config
from diffmem.sequential import ratio_interval
from sweeps.ledger import Ledger, key_context, training_key
from sweeps.searcher import EMMSearcher

METRICS = {"best_mem_ratio": 0.95, "best_num_samples": 256, "images_seen": 6000, "planned_images": 8000}
CONTEXT = {"data": "d1", "device": "cpu", "torch": "2.14.1"}


def test_records_round_trip_and_the_first_record_wins(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    cfg = load_config("experiments/digits.yaml").to_dict()
    key = training_key(cfg, CONTEXT)
    assert ledger.get(key) is None
    ledger.put(key, cfg, CONTEXT, METRICS, 12.5)
    ledger.put(key, cfg, CONTEXT, {**METRICS, "best_mem_ratio": 0.1}, 1.0)
    record = Ledger(tmp_path / "l.sqlite").get(key)            # reopened: it is on disk
    assert record["best_mem_ratio"] == 0.95 and record["size"] == cfg["data"]["size"] and len(ledger) == 1
    assert json.loads(record["context"]) == CONTEXT


def test_key_changes_with_anything_that_determines_the_result():
    a = load_config("experiments/digits.yaml").to_dict()
    b = load_config("experiments/digits.yaml", {"train.seed": 1}).to_dict()
    c = load_config("experiments/digits.yaml", {"data.size": 65}).to_dict()
    keys = {training_key(a, CONTEXT), training_key(b, CONTEXT), training_key(c, CONTEXT)}
    for name, other in [("data", "d2"), ("device", "cuda"), ("torch", "2.15.0")]:
        keys.add(training_key(a, {**CONTEXT, name: other}))
    assert len(keys) == 6
    assert training_key(a, CONTEXT) == training_key(load_config("experiments/digits.yaml").to_dict(), dict(CONTEXT))


def test_code_version_follows_what_the_code_runs_not_how_it_is_written(tmp_path):
    """Comments, docstrings and line wrapping keep a ledger's records; a changed constant or statement retires them."""
    import shutil

    from sweeps.ledger import SCIENCE, code_version
    package = tmp_path / "diffmem"
    shutil.copytree(SCIENCE, package, ignore=shutil.ignore_patterns("__pycache__"))
    original = code_version(package)
    ema = package / "ema.py"
    text = ema.read_text()

    def version_with(new_text: str) -> str:
        copy = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        shutil.copytree(package, copy)
        (copy / "ema.py").write_text(new_text)
        return code_version(copy)

    assert '"""' in text and "def " in text
    cosmetic = ('"""Another module docstring."""\n# a new comment\n' + text.split('"""', 2)[2]).replace(
        "):\n", "):   # a trailing comment\n", 1)
    assert version_with(cosmetic) == original
    assert version_with(text + "\nRAMP = 0.05\n") != original            # a new name
    assert "math.log(0.5)" in text
    assert version_with(text.replace("math.log(0.5)", "math.log(0.25)")) != original   # a changed constant
    assert version_with(text + "\nprint('hi')\n") != original            # a new statement
    assert code_version(SCIENCE) == code_version()


def test_incompatible_ledger_is_refused(tmp_path):
    path = tmp_path / "old.sqlite"
    Ledger(path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '1' WHERE name = 'version'")
    with pytest.raises(ConfigError, match="format version 1, this code writes 4; pass another --ledger path"):
        Ledger(path)


def test_a_version_3_ledger_is_upgraded_in_place_and_keeps_its_records(tmp_path):
    """Version 3 called the time inside training steps train_seconds; opening it renames the column once."""
    path = _version_3_ledger(tmp_path)
    key = training_key(load_config("experiments/digits.yaml").to_dict(), CONTEXT)
    ledger = Ledger(path)
    assert len(ledger) == 1 and ledger.get(key)["step_seconds"] == 12.5 and "train_seconds" not in ledger.get(key)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone() == ("4",)
    assert Ledger(path).get(key)["best_mem_ratio"] == 0.95   # opened again: nothing to upgrade


def test_status_reads_a_version_3_ledgers_step_times_without_upgrading_it(tmp_path):
    """--status reads a ledger read-only: an older sweep's version 3 ledger gives its times as it is."""
    from sweeps.ledger import recorded_step_seconds
    path = _version_3_ledger(tmp_path)
    assert recorded_step_seconds(str(path)) == [12.5]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone() == ("3",)


def _version_3_ledger(tmp_path):
    """A ledger of one record (step time 12.5 s) as the version 3 code wrote it."""
    path = tmp_path / "v3.sqlite"
    cfg = load_config("experiments/digits.yaml").to_dict()
    Ledger(path).put(training_key(cfg, CONTEXT), cfg, CONTEXT, METRICS, 12.5)
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE trainings RENAME COLUMN step_seconds TO train_seconds")
        db.execute("UPDATE meta SET value = '3' WHERE name = 'version'")
    return path


def test_searcher_observes_what_the_ledger_holds_instead_of_training():
    truth = {0: 300, 1: 120}                     # EMM of two grid points on a fake monotone curve
    known = {(0, s): s <= 300 for s in range(10, 1001, 10)}   # grid point 0 was measured before

    def known_results(config):
        hit = known.get((config["grid_index"], config["size"]))
        return None if hit is None else {"best_mem_ratio": 1.0 if hit else 0.0, "best_num_samples": 256}

    points = [{"label": f"p={i}", "value": i, "overrides": {}} for i in truth]
    searcher = EMMSearcher(points, list(range(10, 1001, 10)), (20, 640), max_concurrent=2,
                           known_results=known_results)
    launched, n = [], 0
    while True:
        config = searcher.suggest(f"t{n}")
        if config == Searcher.FINISHED:
            break
        assert config is not None
        launched.append(config["grid_index"])
        memorized = config["size"] <= truth[config["grid_index"]]
        searcher.on_trial_complete(f"t{n}", {"best_mem_ratio": 1.0 if memorized else 0.0})
        n += 1
    assert set(launched) == {1}                  # nothing trained again for grid point 0
    summary = searcher.state.summary()
    assert summary[0]["emm"] == 300 and summary[1]["emm"] == 120 and searcher.from_ledger


@st.composite
def ledger_scenarios(draw):
    thresholds = draw(st.lists(st.integers(0, 1100), min_size=1, max_size=3))
    known = draw(st.sets(st.tuples(st.integers(0, len(thresholds) - 1), st.integers(1, 100)), max_size=40))
    return {"thresholds": thresholds, "known": {(g, 10 * s) for g, s in known},
            "workers": draw(st.integers(1, 6)), "repeat_rate": draw(st.sampled_from([0.0, 0.3])),
            "restore_rate": draw(st.sampled_from([0.0, 0.3])), "seed": draw(st.integers(0, 2 ** 32 - 1))}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ledger_scenarios())
def test_property_searcher_never_asks_for_what_the_ledger_holds(case):
    rng = random.Random(case["seed"])
    thresholds, allowed = case["thresholds"], list(range(10, 1001, 10))

    def ratio(g, size):
        return 0.95 if size <= thresholds[g] else 0.2

    def known_results(config):
        key = (config["grid_index"], config["size"])
        return {"best_mem_ratio": ratio(*key), "best_num_samples": 256} if key in case["known"] else None

    points = [{"label": f"p{g}", "value": g, "overrides": {}} for g in range(len(thresholds))]

    def fresh():
        return EMMSearcher(points, allowed, (20, 640), max_concurrent=case["workers"], known_results=known_results)
    searcher, running, n = fresh(), {}, 0
    for _ in range(2000):
        if rng.random() < case["restore_rate"]:                  # a driver restarted from a snapshot
            saved = json.loads(json.dumps(searcher.to_dict()))
            searcher = fresh()
            searcher.load_dict(saved)
        config = searcher.suggest(f"t{n}")
        if config == Searcher.FINISHED and not running:
            break
        if isinstance(config, dict):
            key = (config["grid_index"], config["size"])
            assert key not in case["known"] and config["size"] in allowed
            running[f"t{n}"] = key
            n += 1
            continue
        if not running:
            continue
        trial_id = rng.choice(sorted(running))
        searcher.on_trial_complete(trial_id, {"best_mem_ratio": ratio(*running.pop(trial_id))})
        if rng.random() < case["repeat_rate"]:                   # the same completion delivered twice
            searcher.on_trial_complete(trial_id, {"best_mem_ratio": 0.0})
    else:
        pytest.fail("the search did not end")
    for row, threshold in zip(searcher.state.summary(), thresholds):
        truth = max([s for s in allowed if s <= threshold], default=None)
        if row["censored"] == "":
            assert row["emm"] == truth or (row["emm"] < truth < row["high"] and row["high"] / row["emm"] <= 1.1 + 1e-9)
        elif row["censored"] == "<min":
            assert truth is None or truth < 20
        else:
            assert row["censored"] == ">=max" and truth == 1000


# ---------------------------------------------------------------- what the key holds besides the config

def _write_pngs(folder, seed, size=8, per_class=3):
    """An image folder as diffmem reads it (data.dataset: folder): one subfolder per class, RGB PNGs."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    return folder


def _forget_loaded_data():
    """A new process: diffmem.data reads (and fingerprints) each dataset once per process."""
    import diffmem.data
    diffmem.data._load.cache_clear()
    diffmem.data._mix_set.cache_clear()
    diffmem.data._fingerprint.cache_clear()


def _folder_settings(folder, **data):
    base = load_config(None, {"data.dataset": "folder", "data.path": str(folder), "data.size": 4,
                              **{f"data.{k}": v for k, v in data.items()}}).to_dict()
    return {"base": base, "epsilon": 0.1, "gpus_per_worker": 0}


TRIAL = {"grid_index": 0, "grid_label": "p", "grid_value": None, "overrides": {}, "size": 4}


def test_key_holds_the_data_actually_loaded(tmp_path):
    """Files replaced at the same path (same config) give another key; the same content gives the same key.
    The mixed-in images of data.mix_path count too."""
    from sweeps.trainable import trial_key
    folder = _write_pngs(tmp_path / "images", seed=0)
    _forget_loaded_data()
    first = trial_key(_folder_settings(folder), TRIAL)[0]
    _forget_loaded_data()
    assert trial_key(_folder_settings(folder), TRIAL)[0] == first          # nothing changed: reused
    _write_pngs(folder, seed=1)                                             # same paths, new pixels
    _forget_loaded_data()
    changed = trial_key(_folder_settings(folder), TRIAL)[0]
    assert changed != first
    mix = _write_pngs(tmp_path / "mix", seed=2)
    settings = _folder_settings(folder, mix_path=str(mix), mix_class=0, mix_rate=0.5)
    _forget_loaded_data()
    mixed = trial_key(settings, TRIAL)[0]
    _write_pngs(mix, seed=3)
    _forget_loaded_data()
    assert trial_key(settings, TRIAL)[0] != mixed and mixed not in (first, changed)
    _forget_loaded_data()


def test_key_holds_the_device_type_and_the_torch_version(monkeypatch):
    """train.device 'auto' is resolved from the trial's resources, on the driver as in the trial: a GPU
    trial's key says cuda even where the driver has no GPU, a CPU trial's says cpu on a GPU machine."""
    import torch

    import sweeps.ledger
    from sweeps.trainable import trial_config, trial_key
    base = load_config("experiments/digits.yaml").to_dict()
    assert base["train"]["device"] == "auto"
    cpu, gpu = ({"base": base, "epsilon": 0.1, "gpus_per_worker": g} for g in (0, 1))
    config = {**TRIAL, "size": 20}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)     # either machine: the trial's resources decide
    assert trial_config(cpu, config).train.device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trial_config(gpu, config).train.device == "cuda"
    cpu_key, _, cpu_context = trial_key(cpu, config)
    gpu_key, _, gpu_context = trial_key(gpu, config)
    assert (cpu_context["device"], gpu_context["device"]) == ("cpu", "cuda") and cpu_key != gpu_key
    assert cpu_context["torch"] == torch.__version__ and len(cpu_context["data"]) == 32
    monkeypatch.setattr(torch, "__version__", "0.0.1-other")
    assert trial_key(cpu, config)[0] != cpu_key
    monkeypatch.undo()
    # a config outside sweeps ('auto' as it is): resolved as diffmem.train resolves it, on this machine
    auto = load_config("experiments/digits.yaml")
    assert key_context(auto)["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert sweeps.ledger.LEDGER_VERSION == 4


def test_the_driver_looks_up_the_key_the_trial_records(tmp_path, monkeypatch):
    """KnownResults (the searcher's lookup, in the driver) finds what a finished trial put, and --no-reuse
    (settings["no_reuse"]) never answers from the ledger, not even a restored trial (_report_known)."""
    import sweeps.trainable as trainable
    from sweeps.spec import trial_settings
    base = load_config("experiments/digits.yaml").to_dict()
    spec = a_sweep(base=base, ledger=str(tmp_path / "l.sqlite"))
    settings = trial_settings(spec, tmp_path)
    config = {**TRIAL, "size": 20}
    key, resolved, context = trainable.trial_key(settings, config)
    early = {**METRICS, "best_mem_ratio": 61 / 64, "best_num_samples": 64}   # an adaptive evaluation stopped at 64
    Ledger(settings["ledger"]).put(key, resolved, context, early, 3.0)     # as _run records it
    assert trainable.KnownResults(settings)(config)["best_mem_ratio"] == 61 / 64
    reported = []
    monkeypatch.setattr(trainable.tune, "report", lambda metrics, **_: reported.append(metrics))
    assert trainable._report_known(settings, config) is True
    low, high = ratio_interval(61, 64)   # the interval the training reported: over the samples it used
    assert reported == [{**early, "best_mem_ratio_low": low, "best_mem_ratio_high": high, "from_ledger": 1}]
    no_reuse = trial_settings(replace(spec, no_reuse=True), tmp_path)
    assert no_reuse["no_reuse"] is True
    assert trainable._report_known(no_reuse, config) is False and len(reported) == 1


# ---------------------------------------------------------------- "from ledger" counts every ledger answer

def test_from_ledger_counts_answers_of_the_searcher_and_of_restored_trials():
    """Two ways the ledger answers: the searcher observes a record without a trial, or a restored trial finds
    its record and reports it marked from_ledger. Both are 'from ledger' in emm.csv/emm.md, neither counts as
    a training of this sweep nor adds training images."""
    import pandas as pd

    from sweeps.results import emm_table, markdown_table, trials_from_search
    points = [{"label": "p=0", "value": 0, "overrides": {}}]
    known = {30: 0.95}
    searcher = EMMSearcher(points, list(range(10, 81, 10)), (10, 80), max_concurrent=1,
                           known_results=lambda c: ({"best_mem_ratio": known[c["size"]], "best_num_samples": 256}
                                                    if c["size"] in known else None))
    trials = []
    for n in range(40):
        config = searcher.suggest(f"t{n}")
        if config == Searcher.FINISHED:
            break
        from_ledger = config["size"] == 40          # a restored trial that found its record
        ratio = 0.95 if config["size"] <= 40 else 0.2
        result = {"best_mem_ratio": ratio, "images_seen": 16000, "planned_images": 16000, "done": True,
                  "from_ledger": 1 if from_ledger else float("nan"), "time_total_s": 1.0 if from_ledger else 30.0,
                  "trial_id": f"t{n}", "config/grid_label": "p=0", "config/size": config["size"]}
        searcher.on_trial_complete(f"t{n}", result)
        trials.append(result)
    summary = searcher.state.summary()
    sizes = [s for s, *_ in summary[0]["observations"]]
    assert 30 in sizes and 40 in sizes and searcher.from_ledger == [(0, 30)]
    table = trials_from_search(summary, pd.DataFrame(trials), 0.1)
    assert set(table[table["size"].isin([30, 40])].status) == {"from_ledger"}
    emm = emm_table("p", summary, table)
    trained = len(sizes) - 2
    assert emm.from_ledger[0] == 2 and emm.trainings[0] == trained and emm.training_images[0] == 16000 * trained
    assert f"| {trained} | 2 |" in markdown_table(emm, 0.1)


def test_status_counts_the_ledger_answers(tmp_path):
    import json as _json

    from sweeps.status import sweep_status
    from test_watch import make_sweep
    out = make_sweep(tmp_path / "sweep", finished=False)
    state_file = next((out / "tune").glob("searcher-state-*.pkl"))
    saved = _json.loads(state_file.read_text())
    saved["from_ledger"] = [[0, 20], [0, 30]]          # answered by the ledger without a trial
    state_file.write_text(_json.dumps(saved))
    text = sweep_status(out)
    assert "finished trainings: 6 (2 from the ledger)" in text, text
    assert "3 done (2 from the ledger), 0 running" in text, text


# ---------------------------------------------------------------- ledger files that are not ours

def test_an_empty_truncated_or_foreign_ledger_is_refused_and_left_as_it_is(tmp_path):
    """A ledger is created only where no file exists; any other file must be a whole diffmem ledger."""
    intact = tmp_path / "intact.sqlite"
    ledger = Ledger(intact)
    cfg = load_config("experiments/digits.yaml").to_dict()
    for i in range(200):
        ledger.put(f"k{i}", cfg, CONTEXT, METRICS, 1.0)
    data = intact.read_bytes()
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x)")
    cases = {"empty.sqlite": (b"", r"is empty \(0 bytes\), not a diffmem ledger"),
             "notes.sqlite": (b"name,emm\nwidth,40\n", "is not a SQLite file, so not a diffmem ledger"),
             "half.sqlite": (data[:len(data) // 2], "is (damaged or )?truncated"),
             "short.sqlite": (data[:-100], r"is truncated \(\d+ of \d+ bytes\)"),
             "foreign.sqlite": (foreign.read_bytes(), "is a SQLite file but not a diffmem ledger")}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=f"^ledger {path} {message}.*(--ledger path|backup)") as refused:
            Ledger(path)
        assert "\n" not in str(refused.value) and "where no file exists" in str(refused.value)
        assert path.read_bytes() == content, name                       # not touched, never made a new one
    with pytest.raises(ConfigError, match="is a folder, not a ledger file"):
        Ledger(tmp_path)
    # the intact one: opened again (a resume, another sweep), every record is still there
    assert len(Ledger(intact)) == 200 and Ledger(intact).get("k7")["best_mem_ratio"] == 0.95
    assert intact.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["intact.sqlite", *cases])   # no temporary left


def _check_and_write(path: str, seconds: float, writer: int) -> int:
    """Open (check) and write the ledger at `path` again and again for `seconds`, as trainings finishing beside each
    other do; returns how often a check took the healthy ledger for a damaged one."""
    import time
    cfg = load_config("experiments/digits.yaml").to_dict()
    refused, end, i = 0, time.time() + seconds, 0
    while time.time() < end:
        try:
            Ledger(path).put(f"w{writer}-{i}", cfg, CONTEXT, METRICS, 1.0)
        except ConfigError:
            refused += 1
        i += 1
    return refused


def test_concurrent_trainings_never_see_a_healthy_ledger_as_damaged(tmp_path):
    """Three processes open (quick_check) and write one ledger at once: no check may fail. Before the truncation
    check kept SQLite's read lock (sweeps.ledger._truncated_by), about half of such checks did on a ledger of
    3,000 records."""
    import multiprocessing
    path = tmp_path / "ledger.sqlite"
    Ledger(path)
    cfg = json.dumps(load_config("experiments/digits.yaml").to_dict(), sort_keys=True)
    with sqlite3.connect(path) as db:   # a ledger of some size, so that each quick_check takes a while
        db.executemany("INSERT INTO trainings VALUES (?, 0.9, 64, 16000, 16000, 1.0, 10, ?, '{}', 'x', 0)",
                       [(f"old{i}", cfg) for i in range(3000)])
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        refused = pool.starmap(_check_and_write, [(str(path), 6.0, w) for w in range(3)])
    assert refused == [0, 0, 0]
    assert len(Ledger(path)) > 3000

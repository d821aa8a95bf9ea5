"""The results ledger: durable, keyed by what determines a training, consulted before training again."""
import json
import random
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray.tune.search import Searcher

from diffmem.config import ConfigError, load_config
from sweeps.ledger import Ledger, training_key
from sweeps.searcher import EMMSearcher

METRICS = {"best_mem_ratio": 0.95, "images_seen": 6000, "planned_images": 8000}


def test_records_round_trip_and_the_first_record_wins(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    cfg = load_config("experiments/digits.yaml").to_dict()
    key = training_key(cfg)
    assert ledger.get(key) is None
    ledger.put(key, cfg, METRICS, 12.5)
    ledger.put(key, cfg, {**METRICS, "best_mem_ratio": 0.1}, 1.0)
    record = Ledger(tmp_path / "l.sqlite").get(key)            # reopened: it is on disk
    assert record["best_mem_ratio"] == 0.95 and record["size"] == cfg["data"]["size"] and len(ledger) == 1


def test_key_changes_with_anything_that_determines_the_result():
    a = load_config("experiments/digits.yaml").to_dict()
    b = load_config("experiments/digits.yaml", {"train.seed": 1}).to_dict()
    c = load_config("experiments/digits.yaml", {"data.size": 65}).to_dict()
    assert len({training_key(a), training_key(b), training_key(c)}) == 3
    assert training_key(a) == training_key(load_config("experiments/digits.yaml").to_dict())


def test_incompatible_ledger_is_refused(tmp_path):
    path = tmp_path / "old.sqlite"
    Ledger(path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '0' WHERE name = 'version'")
    with pytest.raises(ConfigError, match="format version 0, this code writes 1; pass another --ledger path"):
        Ledger(path)


def test_searcher_observes_what_the_ledger_holds_instead_of_training():
    truth = {0: 300, 1: 120}                     # EMM of two grid points on a fake monotone curve
    known = {(0, s): s <= 300 for s in range(10, 1001, 10)}   # grid point 0 was measured before

    def known_results(config):
        hit = known.get((config["grid_index"], config["size"]))
        return None if hit is None else {"best_mem_ratio": 1.0 if hit else 0.0}

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
    assert summary[0]["emm"] == 300 and summary[1]["emm"] == 120 and searcher.reused


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
        return {"best_mem_ratio": ratio(*key)} if key in case["known"] else None

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
            assert row["low"] == truth or (row["low"] < truth < row["high"] and row["high"] / row["low"] <= 1.1 + 1e-9)
        elif row["censored"] == "<min":
            assert truth is None or truth < 20
        else:
            assert row["censored"] == ">=max" and truth == 1000

"""Training seeds (issue 11, item 3): K searches per grid point, their median and spread, the ledger answering seed by
seed, the outputs' new columns. No Ray: the searcher is driven as Tune would drive it (tests/test_searcher.py)."""
import itertools
import json
import math

import pandas as pd
import pytest
from conftest import a_sweep
from ray.tune.search import Searcher

from diffmem.config import load_config
from sweeps.bisection import (AT_LEAST_MAX, BELOW_MIN, OPEN, RESOLVED, UNRESOLVED, EMMSearchState, interval_level,
                              seed_median, simulate)
from sweeps.searcher import EMMSearcher

SIZES = list(range(10, 201, 10))
POINTS = [{"label": f"p={g}", "value": g, "overrides": {"train.lr": 1e-3 * (g + 1)}} for g in (0, 1)]
BASE_SEED = 1024


def seed_run(low, high, status=RESOLVED, trials=2):
    """One seed's SizeBracket.summary(), as far as seed_median reads it."""
    return {"emm": low, "high": high, "status": status, "trials": trials, "images": 10.0 * trials,
            "observations": [], "pending": [], "error": "boom" if status == UNRESOLVED else None}


# ---------------------------------------------------------------------------------- the rule
def test_the_emm_is_the_lower_median_of_the_seeds_and_the_interval_their_extremes():
    three = seed_median([seed_run(60, 70), seed_run(40, 50), seed_run(50, 60)])
    assert (three["emm"], three["high"]) == (50, 60) and "low" not in three
    assert (three["interval_low"], three["interval_high"], three["status"], three["censored"]) == (40, 70, RESOLVED, "")
    assert three["trials"] == 6 and three["images"] == 60.0 and three["seeds"] == 3
    four = seed_median([seed_run(40, 50), seed_run(70, 80), seed_run(50, 60), seed_run(60, 70)])
    assert (four["emm"], four["high"]) == (50, 60)              # even K: the lower of the two middle seeds
    # the median bracket holds the median of any true EMMs inside the seeds' own brackets
    spread = [seed_run(50, 60), seed_run(50, 100), seed_run(70, 80)]
    median = seed_median(spread)
    for truths in itertools.product(range(50, 60), range(50, 100), range(70, 80)):
        assert median["emm"] <= sorted(truths)[1] < median["high"]
    assert (median["emm"], median["high"]) == (50, 80)


def test_one_seed_is_that_seeds_summary():
    for run in (seed_run(40, 50), seed_run(200, None, AT_LEAST_MAX), seed_run(None, 10, BELOW_MIN),
                seed_run(40, 120, UNRESOLVED), seed_run(40, None, OPEN)):
        row = seed_median([run])
        assert {k: row[k] for k in run} == run
        assert (row["interval_low"], row["interval_high"], row["seeds"]) == (run["emm"], run["high"], 1)
        assert row["censored"] == (run["status"] if run["status"] not in (RESOLVED, OPEN) else "")
    assert interval_level(1) == 0 and interval_level(3) == 0.75 and interval_level(5) == 1 - 1 / 16


def test_a_censored_median_is_censored_and_a_censored_minority_widens_the_interval():
    at_max = seed_median([seed_run(200, None, AT_LEAST_MAX), seed_run(50, 60), seed_run(200, None, AT_LEAST_MAX)])
    assert (at_max["censored"], at_max["emm"], at_max["high"]) == (AT_LEAST_MAX, 200, None)
    assert at_max["interval_high"] is None
    below = seed_median([seed_run(None, 10, BELOW_MIN), seed_run(None, 10, BELOW_MIN), seed_run(50, 60)])
    assert (below["censored"], below["emm"], below["high"], below["interval_low"]) == (BELOW_MIN, None, 10, None)
    minority = seed_median([seed_run(None, 10, BELOW_MIN), seed_run(50, 60), seed_run(200, None, AT_LEAST_MAX)])
    assert (minority["censored"], minority["emm"], minority["high"]) == ("", 50, 60)
    assert (minority["interval_low"], minority["interval_high"]) == (None, None)
    # K = 2: the lower median is the smaller seed, so one seed >= max is not enough, one seed < min is
    assert seed_median([seed_run(200, None, AT_LEAST_MAX), seed_run(50, 60)])["censored"] == ""
    assert seed_median([seed_run(None, 10, BELOW_MIN), seed_run(50, 60)])["censored"] == BELOW_MIN


def test_any_unresolved_seed_makes_the_grid_point_unresolved_and_any_open_one_open():
    failed = seed_median([seed_run(40, 120, UNRESOLVED), seed_run(50, 60), seed_run(60, 70)])
    assert (failed["censored"], failed["status"], failed["error"]) == (UNRESOLVED, UNRESOLVED, "boom")
    assert failed["emm"] == 50                     # the median still, as one unresolved seed's EMM is its low
    running = seed_median([seed_run(40, 120, UNRESOLVED), seed_run(50, None, OPEN), seed_run(60, 70)])
    assert (running["status"], running["censored"]) == (OPEN, "")


# ---------------------------------------------------------------------------------- the search state
def seed_curve(grid_index, size, seed):
    """Grid point g, seed s: memorizes up to 40 + 10 s (+ 60 for grid point 1)."""
    return 0.95 if size <= 40 + 10 * seed + 60 * grid_index else 0.3


def test_each_seed_is_its_own_search_and_the_grid_point_takes_their_median():
    state = EMMSearchState(POINTS, SIZES, (10, 200), seeds=3)
    assert [state.replicate(b) for b in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert state.bracket_index(1, 2) == 5
    with pytest.raises(ValueError):
        state.bracket_index(0, 3)
    first = state.propose(6)
    assert sorted(b for b, _ in first) == [0, 1, 2, 3, 4, 5]    # one probe per (grid point, seed) first
    simulate(state, seed_curve, 4)
    rows = state.summary()
    assert [[r["emm"] for r in row["replicates"]] for row in rows] == [[40, 50, 60], [100, 110, 120]]
    assert [(row["emm"], row["interval_low"], row["interval_high"]) for row in rows] == [(50, 40, 70), (110, 100, 130)]
    assert rows[0]["trials"] == sum(r["trials"] for r in rows[0]["replicates"])
    restored = EMMSearchState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored.seeds == 3 and restored.summary() == rows


def test_a_state_saved_before_seeds_restores_with_one_seed():
    state = EMMSearchState(POINTS, SIZES, (10, 200))
    simulate(state, seed_curve, 2)
    saved = state.to_dict()
    del saved["seeds"]                         # what version 1 wrote before --seeds
    assert EMMSearchState.from_dict(saved).summary() == state.summary()
    saved["seeds"] = 2
    with pytest.raises(ValueError, match="4 brackets saved for 2 grid points with 1 seeds|2 brackets saved"):
        EMMSearchState.from_dict(saved)
    with pytest.raises(ValueError, match="seeds"):
        EMMSearchState(POINTS, SIZES, (10, 200), seeds=0)


def test_k_seeds_cost_at_most_k_times_the_trainings_of_one():
    """Seeds 1..K-1 start from what seed 0 found (bisection.py, start_range), so they cost less than seed 0 did;
    --estimate simulates the search itself, so it counts that."""
    def flat(grid_index, size, seed):
        return 0.95 if size <= 70 else 0.3
    one, three = EMMSearchState(POINTS, SIZES, (10, 200)), EMMSearchState(POINTS, SIZES, (10, 200), seeds=3)
    simulate(one, flat, 1), simulate(three, flat, 1)
    once, thrice = (sum(r["trials"] for r in state.summary()) for state in (one, three))
    assert once < thrice < 3 * once
    assert [r["emm"] for r in three.summary()] == [r["emm"] for r in one.summary()] == [70, 70]


# ---------------------------------------------------------------------------------- the searcher and the ledger
def drive(searcher, ratio, limit=500):
    """Tune's loop, one trial at a time; returns the configs that were launched (trained)."""
    launched = []
    for n in range(limit):
        config = searcher.suggest(f"t{n}")
        if config == Searcher.FINISHED:
            return launched
        assert config is not None
        launched.append(config)
        searcher.on_trial_complete(f"t{n}", {"best_mem_ratio": ratio(config), "images_seen": 100})
    raise AssertionError("the searcher did not finish")


def curve_of(config):
    return seed_curve(config["grid_index"], config["size"], config["seed_index"])


def test_seed_s_trains_with_train_seed_plus_s_and_seed_0_is_the_one_seed_training():
    searcher = EMMSearcher(POINTS, SIZES, (10, 200), seeds=3, base_seed=BASE_SEED,
                           known_results=None, max_concurrent=6)
    configs = [searcher.suggest(f"t{i}") for i in range(6)]
    by_seed = {(c["grid_index"], c["seed_index"]): c for c in configs}
    assert by_seed[(0, 0)]["overrides"] == POINTS[0]["overrides"]
    assert by_seed[(0, 2)]["overrides"] == {**POINTS[0]["overrides"], "train.seed": BASE_SEED + 2}
    assert all(c["seeds"] == 3 for c in configs)
    with pytest.raises(ValueError, match="base_seed"):
        EMMSearcher(POINTS, SIZES, (10, 200), seeds=2)


def test_the_ledger_key_differs_by_seed_and_seed_0_is_a_one_seed_sweeps_training(tmp_path):
    import sweeps.trainable as trainable
    from sweeps.spec import trial_settings
    base = load_config("experiments/digits.yaml").to_dict()
    settings = trial_settings(a_sweep(base=base, ledger=str(tmp_path / "l.sqlite")), tmp_path)
    one = EMMSearcher(POINTS, SIZES, (10, 200)).probe_config(0, 20)
    three = EMMSearcher(POINTS, SIZES, (10, 200), seeds=3, base_seed=base["train"]["seed"])
    keys = [trainable.trial_key(settings, three.probe_config(three.state.bracket_index(0, s), 20)) for s in range(3)]
    assert keys[0][0] == trainable.trial_key(settings, one)[0]
    assert len({key for key, _, _ in keys}) == 3
    assert [resolved["train"]["seed"] for _, resolved, _ in keys] == [base["train"]["seed"] + s for s in range(3)]


def test_the_ledger_answers_seed_0_from_a_one_seed_sweep_and_raising_k_trains_mostly_the_new_seeds(tmp_path):
    import sweeps.trainable as trainable
    from sweeps.spec import trial_settings
    base = load_config("experiments/digits.yaml").to_dict()
    settings = trial_settings(a_sweep(base=base, ledger=str(tmp_path / "l.sqlite")), tmp_path)
    ledger = {}                                    # ledger key -> record, as the results ledger holds them

    def sweep(seeds):
        searcher = EMMSearcher(POINTS, SIZES, (10, 200), seeds=seeds, base_seed=base["train"]["seed"],
                               known_results=lambda config: ledger.get(trainable.trial_key(settings, config)[0]))
        launched = drive(searcher, curve_of)
        for config in launched:                    # each finished training is recorded
            ledger[trainable.trial_key(settings, config)[0]] = {"best_mem_ratio": curve_of(config),
                                                                 "best_num_samples": 256}
        return searcher, {(c["grid_index"], c["seed_index"]) for c in launched}

    one, trained = sweep(1)
    assert trained == {(0, 0), (1, 0)}
    searcher, trained = sweep(3)
    # seed 0 is answered by the one-seed sweep's trainings wherever it asks for the same sizes; planning three
    # seeds at once (and when its neighbours' answers arrive, bisection.py start_range) may ask for a few others
    reused = [(searcher.state.replicate(b), size) for b, size in searcher.from_ledger]
    assert {seed for (_, seed), _ in reused} == {0} and len(reused) >= 2
    assert {s for _, s in trained} == {0, 1, 2}
    assert [row["replicates"][0]["emm"] for row in searcher.state.summary()] == \
        [row["emm"] for row in one.state.summary()]
    assert [row["emm"] for row in searcher.state.summary()] == [50, 110]
    _, trained = sweep(4)
    assert {s for _, s in trained} <= {0, 3} and (0, 3) in trained and (1, 3) in trained   # mostly the new seed


def test_a_restarted_trial_is_adopted_into_its_own_seeds_bracket():
    searcher = EMMSearcher(POINTS, SIZES, (10, 200), seeds=2, base_seed=BASE_SEED, max_concurrent=2)
    first, second = searcher.suggest("a"), searcher.suggest("b")
    assert (first["grid_index"], first["seed_index"]) != (second["grid_index"], second["seed_index"])
    flat = {"best_mem_ratio": 0.2, "config/grid_index": second["grid_index"],
            "config/seed_index": second["seed_index"], "config/size": second["size"]}
    searcher.on_trial_complete("restarted", flat)  # Tune gave trial b a new id
    assert "b" not in searcher._running and "a" in searcher._running
    bracket = searcher.state.bracket_index(second["grid_index"], second["seed_index"])
    assert searcher.state.brackets[bracket].observations[0][:3] == (second["size"], 0.2, False)
    old = {"best_mem_ratio": 0.2, "config/grid_index": 0, "config/size": 20}   # a trial of before seeds: seed 0
    assert searcher._adopt("older", old) == (searcher.state.bracket_index(0, 0), 20)
    assert searcher._adopt("bad", {**old, "config/seed_index": 2}) is None


# ---------------------------------------------------------------------------------- outputs
def finished_summary(seeds=3):
    state = EMMSearchState(POINTS, SIZES, (10, 200), seeds=seeds)
    simulate(state, seed_curve, 4)
    return state.summary()


def test_the_emm_table_gives_the_spread_and_says_which_neighbours_are_apart():
    from sweeps.results import emm_table, markdown_table, trials_from_search
    summary = finished_summary()
    near = finished_summary()[0] | {"label": "p=2", "value": 2}       # the same seeds' answers as p=0
    summary = summary + [near]
    trials = trials_from_search(summary, pd.DataFrame(), 0.1)
    assert sorted(set(trials.seed)) == [0, 1, 2] and (trials.status == "from_ledger").all()
    emm = emm_table("p", summary, trials)
    assert list(emm.seed_emms) == ["40 50 60", "100 110 120", "40 50 60"]
    assert list(emm.seeds) == [3, 3, 3] and list(emm.emm) == [50, 110, 50]
    assert (list(emm.interval_low), list(emm.interval_high)) == ([40, 100, 40], [70, 130, 70])
    assert list(emm.distinguishable_from_previous) == [None, True, True]
    assert emm.trainings.sum() == 0 and emm.from_ledger.sum() == len(trials)
    text = markdown_table(emm, 0.1)
    assert "| 1 | 110 | 100 110 120 | [100, 130) | distinguishable | [110, 120) |" in text, text
    assert "nominal 75% for the median seed's EMM" in text
    overlapping = emm_table("p", [summary[0], summary[0] | {"label": "p=3", "value": 3, "interval_low": 60,
                                                            "interval_high": 90}], trials)
    assert list(overlapping.distinguishable_from_previous) == [None, False]
    assert "| not distinguishable |" in markdown_table(overlapping, 0.1)


def test_censored_seeds_read_as_such_in_the_table():
    from sweeps.results import seed_emm_text
    assert [seed_emm_text(seed_median([r])["replicates"][0]) for r in (
        seed_run(50, 60), seed_run(200, None, AT_LEAST_MAX), seed_run(None, 10, BELOW_MIN),
        seed_run(40, 60, UNRESOLVED), seed_run(40, None, OPEN))] == ["50", ">=200", "<10", "unresolved", "open"]


def test_written_results_tensorboard_and_names_say_the_seed(tmp_path):
    from sweeps.results import emm_table, trials_from_search, write_results
    from sweeps.tblog import seed_tag, trial_hparams, trial_label, training_run
    summary = finished_summary(seeds=2)
    trials = trials_from_search(summary, pd.DataFrame(), 0.1)
    emm = emm_table("p", summary, trials)
    write_results(tmp_path, "p", emm, trials, POINTS, 0.1)
    written = pd.read_csv(tmp_path / "emm.csv")
    assert {"seeds", "seed_emms", "interval_low", "interval_high", "distinguishable_from_previous"} <= set(written)
    assert "seed" in pd.read_csv(tmp_path / "trials.csv") and (tmp_path / "emm.png").stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard" / "summary"))
    events.Reload()
    assert {"emm/p=0/seed=0/memorization_ratio", "emm/p=0/seed=1/memorization_ratio"} <= set(events.Tags()["scalars"])

    config = {"grid_label": "p=0", "size": 40, "seed_index": 1, "seeds": 2, "overrides": {"train.seed": 1025}}
    assert (seed_tag(config), trial_label(config), training_run(config)) == (
        "seed=1", "p=0|D|=40|seed=1", "p=0/D=40_seed=1")
    assert trial_hparams(config) == {"grid point": "p=0", "|D|": 40.0, "seed": 1.0}   # not train.seed: seed 0 has none
    one = {**config, "seed_index": 0, "seeds": 1, "overrides": {}}   # a one-seed sweep: names as before
    assert (seed_tag(one), trial_label(one), training_run(one)) == ("", "p=0|D|=40", "p=0/D=40")
    assert "seed" not in trial_hparams(one)


def test_status_shows_each_seed(tmp_path):
    from sweeps.searcher import SAVE_FORMAT, SAVE_VERSION
    from sweeps.status import sweep_status
    (tmp_path / "tune").mkdir()
    spec = {"version": 2, "format": "diffmem.emm_search", "factor": "p", "values": [0, 1], "grid_points": POINTS,
            "base": {"eval": {"num_samples": 256}}, "config_file": "c.yaml", "epsilon": 0.1, "tolerance": 0.1,
            "size_range": [10, 200], "allowed_sizes": SIZES, "workers": 1, "gpus_per_worker": 0, "ddp": False,
            "max_failures": 2, "max_concurrent": 2, "ledger": str(tmp_path / "l.sqlite"), "no_reuse": False,
            "seeds": 3}
    (tmp_path / "sweep.json").write_text(json.dumps(spec))
    state = EMMSearchState(POINTS, SIZES, (10, 200), seeds=3)
    simulate(state, seed_curve, 4)
    saved = {"format": SAVE_FORMAT, "version": SAVE_VERSION, "metric": "best_mem_ratio", "state": state.to_dict(),
             "running": {}, "completed": [], "reused": [[state.bracket_index(1, 2), 100]]}
    (tmp_path / "tune" / "searcher-state-2026-01-01_00-00-00.pkl").write_text(json.dumps(saved))
    text = sweep_status(tmp_path)
    assert "seeds' EMMs 40 50 60; interval [40, 70)" in text, text
    assert "seed 2: resolved [120, 130); " in text and "(1 from the ledger)" in text, text
    assert math.isclose(interval_level(3), 0.75)


# ---------------------------------------------------------------------------------- through Ray
@pytest.mark.slow
def test_a_two_seed_sweep_trains_only_the_new_seed_over_a_one_seed_sweeps_ledger(smoke_sweep, tmp_path):
    """--seeds 2 on the ledger of the session's one-seed smoke sweep: seed 0 is answered by that ledger (only a
    size the one-seed search never asked is trained), seed 1 is trained, and every output carries both seeds."""
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    first, _, _ = smoke_sweep
    shutil.copy(first / "ledger.sqlite", tmp_path / "ledger.sqlite")   # the fixture's ledger stays as it was
    out = tmp_path / "two"
    search = str(Path(__file__).resolve().parent.parent / "sweeps" / "emm_search.py")
    run = subprocess.run([sys.executable, search, "--preset", "smoke", "--no-dashboard", "--seeds", "2", "--values",
                          "none", "--output", str(out), "--ledger", str(tmp_path / "ledger.sqlite")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"random_labels=\w+\|D\|=\d+\|seed=1 +best ratio", run.stdout), run.stdout[-2000:]
    emm, trials = pd.read_csv(out / "emm.csv"), pd.read_csv(out / "trials.csv")
    assert (emm.seeds == 2).all() and all(len(str(s).split()) == 2 for s in emm.seed_emms)
    assert (emm.interval_low.fillna(0) <= emm.emm.fillna(0)).all()
    seed0, seed1 = trials[trials.seed == 0], trials[trials.seed == 1]
    assert (seed1.status == "done").all() and len(seed1) >= len(emm)
    trained_before = set(zip(*pd.read_csv(first / "trials.csv")[["grid_label", "size"]].values.T))
    assert (seed0.status == "from_ledger").sum() >= len(emm)
    retrained = seed0[seed0.status == "done"]
    assert not set(zip(retrained.grid_label, retrained["size"])) & trained_before     # nothing trained twice
    assert emm.trainings.sum() == (trials.status == "done").sum()
    assert "seeds' EMMs" in subprocess.run([sys.executable, search, "--status", str(out)], capture_output=True,
                                           text=True).stdout

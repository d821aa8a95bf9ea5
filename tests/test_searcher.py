"""The EMM search: state machine on known curves, a property test, and one run through real Ray Tune."""
from __future__ import annotations

import itertools
import json
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sweeps.bisection import AT_LEAST_MAX, BELOW_MIN, RESOLVED, UNRESOLVED, EMMSearchState
from sweeps.bisection import load_experiment_state
from sweeps.searcher import EMMSearcher

SIZES = list(range(10, 5001, 10))        # class-balanced CIFAR-10 subsets: multiples of 10


def step_curve(threshold):
    """A monotone memorization curve: ratio 1 up to `threshold`, then well below 1 - epsilon."""
    return lambda size: 0.99 if size <= threshold else 0.4


def smooth_curve(emm_size, slope=3.0):
    """Logistic in log|D| that crosses 0.9 exactly at emm_size (shape of paper.md §5 tables)."""
    return lambda size: 1 / (1 + math.exp(slope * math.log(size / emm_size) - math.log(9)))


def truth(curve, allowed, epsilon=0.1):
    """Largest allowed size that memorizes (None if none does)."""
    memorizing = [s for s in allowed if curve(s) >= 1 - epsilon]
    return max(memorizing) if memorizing else None


def grid(labels):
    return [{"label": f"g={v}", "value": v, "overrides": {"data.label_classes": v}} for v in labels]


def run_rounds(state, curves, workers, shuffle_seed=None, save_restore_at=None):
    """Synchronous rounds: fill the free workers, then complete every running probe (optionally in a
    shuffled order). Returns (state, number of rounds)."""
    rng = random.Random(shuffle_seed)
    rounds = 0
    while not state.finished:
        probes = state.propose(workers - state.pending_count())
        assert probes, "search stalled: nothing running, nothing proposed"
        for g, size in probes:
            state.start(g, size)
        if shuffle_seed is not None:
            rng.shuffle(probes)
        for g, size in probes:
            state.observe(g, size, curves[g](size), images=size * 40_000)
        rounds += 1
        if rounds == save_restore_at:
            state = EMMSearchState.from_dict(json.loads(json.dumps(state.to_dict())))
        assert rounds < 200
    return state, rounds


def assert_matches_truth(row, true_emm, allowed, tolerance=0.1):
    if true_emm is None:
        assert row["censored"] == BELOW_MIN and row["emm"] is None
    elif true_emm == allowed[-1]:
        assert row["censored"] == AT_LEAST_MAX and row["emm"] == allowed[-1]
    else:
        low, high = row["emm"], row["high"]
        assert row["censored"] == "" and row["status"] == RESOLVED
        assert low <= true_emm < high, row
        assert high <= (1 + tolerance) * low or allowed.index(high) == allowed.index(low) + 1
        assert row["emm"] == low


# ---------------------------------------------------------------------------------- state machine
@pytest.mark.parametrize("workers", [1, 2, 5])
def test_finds_emm_on_monotone_curves(workers):
    curves = [step_curve(1234), smooth_curve(2500), step_curve(70)]
    state = EMMSearchState(grid([1, 2, 3]), SIZES, (50, 5000))
    state, _ = run_rounds(state, curves, workers, shuffle_seed=workers)
    for row, curve in zip(state.summary(), curves):
        assert_matches_truth(row, truth(curve, SIZES), SIZES)
        assert row["trials"] == len(row["observations"])
        assert row["images"] == sum(s * 40_000 for s, *_ in row["observations"])


def test_bracket_expands_past_the_initial_range():
    curves = [step_curve(3000), step_curve(45)]           # above (100, 400), below (1000, 4000)
    up = EMMSearchState(grid([1]), SIZES, (100, 400))
    up, _ = run_rounds(up, curves[:1], 1)
    down = EMMSearchState(grid([1]), SIZES, (1000, 4000))
    down, _ = run_rounds(down, curves[1:], 1)
    (row_up,), (row_down,) = up.summary(), down.summary()
    assert_matches_truth(row_up, 3000, SIZES)
    assert max(s for s, *_ in row_up["observations"]) > 400
    assert_matches_truth(row_down, 40, SIZES)
    assert min(s for s, *_ in row_down["observations"]) < 1000


def test_censored_at_both_ends():
    state = EMMSearchState(grid([1, 2]), SIZES, (100, 1000))
    state, _ = run_rounds(state, [step_curve(10 ** 6), step_curve(5)], 2)
    high_end, low_end = state.summary()
    assert (high_end["censored"], high_end["emm"]) == (AT_LEAST_MAX, 5000)
    assert (low_end["censored"], low_end["emm"], low_end["high"]) == (BELOW_MIN, None, 10)


def test_k_section_uses_idle_workers():
    curves = [step_curve(1234), step_curve(3333)]
    first = EMMSearchState(grid([1, 2]), SIZES, (10, 5000)).propose(6)
    assert len(first) == 6 and len(set(first)) == 6
    assert sorted(g for g, _ in first) == [0, 0, 0, 1, 1, 1]   # three probes per grid point at once
    sizes = sorted(s for g, s in first if g == 0)
    log_steps = [math.log(b / a) for a, b in zip([10] + sizes, sizes + [5000])]
    assert max(log_steps) < 1.1 * min(log_steps) + 0.05        # four equal parts in log |D|
    _, rounds_bisection = run_rounds(EMMSearchState(grid([1, 2]), SIZES, (10, 5000)), curves, 2)
    state, rounds_k_section = run_rounds(EMMSearchState(grid([1, 2]), SIZES, (10, 5000)), curves, 6)
    assert rounds_k_section < rounds_bisection
    for row, curve in zip(state.summary(), curves):
        assert_matches_truth(row, truth(curve, SIZES), SIZES)


def test_extra_workers_go_to_the_widest_bracket():
    state = EMMSearchState(grid([1, 2]), SIZES, (100, 5000))
    for g, size, ratio in [(0, 1000, 0.95), (0, 1300, 0.5), (1, 100, 0.95), (1, 4000, 0.5)]:
        state.observe(g, size, ratio)      # grid point 0: bracket 1000..1300, grid point 1: 100..4000
    proposals = state.propose(4)
    assert sorted(g for g, _ in proposals) == [0, 1, 1, 1]


def test_save_restore_mid_search_gives_the_same_answer():
    curves = [step_curve(1234), smooth_curve(777), step_curve(10 ** 6)]
    straight, _ = run_rounds(EMMSearchState(grid([1, 2, 3]), SIZES, (100, 2000)), curves, 3)
    resumed, _ = run_rounds(EMMSearchState(grid([1, 2, 3]), SIZES, (100, 2000)), curves, 3, save_restore_at=2)
    assert resumed.summary() == straight.summary()


def test_state_rejects_unknown_format_version():
    d = EMMSearchState(grid([1]), SIZES, (100, 2000)).to_dict()
    d["version"] = 99
    with pytest.raises(ValueError, match="version"):
        EMMSearchState.from_dict(d)


def test_a_state_saved_before_the_rename_of_max_failures_restores():
    """Searcher snapshots of sweeps started before unresolved_after had its name (same format version) resume."""
    d = EMMSearchState(grid([1]), SIZES, (100, 2000), unresolved_after=3).to_dict()
    d["settings"]["max_failures"] = d["settings"].pop("unresolved_after")
    assert EMMSearchState.from_dict(d).settings.unresolved_after == 3


def test_non_monotone_noise_uses_largest_memorized_size_below_smallest_failure():
    state = EMMSearchState(grid([1]), SIZES, (100, 1000))
    for size, ratio in [(300, 0.95), (200, 0.5), (100, 0.97), (150, 0.92)]:   # 300 memorizes above a failure
        state.observe(0, size, ratio)
    row = state.summary()[0]
    assert (row["emm"], row["high"]) == (150, 200)
    assert all(s not in (100, 150, 200, 300) for _, s in state.propose(4))


def test_out_of_order_and_late_results():
    state = EMMSearchState(grid([1]), SIZES, (100, 1000))
    probes = state.propose(3)
    for g, s in probes:
        state.start(g, s)
    small, middle, large = sorted(s for _, s in probes)
    state.observe(0, large, 0.3)                # completes first
    state.observe(0, small, 0.99)
    assert set(s for _, s in state.propose(3)).isdisjoint({small, middle, large})
    state.observe(0, middle, 0.99)              # arrives last
    state, _ = run_rounds(state, [step_curve(middle + 10)], 2)
    assert state.summary()[0]["status"] == RESOLVED
    trials_before = state.summary()[0]["trials"]
    state.observe(0, 100, 0.99)                 # a result for an already resolved grid point is recorded
    assert state.summary()[0]["trials"] == trials_before + 1 and state.finished


def test_irregular_allowed_sizes_and_snapping():
    allowed = [10, 30, 70, 150, 400, 1000, 2200]
    state = EMMSearchState(grid([1]), allowed, (12, 900))        # snaps to (10, 1000)
    assert state.settings.to_dict()["size_range"] == [10, 1000]
    seen = []
    while not state.finished:
        for g, s in state.propose(2 - state.pending_count()):
            assert s in allowed and s not in seen
            seen.append(s)
            state.start(g, s)
            state.observe(g, s, 0.95 if s <= 150 else 0.2)
    assert (state.summary()[0]["emm"], state.summary()[0]["high"]) == (150, 400)


def test_failures_make_a_grid_point_unresolved_while_others_finish():
    state = EMMSearchState(grid([1, 2]), SIZES, (100, 2000), unresolved_after=2)
    curve = step_curve(1234)
    for _ in range(100):
        if state.finished:
            break
        for g, size in state.propose(2 - state.pending_count()):
            state.start(g, size)
            if g == 0:                                      # every training of grid point 0 crashes
                state.fail(g, size, "CUDA out of memory")
            else:
                state.observe(g, size, curve(size))
    broken, healthy = state.summary()
    assert broken["censored"] == UNRESOLVED and "CUDA out of memory" in broken["error"]
    assert broken["trials"] >= 2 and broken["observations"] == []
    assert_matches_truth(healthy, 1230, SIZES)


def test_one_failure_frees_the_size_for_another_try():
    state = EMMSearchState(grid([1]), SIZES, (100, 1000))
    (g, size), = state.propose(1)
    state.start(g, size)
    state.fail(g, size, "preempted")
    assert state.propose(1) == [(g, size)]
    assert state.summary()[0]["censored"] == ""


# ---------------------------------------------------------------------------------- searcher (no cluster)
def make_searcher(**kwargs):
    kwargs = {"grid_points": grid([1, 2]), "allowed_sizes": SIZES, "size_range": (100, 2000),
              "max_concurrent": 2, **kwargs}
    return EMMSearcher(**kwargs)


def result_for(curves, config):
    size = config["size"]
    return {"best_mem_ratio": curves[config["grid_index"]](size), "images_seen": size * 10}


def drive(searcher, curves, ids, running=None, limit=300):
    """Tune's loop, sequentially: ask for trials until None, then complete the oldest running one."""
    running = [] if running is None else running
    for _ in range(limit):
        trial_id = f"t{next(ids)}"
        config = searcher.suggest(trial_id)
        if config == EMMSearcher.FINISHED:
            return
        if config is not None:
            running.append((trial_id, config))
            continue
        trial_id, config = running.pop(0)
        searcher.on_trial_complete(trial_id, result_for(curves, config))
    raise AssertionError("searcher did not finish")


def test_searcher_suggests_configs_within_max_concurrent():
    searcher = make_searcher(max_concurrent=3)
    configs = [searcher.suggest(f"t{i}") for i in range(5)]
    assert all(c is not None for c in configs[:3]) and configs[3:] == [None, None]
    assert configs[0]["overrides"] == {"data.label_classes": configs[0]["grid_value"]}
    assert set(configs[0]) == {"grid_index", "grid_label", "grid_value", "seed_index", "seeds", "overrides", "size"}
    searcher.on_trial_complete("t0", {"best_mem_ratio": 0.95, "images_seen": 100})
    assert searcher.suggest("t5") is not None


def test_searcher_finds_emm_and_finishes():
    curves = [step_curve(1234), step_curve(321)]
    searcher = make_searcher()
    drive(searcher, curves, itertools.count())
    rows = searcher.state.summary()
    for row, curve in zip(rows, curves):
        assert_matches_truth(row, truth(curve, SIZES), SIZES)
        assert row["images"] == sum(s * 10 for s, *_ in row["observations"])


def test_searcher_ignores_unknown_and_repeated_trial_ids():
    searcher = make_searcher()
    config = searcher.suggest("a")
    searcher.on_trial_complete("never-suggested", {"best_mem_ratio": 0.99})
    searcher.on_trial_complete("a", {"best_mem_ratio": 0.99, "images_seen": 5, "best_num_samples": 100})
    searcher.on_trial_complete("a", {"best_mem_ratio": 0.1, "images_seen": 5})   # repeated: ignored
    row = searcher.state.summary()[config["grid_index"]]
    assert row["observations"] == [(config["size"], 0.99, True, 100)] and row["images"] == 5


def test_searcher_adopts_restarted_trial_by_its_config():
    searcher = make_searcher()
    config = searcher.suggest("old")
    flat = {"best_mem_ratio": 0.2, "config/grid_index": config["grid_index"], "config/size": config["size"]}
    searcher.on_trial_complete("restarted", flat)               # Tune gave the trial a new id
    assert searcher.state.pending_count() == 0 and "old" not in searcher._running
    assert searcher.state.summary()[config["grid_index"]]["observations"][0][2] is False


def test_searcher_error_and_missing_metric_count_as_failures():
    searcher = make_searcher(unresolved_after=2)
    config = searcher.suggest("a")
    searcher.on_trial_complete("a", error=True)
    again = searcher.suggest("b")
    assert (again["grid_index"], again["size"]) == (config["grid_index"], config["size"])
    searcher.on_trial_complete("b", {"images_seen": 3})          # no metric reported
    row = searcher.state.summary()[config["grid_index"]]
    assert row["censored"] == UNRESOLVED and "best_mem_ratio" in row["error"]


def test_searcher_stopped_before_running_is_proposed_again():
    searcher = make_searcher(max_concurrent=1)
    config = searcher.suggest("a")
    searcher.on_trial_complete("a")                              # PENDING trial stopped: no result, no error
    again = searcher.suggest("b")
    assert (again["grid_index"], again["size"]) == (config["grid_index"], config["size"])
    assert searcher.state.summary()[config["grid_index"]]["trials"] == 0


def test_searcher_save_restore_mid_search(tmp_path):
    curves = [step_curve(1234), smooth_curve(600)]
    reference = make_searcher()
    drive(reference, curves, itertools.count())

    searcher, ids, running = make_searcher(), itertools.count(), []
    for _ in range(6):                                           # a few trials done, two left running
        while (config := searcher.suggest(trial_id := f"t{next(ids)}")) not in (None, EMMSearcher.FINISHED):
            running.append((trial_id, config))
        trial_id, config = running.pop(0)
        searcher.on_trial_complete(trial_id, result_for(curves, config))
    path = tmp_path / "searcher-state.pkl"
    searcher.save(str(path))
    restored = make_searcher(size_range=(10, 20))                # restore replaces the constructor's state
    restored.restore(str(path))
    assert restored.to_dict() == searcher.to_dict()
    drive(restored, curves, ids, running=running)                # the running trials come back (RESUME)
    assert [r["emm"] for r in restored.state.summary()] == [r["emm"] for r in reference.state.summary()]


def test_searcher_pickles_by_reference():
    import cloudpickle
    data = cloudpickle.dumps(make_searcher())
    assert b"sweeps.searcher" in data and cloudpickle.loads(data).state.summary()


# ---------------------------------------------------------------------------------- property test
@st.composite
def scenarios(draw):
    allowed = sorted(draw(st.sets(st.integers(1, 300), min_size=1, max_size=40)))
    allowed = [10 * a for a in allowed]
    lo = draw(st.integers(1, 3000))
    hi = draw(st.integers(lo, 3000))
    thresholds = draw(st.lists(st.integers(0, 3100), min_size=1, max_size=4))
    return {"allowed": allowed, "range": (lo, hi), "thresholds": thresholds,
            "tolerance": draw(st.sampled_from([0.05, 0.1, 0.5])),
            "workers": draw(st.integers(1, 8)),
            "failure_rate": draw(st.sampled_from([0.0, 0.0, 0.2, 0.5])),
            "save_rate": draw(st.sampled_from([0.0, 0.3])),
            "seed": draw(st.integers(0, 2 ** 32 - 1))}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_property_random_orders_failures_and_restores(case):
    rng = random.Random(case["seed"])
    allowed, thresholds = case["allowed"], case["thresholds"]
    state = EMMSearchState([{"label": str(t), "value": t} for t in thresholds], allowed, case["range"],
                           tolerance=case["tolerance"], unresolved_after=2)
    running = []                       # (grid_index, size) in flight
    observed = {g: set() for g in range(len(thresholds))}
    steps, bound = 0, 20 * len(allowed) * len(thresholds) + 50
    while not (state.finished and not running):
        steps += 1
        assert steps < bound, "search did not end"
        if rng.random() < case["save_rate"]:
            state = EMMSearchState.from_dict(json.loads(json.dumps(state.to_dict())))
        free = case["workers"] - len(running)
        probes = state.propose(free) if not state.finished else []
        assert len(probes) <= max(free, 0)
        for g, size in probes:
            assert size in allowed
            assert size not in observed[g] and (g, size) not in running
            assert probes.count((g, size)) == 1
            state.start(g, size)
            running.append((g, size))
        if not running:
            assert state.finished, "stalled: nothing running and nothing proposed"
            continue
        g, size = running.pop(rng.randrange(len(running)))          # random completion order
        if rng.random() < case["failure_rate"]:
            state.fail(g, size, "boom")
        else:
            ratio = rng.uniform(0.9, 1.0) if size <= thresholds[g] else rng.uniform(0.0, 0.89)
            state.observe(g, size, ratio)
            observed[g].add(size)
    for row, threshold in zip(state.summary(), thresholds):
        if row["censored"] == UNRESOLVED:
            assert case["failure_rate"] > 0
            continue
        true_emm = max([s for s in allowed if s <= threshold], default=None)
        assert_matches_truth(row, true_emm, allowed, case["tolerance"])


# ---------------------------------------------------------------------------------- through Ray Tune
def curve_for_ray(size, grid_value):
    """Coarse step curves: EMM 120 for grid value 1, 450 for grid value 2."""
    return 0.97 if size <= {1: 120, 2: 450}[grid_value] else 0.3


def memorization_trainable(config):
    from ray import tune
    size = config["size"]
    tune.report({"best_mem_ratio": curve_for_ray(size, config["grid_value"]), "images_seen": size * 10})


@pytest.mark.slow
def test_end_to_end_through_ray_tune(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    import sys

    from ray import cloudpickle, tune

    from sweeps.progress import ProgressPrinter

    # pytest imports this file as a top-level module the Ray workers cannot import: ship it by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    searcher = EMMSearcher(grid_points=grid([1, 2]), allowed_sizes=list(range(10, 1001, 10)),
                           size_range=(10, 1000), tolerance=0.5, max_concurrent=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(memorization_trainable, {"cpu": 1}),
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=2),
            run_config=tune.RunConfig(storage_path=str(tmp_path.resolve()), name="emm_e2e", verbose=0,
                                      callbacks=[ProgressPrinter(0.1, every=0)]))
        results = tuner.fit()
    finally:
        ray.shutdown()
    assert not results.errors
    # Tune calls the printer's periodic hook (on_step_end; it has no on_step) while trainings run
    assert "trainings finished; running: " in capsys.readouterr().out
    rows = searcher.state.summary()
    for row, value in zip(rows, (1, 2)):
        true_emm = {1: 120, 2: 450}[value]
        assert row["censored"] == "" and row["emm"] <= true_emm < row["high"] <= 1.5 * row["emm"]
    assert len(results) == sum(r["trials"] for r in rows)
    assert all(r["images"] == 10 * sum(s for s, *_ in r["observations"]) for r in rows)
    # Tune saved the searcher on its snapshots; the newest one holds the final state
    assert load_experiment_state(str(tmp_path / "emm_e2e")).summary() == rows


def test_a_trial_stopped_mid_training_is_not_an_answer_until_it_resumes():
    searcher = make_searcher()
    config = searcher.suggest("a")
    # Ctrl-C: Tune stops the trial and hands over its last intermediate result (done=False)
    searcher.on_trial_complete("a", {"best_mem_ratio": 0.2, "done": False})
    assert searcher.state.summary()[config["grid_index"]]["observations"] == []
    # after --resume the same trial finishes: that is the answer, counted once
    searcher.on_trial_complete("a", {"best_mem_ratio": 0.95, "done": True})
    row = searcher.state.summary()[config["grid_index"]]
    assert row["observations"] == [(config["size"], 0.95, True, 0)] and row["trials"] == 1   # 0: samples unknown
    # an intermediate result that already memorized is final at once
    other = searcher.suggest("b")
    searcher.on_trial_complete("b", {"best_mem_ratio": 0.95, "done": False})
    assert searcher.state.summary()[other["grid_index"]]["observations"][-1][1] == 0.95


def test_the_snapshot_name_read_without_ray_is_rays():
    """sweeps.bisection reads the searcher's snapshots without importing Ray (--status): the name must be Ray's."""
    from ray.tune.search import Searcher

    from sweeps.bisection import SEARCHER_STATE_FILES
    assert SEARCHER_STATE_FILES == Searcher.CKPT_FILE_TMPL.format("*")


def test_memorized_is_a_best_ratio_that_reached_one_minus_epsilon():
    """EMM's condition (paper.md §3), the one definition every reader of results uses (sweeps.bisection)."""
    from sweeps.bisection import memorized
    assert memorized(0.9, 0.1) and memorized(1.0, 0.1) and memorized(0.8, 0.2)
    assert not memorized(0.8999, 0.1) and not memorized(0.0, 0.5)

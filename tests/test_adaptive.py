"""The adaptive evaluation (diffmem/sequential.py, diffmem/evaluate.py): boundaries against exact rational
binomial tails written here, its error bound by simulation, and the evaluation itself: same seeds, same
order, the fixed evaluation's result whenever it does not stop early."""
from fractions import Fraction
from math import comb

import numpy as np
import pytest
import torch

from diffmem.config import ConfigError, EvalConfig, load_config
from diffmem.data import training_set
from diffmem.evaluate import evaluate_denoiser
from diffmem.optimum import EmpiricalOptimalDenoiser
from diffmem.sequential import SequentialTest, look_points


def upper_tail(n, q, x):   # P(Bin(n, q) >= x), exactly
    return sum(comb(n, j) * q ** j * (1 - q) ** (n - j) for j in range(x, n + 1))


def lower_tail(n, q, x):   # P(Bin(n, q) <= x), exactly
    return sum(comb(n, j) * q ** j * (1 - q) ** (n - j) for j in range(0, x + 1))


def test_looks_double_from_the_batch_and_end_at_all_samples():
    assert look_points(256, 64) == (64, 128, 256)
    assert look_points(10000, 1000) == (1000, 2000, 4000, 8000, 10000)
    assert look_points(256, 256) == (256,) and look_points(100, 300) == (100,)


@pytest.mark.parametrize("q, alpha, num_samples, batch", [(Fraction(9, 10), Fraction(1, 100), 256, 32),
                                                          (Fraction(1, 2), Fraction(1, 20), 90, 10),
                                                          (Fraction(99, 100), Fraction(1, 100), 400, 100)])
def test_boundaries_are_the_exact_binomial_tests_at_alpha_over_the_looks(q, alpha, num_samples, batch):
    test = SequentialTest.build(float(q), float(alpha), num_samples, batch)
    early = test.looks[:-1]
    level = alpha / len(early)
    for n, above, below in zip(early, test.above, test.below):
        want_above = next((x for x in range(n + 1) if upper_tail(n, q, x) <= level), n + 1)
        want_below = max((x for x in range(n + 1) if lower_tail(n, q, x) <= level), default=-1)
        assert (above, below) == (want_above, want_below), n
        # an early decision's own ratio lies on its side of q: the recorded best decides as the test did
        assert above == n + 1 or above / n > q
        assert below == -1 or below / n < q


def test_the_last_look_is_the_fixed_decision():
    test = SequentialTest.build(0.9, 0.01, 256, 64)
    assert test.decide(2, 231) is True and test.decide(2, 230) is False   # 230.4 = 0.9 * 256
    assert test.decide(0, 64) is True and test.decide(0, 40) is False and test.decide(0, 58) is None


def test_a_wrong_early_decision_is_rarer_than_the_stated_rate():
    """For true ratios on both sides of q (the worst case is next to it), the share of evaluations whose early
    decision contradicts the truth stays within alpha (with 4 Monte-Carlo standard errors of slack)."""
    rng = np.random.default_rng(0)
    q, alpha, runs = 0.9, 0.05, 20000
    test = SequentialTest.build(q, alpha, 1024, 64)
    for p in (0.80, 0.86, 0.89, 0.8999, 0.9, 0.91, 0.95):
        copies = np.cumsum(rng.random((runs, 1024)) < p, axis=1)   # the same samples in the same order
        wrong = np.zeros(runs, bool)
        open_ = np.ones(runs, bool)
        for k, n in enumerate(test.looks[:-1]):
            x = copies[:, n - 1]
            said_yes, said_no = open_ & (x >= test.above[k]), open_ & (x <= test.below[k])
            wrong |= said_no if p >= q else said_yes
            open_ &= ~(said_yes | said_no)
        assert wrong.mean() <= alpha + 4 * np.sqrt(alpha * (1 - alpha) / runs), p


def test_bad_error_rates_are_refused():
    for bad in (0, 0.5, -0.1, 1.0):
        with pytest.raises(ValueError, match="in \\(0, 0.5\\)"):
            SequentialTest.build(0.9, bad, 256, 64)
        with pytest.raises(ConfigError, match="eval.adaptive_error"):
            load_config("experiments/digits.yaml", {"eval.adaptive_error": bad})


@pytest.fixture(scope="module")
def digits():
    return training_set(load_config("experiments/digits.yaml", {"data.size": 40}).data)


def test_a_memorizing_denoiser_is_decided_at_the_first_look_on_the_fixed_seeds(digits):
    """The optimum copies every time. Looks at 32, 64, 128 at 0.5 % each: 32 of 32 is not enough
    (0.9^32 = 0.034), 64 of 64 is (0.9^64 = 0.0012), and those 64 samples are the fixed evaluation's first 64,
    bit for bit."""
    optimum = EmpiricalOptimalDenoiser(digits.images)
    common = dict(num_samples=128, batch_size=32, num_steps=6, memorized_at=0.9)
    adaptive = evaluate_denoiser(optimum, digits, EvalConfig(**common))
    fixed = evaluate_denoiser(optimum, digits, EvalConfig(**common, adaptive=False))
    assert adaptive.memorized is True and adaptive.stopped_early and len(adaptive.samples) == 64
    assert fixed.memorized is True and not fixed.stopped_early and len(fixed.samples) == 128
    assert torch.equal(adaptive.samples, fixed.samples[:64]) and torch.equal(adaptive.nn_index, fixed.nn_index[:64])
    assert adaptive.ratio == 1.0 and fixed.ratio == 1.0


def test_an_evaluation_that_never_stops_early_is_the_fixed_one(digits):
    """With boundaries no count can reach, every look is taken: the adaptive result is the fixed one."""
    optimum = EmpiricalOptimalDenoiser(digits.images)
    common = dict(num_samples=12, batch_size=3, num_steps=4, memorized_at=0.5, threshold=0.01)
    adaptive = evaluate_denoiser(optimum, digits, EvalConfig(**common, adaptive_error=1e-3))
    assert SequentialTest.build(0.5, 1e-3, 12, 3).above == (4, 7)   # 3 of 3 can never reach 4
    fixed = evaluate_denoiser(optimum, digits, EvalConfig(**common, adaptive=False))
    assert not adaptive.stopped_early and adaptive.ratio == fixed.ratio and adaptive.memorized == fixed.memorized
    for field in ("samples", "nn_ratio", "nn_index"):
        assert torch.equal(getattr(adaptive, field), getattr(fixed, field)), field

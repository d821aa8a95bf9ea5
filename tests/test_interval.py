"""The interval on a memorization ratio (diffmem.memorization.ratio_interval): Wilson's score interval, against
an independent writing of its formula and against published values."""
import math

import pytest

from diffmem.sequential import ratio_interval

Z95 = 1.959963984540054   # the 0.975 quantile of the standard normal


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson (1927): the p with |k/n - p| = z sqrt(p (1 - p) / n), the roots of a quadratic in p."""
    a = 1 + z * z / n
    b = -(2 * k / n + z * z / n)
    c = (k / n) ** 2
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize("k, n, low, high", [
    (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (5, 10, 0.2366, 0.7634),     # n = 10: at 0 and n the far end
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605),                     # Newcombe (1998), Table II,
    (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),                            # method 3 (score, no correction)
    (256, 256, 0.9852, 1.0),                                                   # is z^2 / (n + z^2) away;
])
def test_wilson_against_known_values(k, n, low, high):
    got = ratio_interval(k, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_against_its_formula_and_bounds():
    for n in (1, 2, 16, 256, 10_000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            low, high = ratio_interval(k, n)
            assert (low, high) == pytest.approx(wilson(k, n), abs=1e-12)
            assert 0 <= low <= k / n <= high <= 1 and low < high
    assert ratio_interval(0, 5)[0] == 0.0 and ratio_interval(5, 5)[1] == 1.0        # exact ends
    # a wider level, a wider interval; more samples, a narrower one
    assert ratio_interval(90, 100, 0.99)[0] < ratio_interval(90, 100)[0] < ratio_interval(900, 1000)[0]


@pytest.mark.parametrize("args", [(3, 2), (-1, 10), (0, 0), (5, 10, 1.0), (5, 10, 0.0)])
def test_bad_input_is_refused(args):
    with pytest.raises(ValueError):
        ratio_interval(*args)

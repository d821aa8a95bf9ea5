"""The adaptive evaluation's sequential test (eval.adaptive): is the memorization ratio >= memorized_at?

A sweep asks one question of every snapshot: is its memorization ratio p (the share of copies among its
samples, paper §1) at least q = eval.memorized_at = 1 - epsilon? The fixed evaluation answers it from all
N = eval.num_samples seeds. The adaptive one samples the same seeds in the same order and looks at the copies
X_n among the first n at the looks n = B, 2B, 4B, ... (B = eval.batch_size) and finally N. At each look but
the last it stops when an exact one-sided binomial test at level alpha / K rejects one side:

    "memorized"      when P(Bin(n, q) >= X_n) <= alpha / K   (X_n at least `above[k]`)
    "not memorized"  when P(Bin(n, q) <= X_n) <= alpha / K   (X_n at most `below[k]`)

with K the number of early looks and alpha = eval.adaptive_error. The boundaries depend on (q, alpha, N, B)
only, so they are fixed before anything is sampled. At the last look the decision is the fixed evaluation's,
X_N / N >= q, on the very same samples: an evaluation that stops nowhere early is exactly today's.

Error rate. If p < q, "memorized" at look k has probability P(Bin(n_k, p) >= above[k]) <= P(Bin(n_k, q) >=
above[k]) <= alpha / K (the tail grows with p), so an early "memorized" is wrong with probability <= alpha
over all K looks (Bonferroni; no assumption on how the looks are correlated); the same for "not memorized"
when p >= q. So for every true ratio p, an early decision that contradicts the truth has probability <= alpha.
How often the early decision differs from what all N samples would have said is measured, worst case over p,
in bench/eval_adaptive.py. Doubling looks keep K ~ log2(N / B): a Bonferroni split over every batch would
make each look's boundary needlessly strict.

ratio_interval: the 95 % interval of a memorization ratio over its samples (Wilson; why, in its docstring).
"""
from __future__ import annotations

import math
from statistics import NormalDist
from dataclasses import dataclass


def look_points(num_samples: int, batch_size: int) -> tuple[int, ...]:
    """Samples seen at each look: B, 2B, 4B, ... below num_samples, then num_samples (whole seed batches, so
    the batches sampled are the fixed evaluation's)."""
    points, n = [], batch_size
    while n < num_samples:
        points.append(n)
        n *= 2
    return (*points, num_samples)


def binomial_tails(n: int, q: float) -> tuple[list[float], list[float]]:
    """(P(Bin(n, q) <= x), P(Bin(n, q) >= x)) for x = 0..n, from the log pmf (exact up to float rounding)."""
    if q <= 0 or q >= 1:   # degenerate: all mass on 0 or on n
        at = 0 if q <= 0 else n
        return [0.0 if x < at else 1.0 for x in range(n + 1)], [1.0 if x <= at else 0.0 for x in range(n + 1)]
    log_q, log_1q = math.log(q), math.log1p(-q)
    log_pmf = [math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(n - x + 1) + x * log_q + (n - x) * log_1q
               for x in range(n + 1)]
    top = max(log_pmf)
    pmf = [math.exp(v - top) for v in log_pmf]
    total = math.fsum(pmf)
    lower, upper, acc = [], [0.0] * (n + 1), 0.0
    for p in pmf:
        acc += p
        lower.append(min(1.0, acc / total))
    acc = 0.0
    for x in range(n, -1, -1):
        acc += pmf[x]
        upper[x] = min(1.0, acc / total)
    return lower, upper


@dataclass(frozen=True)
class SequentialTest:
    memorized_at: float            # q: memorized iff ratio >= q
    error: float                   # alpha: bound on a wrong early decision, over all looks together
    looks: tuple[int, ...]         # samples seen at each look; the last is num_samples
    above: tuple[int, ...]         # per early look: copies at least this many -> "memorized" (n + 1: never)
    below: tuple[int, ...]         # per early look: copies at most this many -> "not memorized" (-1: never)

    @classmethod
    def build(cls, memorized_at: float, error: float, num_samples: int, batch_size: int) -> "SequentialTest":
        if not 0 < error < 0.5:
            raise ValueError(f"adaptive error rate must be in (0, 0.5), got {error}")
        looks = look_points(num_samples, batch_size)
        early = looks[:-1]
        level = error / len(early) if early else 0.0
        above, below = [], []
        for n in early:
            lower, upper = binomial_tails(n, memorized_at)
            above.append(next((x for x in range(n + 1) if upper[x] <= level), n + 1))
            below.append(max((x for x in range(n + 1) if lower[x] <= level), default=-1))
        return cls(memorized_at, error, looks, tuple(above), tuple(below))

    def decide(self, look: int, copies: int) -> bool | None:
        """Memorized (True), not (False), or None: look again. At the last look always a decision, the fixed
        evaluation's: copies / num_samples >= memorized_at."""
        if look == len(self.looks) - 1:
            return copies / self.looks[-1] >= self.memorized_at
        if copies >= self.above[look]:
            return True
        if copies <= self.below[look]:
            return False
        return None


def ratio_interval(copies: int, samples: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided `level` interval for the memorization ratio copies / samples (a binomial proportion over the
    evaluation's samples): the Wilson score interval.

    Why Wilson: the ratios measured here sit near 0 (large |D|) and near 1 (small |D|: 256/256 on the digits),
    where the Wald interval p +- z sqrt(p(1 - p)/n) collapses to a point. Wilson's interval stays inside
    [0, 1], is never empty, has close to nominal coverage on average over p (Brown, Cai & DasGupta 2001) and
    a closed form: the normal quantile comes from the standard library, no scipy. Clopper-Pearson would
    guarantee >= nominal coverage at every p, at the price of wider (conservative) intervals and the beta
    quantile. What the interval covers: the sampling of seeds at fixed weights, not the training's seed."""
    if not 0 < level < 1:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    if samples < 1 or not 0 <= copies <= samples:
        raise ValueError(f"need 0 <= copies <= samples and samples >= 1, got {copies} copies of {samples}")
    z = NormalDist().inv_cdf((1 + level) / 2)
    p, zz = copies / samples, z * z / samples
    centre = (p + zz / 2) / (1 + zz)
    half = z / (1 + zz) * math.sqrt(p * (1 - p) / samples + zz / (4 * samples))
    # exact ends at 0 and 1 (the formula gives them up to rounding)
    return (0.0 if copies == 0 else max(0.0, centre - half)), (1.0 if copies == samples else min(1.0, centre + half))

"""Search for the effective model memorization (EMM) of each grid point: pure Python, no Ray.

EMM_eps = the largest training-set size |D| whose training still memorizes, i.e. whose best
(running-max over snapshots) memorization ratio is >= 1 - eps (paper.md §3; the paper uses eps = 0.1).
The paper finds it with a grid over |D|; here each grid point (one value of a swept factor) gets a
bracket over the allowed sizes that is narrowed by bisection in log |D|:

- `low`  = largest size known to memorize, `high` = smallest size known not to.
- Robustness rule for noisy, non-monotone curves: `high` is the smallest size observed not to memorize,
  and `low` is the largest memorizing size *below* `high`. Memorizing sizes above `high` are kept in the
  observations but do not move the bracket, so the EMM estimate (= `low`) is conservative.
- Resolved when high / low <= 1 + tolerance, or when low and high are neighbours among the allowed sizes.
- The initial range (lo, hi) is trusted: its ends are treated as if lo memorizes and hi does not, so the
  interior is bisected first and an end is only trained when the crossing may lie beyond it. If it
  does, the bracket expands by `expand_factor` (doubling / halving), and an expansion end is trained
  first (exponential search). It is censored when it cannot expand: ">=max" (the largest allowed size
  memorizes) or "<min" (the smallest allowed size does not).
- With several free workers per grid point, a bracket is split into k+1 equal parts in log |D| (k-section)
  instead of two; extra workers go to the widest gaps.
- What the neighbours found (`start_range`): a factor's values are ordered, and neighbouring values usually have
  neighbouring EMMs. A bracket that has not started takes as its initial range the brackets of its relatives
  that are resolved (the grid points before and after it with the same seed, and its own grid point's lower
  seeds), widened by one expansion step on each side, when that is narrower than the size range; it is fixed
  at the bracket's first training. While no relative is resolved but one is under way, the bracket waits,
  unless a worker would otherwise idle (so on a grid of G points the odd ones start from what the even ones
  found), and only while the others' brackets take at most two probes each. The initial ends are
  assumptions like any initial range: they are tested before the bracket
  concludes, and expansion goes on past them, so the guarantees above hold whatever the neighbours say (a
  misleading neighbour costs trainings, never a wrong answer on a monotone curve).
- A failed training frees its size for re-proposal; after `unresolved_after` failures at the same size the
  grid point is `unresolved` and stops.

Seed replicates (`seeds` = K, `emm_search.py --seeds K`): each grid point gets K independent searches, one
per training seed s = 0..K-1 (train.seed = the sweep's seed + s; only the seed varies, not the training
subset), each with its own SizeBracket. The planner treats each (grid point, seed) as it treats a grid point
with one seed: one bracket among the others, widest first. The grid point's answer (`seed_median`):

- EMM = the median over seeds of the per-seed EMMs, the lower median for even K (conservative). With
  per-seed curves that decrease in |D| this is the largest |D| at which at least half the seeds memorize.
- Its bracket [low, high) is the lower median of the seeds' lows and of their highs: the k-th smallest of
  numbers each inside its own bracket lies between the k-th smallest low and the k-th smallest high, so the
  median of the seeds' true EMMs lies in it whenever every seed's bracket holds its own.
- The spread: the per-seed EMMs and the interval [min over seeds of low, max over seeds of high). The
  smallest and the largest of K independent draws bracket the population median with probability
  1 - 2^(1-K) (distribution-free order statistics: all K fall on one side of it with probability 2 * 2^-K),
  so that is the interval's nominal level for the EMM of the median seed: 75 % for K = 3, 94 % for K = 5.
  With K = 1 the interval is the bracket alone and says nothing about other seeds.
- Censoring: an unknown end counts as -inf (no low) or +inf (no high) in both medians and in the interval.
  The grid point is open while any seed is, unresolved if any seed is (a size that fails twice is most
  likely the configuration's, not the seed's, problem), ">=max" if at least K - k seeds are (k = (K-1)//2,
  the lower median's rank: then the median low is the largest size) and "<min" if at least k + 1 seeds are.
  Its EMM is the median low still, as it is for one seed.

Why K searches rather than K seeds at the final bracket ends only: each seed gets its own EMM, so the spread is
measured instead of assuming that the seeds agree on where to look; the ledger answers each seed's trainings
on its own (seed 0 is the training of a one-seed sweep, so raising K later trains the new seeds and at most the
few sizes of seed 0 that planning several seeds at once asks for); and
the K searches give K times more trainings to plan at once, which keeps free workers busy.

`EMMSearchState` holds the brackets (bracket index = grid index * K + seed, the grid index itself for one
seed), plans the probes for the free workers (`propose`), takes results in any order (`start`, `observe`,
`fail`, `cancel`) and round-trips through a versioned JSON-compatible dict (`to_dict` / `from_dict`).
`simulate` runs it to the end against known memorization curves (bench/search_efficiency.py,
`emm_search.py --estimate`, tests/test_seeds_noise.py).
"""
from __future__ import annotations

import bisect
import copy
import json
import math
from dataclasses import dataclass

FORMAT_VERSION = 1

# Grid-point statuses. The last three are what summary() calls "censored".
OPEN, RESOLVED = "open", "resolved"
AT_LEAST_MAX, BELOW_MIN, UNRESOLVED = ">=max", "<min", "unresolved"
DONE_STATUSES = (RESOLVED, AT_LEAST_MAX, BELOW_MIN, UNRESOLVED)

# How a bracket end is known: observed, assumed from the initial range, or a not-yet-tested expansion.
KNOWN, INITIAL, EXPANSION = "known", "initial", "expansion"


def memorized(best_ratio: float, epsilon: float) -> bool:
    """The one definition: a training memorized when its best (running-max over evaluations) memorization ratio
    reached 1 - epsilon (EMM's condition, paper.md §3)."""
    return best_ratio >= 1 - epsilon


@dataclass(frozen=True)
class SearchSettings:
    """What every bracket shares: the allowed sizes, the initial range and the stopping rules."""
    allowed_sizes: tuple[int, ...]
    lo_index: int                  # initial range, as indices into allowed_sizes
    hi_index: int
    epsilon: float = 0.1           # memorized iff best ratio >= 1 - epsilon (paper: 0.1)
    tolerance: float = 0.1         # resolved when high / low <= 1 + tolerance
    unresolved_after: int = 2      # failed trainings at one size before the grid point is unresolved
    expand_factor: float = 2.0     # growth per expansion step beyond the initial range

    @classmethod
    def build(cls, allowed_sizes, size_range, **rules) -> "SearchSettings":
        sizes = sorted({int(s) for s in allowed_sizes})
        if not sizes or sizes[0] <= 0:
            raise ValueError(f"allowed_sizes must hold positive integers, got {list(allowed_sizes)[:5]}...")
        lo, hi = size_range
        if not 0 < lo <= hi:
            raise ValueError(f"size_range must be (lo, hi) with 0 < lo <= hi, got {size_range}")
        lo_index, hi_index = _nearest_index(sizes, lo), _nearest_index(sizes, hi)
        if hi_index <= lo_index:   # both ends snapped onto one size: widen by one step
            if lo_index + 1 < len(sizes):
                hi_index = lo_index + 1
            else:
                lo_index = max(0, hi_index - 1)
        settings = cls(tuple(sizes), lo_index, hi_index, **rules)
        settings.check()
        return settings

    def check(self) -> None:
        if not 0 < self.epsilon < 1:
            raise ValueError(f"epsilon must lie in (0, 1), got {self.epsilon}")
        if self.tolerance <= 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}")
        if self.unresolved_after < 1:
            raise ValueError(f"unresolved_after must be >= 1, got {self.unresolved_after}")
        if self.expand_factor <= 1:
            raise ValueError(f"expand_factor must be > 1, got {self.expand_factor}")

    def memorized(self, best_ratio: float) -> bool:
        return memorized(best_ratio, self.epsilon)

    def index_of(self, size: int) -> int:
        i = bisect.bisect_left(self.allowed_sizes, size)
        if i == len(self.allowed_sizes) or self.allowed_sizes[i] != size:
            raise ValueError(f"size {size} is not one of the allowed sizes")
        return i

    def log_width(self, a: int, b: int) -> float:
        return math.log(self.allowed_sizes[b] / self.allowed_sizes[a])

    def narrow_enough(self, a: int, b: int) -> bool:
        """A bracket (a, b) of indices needs no further splitting."""
        return b - a <= 1 or self.allowed_sizes[b] <= (1 + self.tolerance) * self.allowed_sizes[a]

    def expand_up(self, i: int) -> int:
        """The allowed size about expand_factor times sizes[i] (at least one step up, at most the max)."""
        j = bisect.bisect_left(self.allowed_sizes, self.allowed_sizes[i] * self.expand_factor)
        return max(i + 1, min(j, len(self.allowed_sizes) - 1))

    def expand_down(self, i: int) -> int:
        j = bisect.bisect_right(self.allowed_sizes, self.allowed_sizes[i] / self.expand_factor) - 1
        return min(i - 1, max(j, 0))

    def to_dict(self) -> dict:
        return {"allowed_sizes": list(self.allowed_sizes),
                "size_range": [self.allowed_sizes[self.lo_index], self.allowed_sizes[self.hi_index]],
                "epsilon": self.epsilon, "tolerance": self.tolerance,
                "unresolved_after": self.unresolved_after, "expand_factor": self.expand_factor}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSettings":
        return cls.build(d["allowed_sizes"], tuple(d["size_range"]), epsilon=d["epsilon"],
                         tolerance=d["tolerance"], unresolved_after=_unresolved_after(d),
                         expand_factor=d["expand_factor"])


def _unresolved_after(settings: dict) -> int:
    """A saved state's unresolved_after: states saved before the rename (same format) call it max_failures."""
    return settings["unresolved_after"] if "unresolved_after" in settings else settings["max_failures"]


def _nearest_index(sizes, target: float, candidates: range | None = None) -> int:
    """Index of the size nearest `target` in log space (ties go to the smaller size)."""
    candidates = candidates if candidates is not None else range(len(sizes))
    first, last = candidates.start, candidates.stop - 1
    j = min(max(bisect.bisect_left(sizes, target, first, last + 1), first), last)
    if j > first and abs(math.log(sizes[j - 1] / target)) <= abs(math.log(sizes[j] / target)):
        return j - 1
    return j


@dataclass
class ProbeOptions:
    """Where a bracket could use a training now."""
    ends: list[int]                  # untested bracket ends to train (expansion ends, exhausted initial ends)
    gaps: list[tuple[int, int]]      # open intervals worth splitting: (index, index) of their ends


class SizeBracket:
    """The search at one grid point: observations, pending trainings and failures over allowed sizes."""

    def __init__(self, settings: SearchSettings):
        self.settings = settings
        # (size, best_ratio, memorized, images, samples): samples behind best_ratio, for its interval (0: unknown)
        self.observations: list[tuple[int, float, bool, float, int]] = []
        self.pending: dict[int, int] = {}     # size -> number of trainings running at that size
        self.failures: dict[int, int] = {}    # size -> failed trainings at that size
        self.error: str | None = None         # set once the grid point is unresolved
        self.start_range: tuple[int, int] | None = None   # initial (lo, hi) indices from relatives; None: settings'

    # ---- what is known ----
    def known_end_indices(self) -> tuple[int | None, int | None]:
        """(low, high) as indices into the allowed sizes: the robust rule of the module docstring."""
        index_of = self.settings.index_of
        not_memorized = [index_of(s) for s, _, mem, *_ in self.observations if not mem]
        high_index = min(not_memorized) if not_memorized else None
        memorized = [index_of(s) for s, _, mem, *_ in self.observations
                     if mem and (high_index is None or index_of(s) < high_index)]
        low_index = max(memorized) if memorized else None
        return low_index, high_index

    @property
    def low(self) -> int | None:
        """The largest size that memorized below the smallest that did not (the EMM), or None."""
        low_index, _ = self.known_end_indices()
        return None if low_index is None else self.settings.allowed_sizes[low_index]

    @property
    def high(self) -> int | None:
        """The smallest size that did not memorize, or None."""
        _, high_index = self.known_end_indices()
        return None if high_index is None else self.settings.allowed_sizes[high_index]

    @property
    def status(self) -> str:
        if self.error is not None:
            return UNRESOLVED
        low_index, high_index = self.known_end_indices()
        if low_index == len(self.settings.allowed_sizes) - 1:
            return AT_LEAST_MAX
        if low_index is None and high_index == 0:
            return BELOW_MIN
        if low_index is not None and high_index is not None and self.settings.narrow_enough(low_index, high_index):
            return RESOLVED
        return OPEN

    @property
    def done(self) -> bool:
        return self.status in DONE_STATUSES

    @property
    def started(self) -> bool:
        return bool(self.observations or self.pending or self.failures)

    def initial_range(self) -> tuple[int, int]:
        return self.start_range or (self.settings.lo_index, self.settings.hi_index)

    def edges(self) -> tuple[int, str, int, str]:
        """(lo_index, lo_kind, hi_index, hi_kind): the interval still searched, as indices into the allowed
        sizes, with virtual ends where unknown."""
        s = self.settings
        low_index, high_index = self.known_end_indices()
        start_lo, start_hi = self.initial_range()
        if low_index is not None:
            lo_index, lo_kind = low_index, KNOWN
        elif high_index is None or high_index > start_lo:
            lo_index, lo_kind = start_lo, INITIAL
        else:                                   # everything tried so far failed: look lower
            lo_index, lo_kind = s.expand_down(high_index), EXPANSION
        if high_index is not None:
            hi_index, hi_kind = high_index, KNOWN
        elif low_index is None or low_index < start_hi:
            hi_index, hi_kind = start_hi, INITIAL
        else:                                   # everything tried so far memorized: look higher
            hi_index, hi_kind = s.expand_up(low_index), EXPANSION
        return lo_index, lo_kind, hi_index, hi_kind

    def width(self) -> float:
        lo_index, _, hi_index, _ = self.edges()
        return self.settings.log_width(lo_index, hi_index)

    def pending_indices(self) -> set[int]:
        return {self.settings.index_of(s) for s, n in self.pending.items() if n > 0}

    def taken_indices(self) -> set[int]:
        """Sizes that must not be proposed: running or already observed."""
        return self.pending_indices() | {self.settings.index_of(s) for s, *_ in self.observations}

    def probe_options(self) -> ProbeOptions:
        if self.status != OPEN:
            return ProbeOptions([], [])
        lo_index, lo_kind, hi_index, hi_kind = self.edges()
        taken = self.taken_indices()
        pending = self.pending_indices()
        # running probes inside the interval split it; each part is a gap of its own
        points = [lo_index] + sorted(p for p in pending if lo_index < p < hi_index) + [hi_index]
        gaps = [(a, b) for a, b in zip(points, points[1:])
                if not self.settings.narrow_enough(a, b) and any(k not in taken for k in range(a + 1, b))]
        ends = []
        for end, kind in ((hi_index, hi_kind), (lo_index, lo_kind)):
            if kind == KNOWN or end in taken or end in ends:
                continue
            # an expansion end is tested first; an initial end once the interior is used up
            if kind == EXPANSION or not gaps:
                ends.append(end)
        return ProbeOptions(ends, gaps)

    # ---- updates ----
    def start(self, size: int) -> None:
        self.settings.index_of(size)
        self.pending[size] = self.pending.get(size, 0) + 1

    def _release(self, size: int) -> None:
        if self.pending.get(size, 0) > 0:
            self.pending[size] -= 1
            if self.pending[size] == 0:
                del self.pending[size]

    def observe(self, size: int, best_ratio: float, images: float = 0.0, samples: int = 0) -> None:
        self.settings.index_of(size)
        self._release(size)
        memorized = self.settings.memorized(best_ratio)
        self.observations.append((size, float(best_ratio), memorized, float(images), int(samples)))

    def fail(self, size: int, error: str = "") -> None:
        self.settings.index_of(size)
        self._release(size)
        self.failures[size] = self.failures.get(size, 0) + 1
        # a late failure of a leftover probe does not undo a finished grid point
        if self.status == OPEN and self.failures[size] >= self.settings.unresolved_after:
            self.error = f"size {size} failed {self.failures[size]} times; last error: {error or 'unknown'}"

    def cancel(self, size: int) -> None:
        """A training that was stopped without a result: its size may be proposed again."""
        self._release(size)

    # ---- reporting and persistence ----
    def summary(self) -> dict:
        status = self.status
        return {"emm": self.low, "high": self.high,
                "censored": status if status in (AT_LEAST_MAX, BELOW_MIN, UNRESOLVED) else "",
                "status": status,
                "trials": len(self.observations) + sum(self.failures.values()),
                "images": sum(o[3] for o in self.observations),
                "observations": [(s, r, m, n) for s, r, m, _, n in self.observations],   # n: samples behind r
                "pending": sorted(s for s, n in self.pending.items() for _ in range(n)),
                "error": self.error}

    def to_dict(self) -> dict:
        sizes = self.settings.allowed_sizes
        return {"observations": [list(o) for o in self.observations],
                "pending": sorted([s, n] for s, n in self.pending.items()),
                "failures": sorted([s, n] for s, n in self.failures.items()),
                "error": self.error,
                "start_range": [sizes[i] for i in self.start_range] if self.start_range else None}

    @classmethod
    def from_dict(cls, d: dict, settings: SearchSettings) -> "SizeBracket":
        bracket = cls(settings)
        bracket.observations = [(int(o[0]), float(o[1]), bool(o[2]), float(o[3]), int(o[4]) if len(o) > 4 else 0)
                                for o in d["observations"]]   # 4 entries: saved before the samples were kept
        bracket.pending = {int(s): int(n) for s, n in d["pending"]}
        bracket.failures = {int(s): int(n) for s, n in d["failures"]}
        bracket.error = d["error"]
        start = d.get("start_range")   # saved before neighbours' ranges: the settings' range
        bracket.start_range = tuple(settings.index_of(int(x)) for x in start) if start else None
        return bracket


def seed_median(replicates: list[dict]) -> dict:
    """A grid point's answer from its seeds' SizeBracket.summary() dicts (the rule of the module docstring):
    the lower median of their lows (the EMM) and of their highs, the interval [min low, max high)
    (interval_level gives its nominal level), the status, and the sums of what they cost. With one seed: that
    seed's summary, plus the interval (its bracket) and the replicates."""
    k = (len(replicates) - 1) // 2                  # the lower median's rank
    lows = sorted(-math.inf if r["emm"] is None else r["emm"] for r in replicates)
    highs = sorted(math.inf if r["high"] is None else r["high"] for r in replicates)
    statuses = [r["status"] for r in replicates]
    if OPEN in statuses:
        status = OPEN
    elif UNRESOLVED in statuses:
        status = UNRESOLVED
    elif statuses.count(AT_LEAST_MAX) >= len(replicates) - k:
        status = AT_LEAST_MAX
    elif statuses.count(BELOW_MIN) >= k + 1:
        status = BELOW_MIN
    else:
        status = RESOLVED
    low, high = _finite(lows[k]), _finite(highs[k])
    return {"emm": low, "high": high,
            "censored": status if status in (AT_LEAST_MAX, BELOW_MIN, UNRESOLVED) else "", "status": status,
            "seeds": len(replicates), "interval_low": _finite(lows[0]), "interval_high": _finite(highs[-1]),
            "trials": sum(r["trials"] for r in replicates), "images": sum(r["images"] for r in replicates),
            "observations": [o for r in replicates for o in r["observations"]],
            "pending": sorted(s for r in replicates for s in r["pending"]),
            "error": next((r["error"] for r in replicates if r["error"]), None),
            "replicates": replicates}


def interval_level(seeds: int) -> float:
    """Nominal level of [min low, max high) for the EMM of the median seed: 1 - 2^(1-K); 0 for one seed, whose
    bracket says nothing about other seeds."""
    return 1 - 2.0 ** (1 - seeds)


def _finite(x: float) -> int | None:
    return None if math.isinf(x) else x


class EMMSearchState:
    """One SizeBracket per grid point and seed, plus the planner that shares free workers among them."""

    def __init__(self, grid_points, allowed_sizes, size_range, epsilon: float = 0.1, tolerance: float = 0.1,
                 unresolved_after: int = 2, expand_factor: float = 2.0, seeds: int = 1):
        """grid_points: dicts with at least "label" and "value" (other keys, e.g. overrides, are kept).
        seeds: independent searches per grid point, one per training seed (module docstring)."""
        self.grid_points = [copy.deepcopy(dict(g)) for g in grid_points]
        if not self.grid_points:
            raise ValueError("need at least one grid point")
        for g in self.grid_points:
            if "label" not in g:
                raise ValueError(f"grid point {g} has no 'label'")
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
        self.seeds = seeds
        self.settings = SearchSettings.build(allowed_sizes, size_range, epsilon=epsilon, tolerance=tolerance,
                                             unresolved_after=unresolved_after, expand_factor=expand_factor)
        self.brackets = [SizeBracket(self.settings) for _ in range(len(self.grid_points) * seeds)]

    # ---- brackets, grid points and seeds ----
    def replicate(self, bracket_index: int) -> tuple[int, int]:
        """(grid index, seed) of a bracket."""
        if not 0 <= bracket_index < len(self.brackets):
            raise ValueError(f"no bracket {bracket_index}: {len(self.brackets)} brackets")
        return divmod(bracket_index, self.seeds)

    def bracket_index(self, grid_index: int, seed: int) -> int:
        if not (0 <= grid_index < len(self.grid_points) and 0 <= seed < self.seeds):
            raise ValueError(f"no grid point {grid_index} with seed {seed}: {len(self.grid_points)} grid points, "
                             f"{self.seeds} seeds")
        return grid_index * self.seeds + seed

    def seed_brackets(self, grid_index: int) -> list[SizeBracket]:
        """The brackets of one grid point, seed 0 first."""
        return self.brackets[grid_index * self.seeds:(grid_index + 1) * self.seeds]

    # ---- queries ----
    @property
    def finished(self) -> bool:
        """Every grid point is resolved, censored or unresolved."""
        return all(b.done for b in self.brackets)

    def pending_count(self) -> int:
        return sum(sum(b.pending.values()) for b in self.brackets)

    def relatives(self, bracket_index: int) -> list[int]:
        """The brackets whose answers say most about this one's: the same seed of the grid points before and after
        it, and the lower seeds of its own grid point (not the higher ones: seed 0 follows only seed 0, as in a
        one-seed sweep, whose trainings the ledger then answers)."""
        g, seed = self.replicate(bracket_index)
        near = [self.bracket_index(n, seed) for n in (g - 1, g + 1) if 0 <= n < len(self.grid_points)]
        return near + [self.bracket_index(g, s) for s in range(seed)]

    def neighbours_range(self, bracket_index: int) -> tuple[int, int] | None:
        """The initial range the resolved relatives suggest (module docstring), or None (none resolved, or not
        narrower than the size range)."""
        s = self.settings
        known = [self.brackets[r].known_end_indices() for r in self.relatives(bracket_index)
                 if self.brackets[r].status == RESOLVED]
        if not known:
            return None
        low_index, high_index = min(low for low, _ in known), max(high for _, high in known)
        last = len(s.allowed_sizes) - 1
        lo_index = s.expand_down(low_index) if low_index > 0 else 0
        hi_index = s.expand_up(high_index) if high_index < last else last
        if s.log_width(lo_index, hi_index) >= s.log_width(s.lo_index, s.hi_index):
            return None
        return lo_index, hi_index

    def waiting(self, bracket_index: int) -> bool:
        """Not started, no relative resolved yet, and one under way: its answer is worth waiting for."""
        relatives = [self.brackets[r] for r in self.relatives(bracket_index)]
        return (not self.brackets[bracket_index].started and not any(r.status == RESOLVED for r in relatives)
                and any(r.started and r.status == OPEN for r in relatives))

    # ---- planning ----
    def propose(self, free_slots: int) -> list[tuple[int, int]]:
        """Up to `free_slots` new (bracket index, size) probes; call start() for the ones launched (nothing else
        changes but the initial range of brackets not started yet, which follows their relatives).
        A bracket is one grid point's search for one seed (replicate()); with one seed, the grid point.

        1. every open bracket with nothing running gets one probe, widest bracket first; a bracket waiting for
           its relatives (waiting()) only if slots are left after 3;
        2. bracket ends still to test get a probe (expansion ends, or initial ends once the inside is used);
        3. further slots split the widest gaps (log ratio) again: a gap with n probes is cut into n + 1
           equal parts in log |D| (k-section), so idle workers shorten the search.
        """
        for i, b in enumerate(self.brackets):   # not started: start from what the relatives found so far
            if not b.started:
                b.start_range = self.neighbours_range(i)
        waiting = {i for i in range(len(self.brackets)) if self.waiting(i)}
        proposals = self._plan(free_slots, waiting, patient=True)
        # Waiting is worth it while the others' probes still cut their brackets finely: at most 2 probes each (a
        # trisection still learns 0.79 of a bisection's bits per training; more workers on one bracket learn less
        # than a bracket starting from the full range). Otherwise, or if a worker would idle, nobody waits.
        if len(proposals) < free_slots or len(proposals) > 2 * len({i for i, _ in proposals}):
            proposals = self._plan(free_slots, set(), patient=False)
        return proposals

    def _plan(self, free_slots: int, waiting: set[int], patient: bool) -> list[tuple[int, int]]:
        """propose()'s rules 1-3 without the brackets in `waiting`; patient: neither a bracket not started whose
        relative starts in this plan (it would wait for it next time)."""
        options = {i: b.probe_options() for i, b in enumerate(self.brackets) if i not in waiting}
        options = {i: o for i, o in options.items() if o.ends or o.gaps}
        rank = {i: r for r, i in enumerate(sorted(options, key=lambda i: (-self.brackets[i].width(), i)))}
        ends_left = {i: list(o.ends) for i, o in options.items()}
        room = {(i, gap): self._free_inside(i, gap) for i, o in options.items() for gap in o.gaps}
        per_gap: dict[tuple[int, tuple[int, int]], int] = {}
        units: list[tuple[int, str, object]] = []     # (grid index, "end" | "gap", index | gap)

        def best_gap(indices):
            """The gap whose parts would stay widest, among the given grid points."""
            candidates = [(key, self.settings.log_width(*key[1]) / (per_gap.get(key, 0) + 1))
                          for key in room if key[0] in indices and per_gap.get(key, 0) < len(room[key])]
            if not candidates:
                return None
            return max(candidates, key=lambda c: (c[1], -rank[c[0][0]], -c[0][1][0]))[0]

        def add_gap_probe(key):
            per_gap[key] = per_gap.get(key, 0) + 1
            units.append((key[0], "gap", key[1]))

        slots = max(0, int(free_slots))
        starting, skipped = set(), set()
        for i in sorted(options, key=rank.get):                         # 1. one each, widest first
            if patient and not self.brackets[i].started and not self.neighbours_range(i) and \
                    starting & set(self.relatives(i)):
                skipped.add(i)
                continue
            if slots and not self.brackets[i].pending:
                if not self.brackets[i].started:
                    starting.add(i)
                if ends_left[i]:
                    units.append((i, "end", ends_left[i].pop(0)))
                else:
                    add_gap_probe(best_gap({i}))
                slots -= 1
        options = {i: o for i, o in options.items() if i not in skipped}
        for i in sorted(options, key=rank.get):                         # 2. ends to test
            while slots and ends_left[i]:
                units.append((i, "end", ends_left[i].pop(0)))
                slots -= 1
        while slots:                                                    # 3. k-section of the widest gaps
            key = best_gap(set(options))
            if key is None:
                break
            add_gap_probe(key)
            slots -= 1

        # place the probes: n per gap at the allowed sizes nearest the k-section points
        placed = {key: self._k_section(room[key], key[1], n) for key, n in per_gap.items()}
        proposals = []
        for i, kind, where in units:
            index = where if kind == "end" else placed[(i, where)].pop(0)
            proposals.append((i, self.settings.allowed_sizes[index]))
        return proposals

    def _free_inside(self, i: int, gap: tuple[int, int]) -> list[int]:
        taken = self.brackets[i].taken_indices()
        return [k for k in range(gap[0] + 1, gap[1]) if k not in taken]

    def _k_section(self, free: list[int], gap: tuple[int, int], n: int) -> list[int]:
        """n distinct indices from `free` nearest the points cutting the gap into n + 1 equal log parts,
        ordered from the gap's centre outwards (the probe that halves the gap is launched first)."""
        sizes = self.settings.allowed_sizes
        free_sizes = [sizes[k] for k in free]
        log_a, log_b = math.log(sizes[gap[0]]), math.log(sizes[gap[1]])
        chosen, previous = [], -1
        for j in range(1, n + 1):
            target = math.exp(log_a + j * (log_b - log_a) / (n + 1))
            # keep the choices increasing and leave room for the probes still to place
            position = _nearest_index(free_sizes, target, range(previous + 1, len(free) - (n - j)))
            chosen.append(free[position])
            previous = position
        centre = (log_a + log_b) / 2
        return sorted(chosen, key=lambda k: (abs(math.log(sizes[k]) - centre), k))

    # ---- updates (bracket indices as propose() gives them; sizes are training-set sizes, not indices) ----
    def start(self, bracket_index: int, size: int) -> None:
        self.brackets[bracket_index].start(size)   # its start_range, if any, is fixed from now on

    def observe(self, bracket_index: int, size: int, best_ratio: float, images: float = 0.0, samples: int = 0) -> None:
        self.brackets[bracket_index].observe(size, best_ratio, images, samples)

    def fail(self, bracket_index: int, size: int, error: str = "") -> None:
        self.brackets[bracket_index].fail(size, error)

    def cancel(self, bracket_index: int, size: int) -> None:
        self.brackets[bracket_index].cancel(size)

    # ---- reporting and persistence ----
    def summary(self) -> list[dict]:
        """One row per grid point: its seeds' answer (seed_median), their summaries under "replicates"."""
        return [{"label": g["label"], "value": g.get("value"),
                 **seed_median([b.summary() for b in self.seed_brackets(i)])}
                for i, g in enumerate(self.grid_points)]

    def to_dict(self) -> dict:
        return {"format": "diffmem.EMMSearchState", "version": FORMAT_VERSION,
                "settings": self.settings.to_dict(), "seeds": self.seeds,
                "grid_points": copy.deepcopy(self.grid_points),
                "brackets": [b.to_dict() for b in self.brackets]}

    @classmethod
    def from_dict(cls, d: dict) -> "EMMSearchState":
        if d.get("format") != "diffmem.EMMSearchState" or d.get("version") != FORMAT_VERSION:
            raise ValueError(f"cannot restore search state format {d.get('format')!r} version "
                             f"{d.get('version')!r}; this code reads version {FORMAT_VERSION}")
        s = d["settings"]
        state = cls(d["grid_points"], s["allowed_sizes"], tuple(s["size_range"]), epsilon=s["epsilon"],
                    tolerance=s["tolerance"], unresolved_after=_unresolved_after(s),
                    expand_factor=s["expand_factor"], seeds=d.get("seeds", 1))   # saved before seeds: one
        if len(d["brackets"]) != len(state.brackets):
            raise ValueError(f"{len(d['brackets'])} brackets saved for {len(state.grid_points)} grid points "
                             f"with {state.seeds} seeds")
        state.brackets = [SizeBracket.from_dict(b, state.settings) for b in d["brackets"]]
        return state


def simulate(state: EMMSearchState, ratio, slots: int, images=lambda grid_index, size, ratio: 0.0) -> list[list]:
    """Run the search in `state` to its end against known memorization curves, without training anything.

    ratio(grid_index, size, seed=seed) is the best memorization ratio that training would reach (seed: 0 ..
    state.seeds - 1, passed by name so that a callable without it fails loudly), images(grid_index, size,
    ratio) the training images it would cost. The trainings go in synchronous rounds: at most `slots` start
    together and all finish before the next round is planned (Tune refills a slot as soon as it frees up, so
    real sweeps need at most as many rounds). Returns the rounds, each a list of (grid_index, size); the
    trainings, images and brackets are then in state.summary(). Used by bench/search_efficiency.py,
    sweeps/emm_search.py --estimate and tests/test_seeds_noise.py."""
    rounds = []
    while not state.finished:
        batch = state.propose(slots)
        if not batch:   # cannot happen with slots >= 1 and nothing pending; never loop forever
            raise RuntimeError(f"the search proposed nothing with {slots} free slots and open grid points")
        for b, n in batch:
            state.start(b, n)
        for b, n in batch:
            g, seed = state.replicate(b)
            r = ratio(g, n, seed=seed)
            state.observe(b, n, r, images=images(g, n, r))
        rounds.append([(state.replicate(b)[0], n) for b, n in batch])
    return rounds


# What sweeps.searcher.EMMSearcher saves in Tune's searcher snapshots, readable here without Ray (--status).
SAVE_FORMAT, SAVE_VERSION = "diffmem.EMMSearcher", 1
SEARCHER_STATE_FILES = "searcher-state-*.pkl"   # Ray's Searcher.CKPT_FILE_TMPL (tests/test_searcher.py pins it)


def load_experiment_searcher(experiment: str) -> dict:
    """What EMMSearcher saved in the newest snapshot of a Tune experiment (searcher-state-<time>.pkl, which
    holds our JSON), an absolute path or a --storage URI (sweeps/storage.py): "state", "from_ledger" (the
    [bracket index, size] the ledger answered without a trial; EMMSearchState.replicate gives the bracket's grid index
    and seed), ..."""
    from sweeps.storage import children, filesystem, read_text
    fs, path = filesystem(experiment)
    found = children(fs, path, SEARCHER_STATE_FILES)
    if not found:
        raise FileNotFoundError(f"no searcher state in {experiment}")
    newest = found[-1][0]                # the timestamped names sort in time order (as Ray picks them)
    saved = json.loads(read_text(fs, newest) or "null")
    if not isinstance(saved, dict) or saved.get("format") != SAVE_FORMAT:
        raise ValueError(f"{newest} was not written by EMMSearcher")
    return saved


def load_experiment_state(experiment: str) -> EMMSearchState:
    """The search state of the newest snapshot in a Tune experiment (a path or URI). Use it after
    `Tuner.restore(...).fit()`, where the restored searcher object is not reachable through Ray's public API."""
    return EMMSearchState.from_dict(load_experiment_searcher(experiment)["state"])

"""Pair a group's runs with the baseline group's by seed: per-seed differences and their statistics.

Two runs with the same seed share their initialisation and data order, so the difference of
their scores removes the seed's share of the noise. For a group and the baseline, each seed both
ran gives one difference (group run minus baseline run); the mean difference gets the sample
standard deviation (``ddof=1``) of the differences and a two-sided Student-t confidence interval
``mean ± t_quantile((1 + level) / 2, n - 1) * std / sqrt(n)``. With one pair the std and the
interval are undefined (None). With two or more pairs whose differences are all equal (to within
the rounding of a subtraction, :data:`EQUAL_DIFFERENCES_TOLERANCE`) the std is 0 and the interval
has width 0: it is computed, but says nothing about the uncertainty of the mean.
:attr:`PairedDelta.ci_status` tells these cases apart (:data:`CI_OK`, :data:`CI_ZERO_VARIANCE`,
:data:`CI_ONE_PAIR`, :data:`CI_NO_PAIRS`), and :attr:`PairedDelta.excludes_zero` is None unless the
interval is informative (:data:`CI_OK`). A seed only one of the two groups ran (or a run without a
seed) takes no part: :class:`PairedDelta` lists it, so that it is reported rather than dropped unseen.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from sandbox.analysis.student_t import t_quantile

CONFIDENCE_LEVEL = 0.95
"""The coverage of the confidence interval of a paired mean difference."""

EQUAL_DIFFERENCES_TOLERANCE = 1e-12
"""Differences whose spread (largest minus smallest) is at most this, times ``max(1, |largest difference|)``,
count as all equal: what is left is the rounding of subtracting two scores (0.41 - 0.40 and
0.42 - 0.41 differ in the 17th digit), not a spread between seeds."""

CI_OK = "ok"
"""The interval is the Student-t interval of two or more differences that are not all equal."""
CI_ZERO_VARIANCE = "zero_variance"
"""Two or more differences, all equal: std 0, an interval of width 0 that says nothing about uncertainty."""
CI_ONE_PAIR = "one_pair"
"""A single pair: no std, no interval."""
CI_NO_PAIRS = "no_pairs"
"""No seed both groups ran: no paired Δ at all."""


@dataclass
class PairedDelta:
    """A group's scores minus the baseline's, seed by seed (see the module docstring)."""

    seeds: list[Any]
    """The seeds both groups ran, in the group's order."""
    deltas: list[float]
    """Group score minus baseline score, one per seed of ``seeds``."""
    only_here: list[Any] = field(default_factory=list)
    """Seeds of the group's runs that the baseline did not run (None: a run without a seed)."""
    only_in_baseline: list[Any] = field(default_factory=list)
    """Seeds of the baseline's runs that the group did not run (None: a run without a seed)."""
    level: float = CONFIDENCE_LEVEL
    """The coverage of :attr:`interval`."""

    @property
    def n(self) -> int:
        """Number of pairs."""
        return len(self.deltas)

    @property
    def mean(self) -> float | None:
        """Mean of the per-seed differences; None without any pair."""
        return statistics.fmean(self.deltas) if self.deltas else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (``ddof=1``) of the differences; None for fewer than two pairs."""
        return statistics.stdev(self.deltas) if self.n > 1 else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The two-sided Student-t confidence interval of :attr:`mean`; None for fewer than two pairs."""
        return mean_confidence_interval(self.deltas, self.level)

    @property
    def ci_status(self) -> str:
        """Whether :attr:`interval` is informative: :data:`CI_OK`, or why not (:data:`CI_ZERO_VARIANCE`,
        :data:`CI_ONE_PAIR`, :data:`CI_NO_PAIRS`)."""
        if self.n == 0:
            return CI_NO_PAIRS
        if self.n == 1:
            return CI_ONE_PAIR
        if all_equal(self.deltas):
            return CI_ZERO_VARIANCE
        return CI_OK

    @property
    def excludes_zero(self) -> bool | None:
        """Whether :attr:`interval` lies wholly above or below 0; None where it is not informative
        (:attr:`ci_status` is not :data:`CI_OK`: fewer than two pairs, or a zero-width interval)."""
        interval = self.interval
        if interval is None or self.ci_status != CI_OK:
            return None
        return interval[0] > 0 or interval[1] < 0

    @property
    def unpaired(self) -> bool:
        """Whether a seed of either group has no partner."""
        return bool(self.only_here or self.only_in_baseline)


def all_equal(values: list[float]) -> bool:
    """Whether the non-empty ``values`` are all equal to within :data:`EQUAL_DIFFERENCES_TOLERANCE`."""
    spread = max(values) - min(values)
    return spread <= EQUAL_DIFFERENCES_TOLERANCE * max(1.0, max(abs(value) for value in values))


def mean_confidence_interval(values: list[float], level: float = CONFIDENCE_LEVEL) -> tuple[float, float] | None:
    """The two-sided Student-t interval of the mean of ``values`` at ``level``; None for fewer than two values."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half_width = t_quantile((1.0 + level) / 2.0, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half_width, mean + half_width


def pair_by_seed(
    seeds: list[Any], scores: list[float], baseline_seeds: list[Any], baseline_scores: list[float]
) -> PairedDelta:
    """Pair ``scores`` with ``baseline_scores`` by seed (each list holds a seed once; None never pairs)."""
    baseline = {seed: score for seed, score in zip(baseline_seeds, baseline_scores) if seed is not None}
    paired = [(seed, score - baseline[seed]) for seed, score in zip(seeds, scores) if seed is not None and seed in baseline]
    here = {seed for seed in seeds if seed is not None}
    return PairedDelta(
        seeds=[seed for seed, _ in paired],
        deltas=[difference for _, difference in paired],
        only_here=[seed for seed in seeds if seed is None or seed not in baseline],
        only_in_baseline=[seed for seed in baseline_seeds if seed is None or seed not in here],
    )

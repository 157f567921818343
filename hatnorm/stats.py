"""Uncertainty over seeds: means with Student-t confidence intervals, and paired contrasts.

A result over several seeds is reported as its mean, its sample standard deviation and a confidence
interval for the mean from Student's t distribution with n − 1 degrees of freedom (``scipy.stats.t``).
Two variants run on the same seeds are compared by their paired differences (the same seed gives both
the same data split, batch order and initial weights), whose interval decides whether the difference is
established: a contrast is a finding only when its interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hatnorm._extras import missing

try:
    from scipy import stats as _scipy_stats
except ModuleNotFoundError as error:
    raise missing("hatnorm.stats", "scipy", "stats") from error


@dataclass(frozen=True)
class Summary:
    """A mean over seeds with its spread and confidence interval.

    Attributes:
        mean: the sample mean.
        std: the sample standard deviation (n − 1 in the denominator); NaN for one value.
        low: the lower end of the confidence interval for the mean; NaN for one value.
        high: the upper end; NaN for one value.
        n: how many values.
        confidence: the interval's confidence level.
    """

    mean: float
    std: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def half_width(self) -> float:
        """Half the interval's width (NaN for one value)."""
        return (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of 0 (never for one value)."""
        return bool(self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _values(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or not len(array):
        raise ValueError(f"{name} must be a non-empty sequence of numbers, got {list(values)!r}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, got {array.tolist()}")
    return array


def _check_confidence(confidence: float) -> float:
    if not isinstance(confidence, int | float) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return float(confidence)


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean, standard deviation and the Student-t confidence interval of ``values``.

    Args:
        values: one value per seed (finite).
        confidence: the interval's level [0.95].

    Returns:
        The summary; one value has NaN spread and interval, equal values a zero-width interval.

    Raises:
        ValueError: ``values`` is empty or holds NaN or inf, or ``confidence`` is outside (0, 1).
    """
    confidence = _check_confidence(confidence)
    array = _values(values, "values")
    n, mean = len(array), float(array.mean())
    if n == 1:
        return Summary(mean, math.nan, math.nan, math.nan, 1, confidence)
    std = float(array.std(ddof=1))
    half = float(_scipy_stats.t.ppf((1 + confidence) / 2, df=n - 1)) * std / math.sqrt(n)
    return Summary(mean, std, mean - half, mean + half, n, confidence)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Summary:
    """The mean of ``a[i] − b[i]`` over paired runs (the same seed) with its Student-t interval.

    Args:
        a: one value per seed for the first variant.
        b: the second variant's values for the same seeds, in the same order.
        confidence: the interval's level [0.95].

    Raises:
        ValueError: the sequences differ in length, are empty or hold NaN or inf.
    """
    first, second = _values(a, "a"), _values(b, "b")
    if len(first) != len(second):
        raise ValueError(f"a and b must pair one value per seed, got {len(first)} and {len(second)} values")
    return summarize(first - second, confidence)

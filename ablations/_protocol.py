"""The ablations' statistical protocol: contrasts declared in code before a run, paired-t p-values with Holm's
correction over a table's primary contrasts, and a sign-flip permutation test over seeds as a distribution-free
check.

Each ablation declares its contrasts with :class:`Contrast` before it trains anything; a primary contrast names
the one metric its question is about. A table's primary contrasts share one family-wise error rate (Holm's
step-down correction of their paired-t p-values); every other contrast, and every other metric of a primary
pair, is exploratory: its p-values are printed, unadjusted, and it is never called a finding.

The joint baseline (A_J) normalises as it is tested: its BatchNorm keeps per-task statistics (``JOINT_NORM``).

scipy (the ``stats`` extra) is imported when a p-value is first computed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: the BatchNorm of the joint baseline (A_J): per-task statistics and affine, so that each task's batch is
#: normalised by its own batch statistics in training and by its own running statistics at test; a shared BN
#: would normalise each task's batch separately in training but pool every task's statistics at test
JOINT_NORM = "task_bn"
#: a primary contrast is a finding when its Holm-adjusted paired-t p-value is below this
ALPHA = 0.05
#: seeds up to this count: the sign-flip test enumerates all 2^n sign patterns; more: this many random ones
EXACT_SIGN_FLIPS = 16
RANDOM_SIGN_FLIPS = 1 << 16


@dataclass(frozen=True)
class Contrast:
    """One paired comparison a − b between two variants of a table, on the same seeds.

    Args:
        a: the first variant's label.
        b: the second variant's label (usually the control).
        metric: the metric the question is about (a key of the runs' metrics, e.g. ``"average_accuracy"``).
        primary: whether the ablation's question rests on it (Holm-corrected within the table); otherwise
            exploratory.
    """

    a: str
    b: str
    metric: str = "average_accuracy"
    primary: bool = False


def expand(contrasts: Sequence[Contrast | tuple[str, str]], metrics: Sequence[str]) -> list[Contrast]:
    """One contrast per pair and metric: a declared primary keeps its metric primary, every other metric of the
    pair (and every plain ``(a, b)`` pair) is exploratory. The order is the declaration's, primaries first within
    a pair."""
    out: dict[tuple[str, str, str], Contrast] = {}
    for c in contrasts:
        declared = c if isinstance(c, Contrast) else Contrast(*c)
        if declared.metric not in metrics:
            raise ValueError(f"contrast {declared.a} − {declared.b}: metric must be one of {list(metrics)}, got "
                             f"{declared.metric!r}")
        key = (declared.a, declared.b, declared.metric)
        if declared.primary or key not in out:
            out[key] = Contrast(declared.a, declared.b, declared.metric, declared.primary)
        for m in metrics:
            out.setdefault((declared.a, declared.b, m), Contrast(declared.a, declared.b, m))
    return list(out.values())


def paired_t_pvalue(differences: Sequence[float]) -> float:
    """The two-sided p-value of a paired t-test that the mean of ``differences`` (one per seed) is 0.

    Equal differences give 0 when they are not 0 and 1 when they are (the t statistic is infinite or undefined);
    one difference gives NaN.
    """
    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        return math.nan
    std = float(d.std(ddof=1))
    if std == 0:
        return 1.0 if float(d.mean()) == 0 else 0.0
    from scipy import stats  # the optional ``stats`` extra, loaded where a p-value is needed

    t = float(d.mean()) / (std / math.sqrt(len(d)))
    return float(2 * stats.t.sf(abs(t), df=len(d) - 1))


def sign_flip_pvalue(differences: Sequence[float], seed: int = 0) -> float:
    """The two-sided p-value of a sign-flip permutation test over seeds: the share of sign patterns whose mean
    difference is at least as far from 0 as the observed one (under no effect, each seed's difference is as
    likely negative as positive). Exact up to ``EXACT_SIGN_FLIPS`` seeds, else ``RANDOM_SIGN_FLIPS`` random
    patterns (seeded by ``seed``) with the observed one counted. Its smallest possible value is 2 / 2^n: 0.5
    for 2 seeds, 0.0625 for 5, 0.002 for 10.
    """
    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        return math.nan
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))
    if len(d) <= EXACT_SIGN_FLIPS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        return float(np.mean(np.abs(signs @ d / len(d)) >= observed - tolerance))
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(RANDOM_SIGN_FLIPS, len(d)))
    extreme = int(np.sum(np.abs(signs @ d / len(d)) >= observed - tolerance))
    return (extreme + 1) / (RANDOM_SIGN_FLIPS + 1)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN stays NaN and is not counted in the family).

    The i-th smallest of m p-values becomes max over j ≤ i of min(1, (m − j + 1)·p_(j)); rejecting where the
    adjusted value is below α keeps the family-wise error rate at α.
    """
    present = [(p, i) for i, p in enumerate(pvalues) if not math.isnan(p)]
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[i] = running
    return adjusted

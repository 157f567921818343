"""The ablations' statistical protocol: Holm's correction, the paired t-test, the sign-flip permutation test, and
the declaration of primary and exploratory contrasts."""

from __future__ import annotations

import argparse
import math

import pytest
from scipy import stats

from ablations._protocol import Contrast, expand, holm, paired_t_pvalue, sign_flip_pvalue
from ablations._report import contrast_cells
from ablations._results import METRICS, aggregate
from ablations._runner import Variant, run_and_report
from hatnorm.training import FineTune


def test_holm_multiplies_the_ith_smallest_by_m_minus_i_and_keeps_the_order() -> None:
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, then 0.04·1 = 0.04 raised to 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = holm([0.02, math.nan])  # NaN is no member of the family: one test, no correction
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1])


def test_paired_t_pvalue_is_scipys_paired_test() -> None:
    a, b = [0.91, 0.88, 0.93, 0.90, 0.87], [0.89, 0.88, 0.90, 0.86, 0.88]
    expected = stats.ttest_rel(a, b).pvalue
    assert paired_t_pvalue([x - y for x, y in zip(a, b, strict=True)]) == pytest.approx(expected)
    assert paired_t_pvalue([0.5, 0.5, 0.5]) == 0.0 and paired_t_pvalue([0.0, 0.0]) == 1.0
    assert math.isnan(paired_t_pvalue([0.3]))


def test_sign_flip_counts_the_sign_patterns_at_least_as_extreme() -> None:
    # all of 3 differences positive: only all-plus and all-minus reach |mean| = 2, 2 of 8 patterns
    assert sign_flip_pvalue([1.0, 2.0, 3.0]) == 0.25
    assert sign_flip_pvalue([1.0, -1.0]) == 1.0
    assert sign_flip_pvalue([0.01] * 10) == pytest.approx(2 / 2**10)
    # beyond 16 seeds: random patterns, the observed one counted, so never 0
    many = sign_flip_pvalue([0.01] * 20)
    assert 0 < many < 1e-3 and many == sign_flip_pvalue([0.01] * 20)
    assert math.isnan(sign_flip_pvalue([0.3]))


def test_a_declared_primary_keeps_its_metric_and_the_rest_is_exploratory() -> None:
    declared = expand([Contrast("a", "b", "bwt", primary=True), ("a", "c")], list(METRICS))
    roles = {(c.a, c.b, c.metric): c.primary for c in declared}
    assert roles == {("a", "b", "bwt"): True, ("a", "b", "average_accuracy"): False, ("a", "b", "rho_final"): False,
                     ("a", "c", "bwt"): False, ("a", "c", "average_accuracy"): False, ("a", "c", "rho_final"): False}
    with pytest.raises(ValueError, match=r"metric must be one of \['average_accuracy', 'bwt', 'rho_final'\], got "
                                         r"'accuracy'"):
        expand([Contrast("a", "b", "accuracy", primary=True)], list(METRICS))


def run_of(accuracy: float, bwt: float) -> dict[str, object]:
    return {"arch": "mlp", "norm": "none", "method": "hat", "parameters": 10, "accuracy": [[accuracy]],
            "rho": [0.0], "average_accuracy": accuracy, "bwt": bwt, "rho_final": 0.0, "epochs": [1], "seconds": 1.0}


def test_aggregate_corrects_only_the_primary_contrasts_of_the_table() -> None:
    seeds = range(6)
    by_seed = {s: {"control": run_of(0.80 + 0.01 * s, 0.0), "big": run_of(0.90 + 0.01 * s + 0.001 * (s % 2), 0.0),
                   "small": run_of(0.80 + 0.01 * s + 0.002 * (s % 3 - 1), -0.01)} for s in seeds}
    summary = aggregate(by_seed, [Contrast("big", "control", primary=True), Contrast("small", "control",
                                                                                        primary=True)])
    primaries = [c for c in summary["contrasts"] if c["primary"]]
    assert [(c["a"], c["metric"]) for c in primaries] == [("big", "average_accuracy"), ("small", "average_accuracy")]
    assert [c["p_holm"] for c in primaries] == pytest.approx(holm([c["p_t"] for c in primaries]))
    big, small = primaries
    assert big["finding"] and big["p_holm"] < 0.05 and not small["finding"]
    assert big["p_sign_flip"] == pytest.approx(2 / 2**6)  # every seed's difference positive
    for c in summary["contrasts"]:
        if not c["primary"]:
            assert c["p_holm"] is None and not c["finding"]
    assert summary["declared"][0] == {"a": "big", "b": "control", "metric": "average_accuracy", "primary": True}


def test_a_contrast_naming_no_variant_of_the_table_is_refused_before_anything_runs() -> None:
    variants = [Variant("hat", "mlp", "none", FineTune), Variant("sgd", "mlp", "none", FineTune)]
    with pytest.raises(ValueError, match=r"contrasts must pair variants of the table \['hat', 'sgd'\], got "
                                         r"\['hat − sdg'\]"):
        run_and_report(variants, lambda seed: [], argparse.Namespace(), None, joint_norm={}, title="t",
                       contrasts=[Contrast("hat", "sdg", primary=True)])


def test_a_contrast_of_a_run_made_before_the_protocol_reads_as_exploratory() -> None:
    old = {"a": "x", "b": "y", "metric": "bwt", "established": True,
           "difference": {"mean": 0.1, "std": 0.01, "low": 0.05, "high": 0.15, "n": 3, "confidence": 0.95}}
    assert contrast_cells(old) == ("x − y", "BWT", "exploratory", "+0.1000", "[+0.0500, +0.1500]", "n/a", "—", "n/a",
                                   "exploratory")


def test_a_metric_of_the_accuracy_matrix_is_reported_where_a_table_declares_it() -> None:
    """A[t][t] (each task right after it is learned) is read from the accuracy matrix; a table whose contrasts
    name it reports it, every other table keeps its metrics."""
    def run(diagonal: tuple[float, float], bwt: float) -> dict[str, object]:
        first, second = diagonal
        return run_of(0.0, bwt) | {"accuracy": [[first, math.nan], [first + bwt, second]]}

    by_seed = {s: {"sgd": run((0.95, 0.97 + 0.01 * s), -0.2), "hat": run((0.90, 0.93 - 0.01 * s), 0.0)}
               for s in range(3)}
    declared = [Contrast("sgd", "hat", "newest_accuracy", primary=True)]
    summary = aggregate(by_seed, declared)
    assert summary["variants"]["sgd"]["summary"]["newest_accuracy"]["mean"] == pytest.approx((0.95 + 0.98) / 2)
    gap = next(c for c in summary["contrasts"] if c["metric"] == "newest_accuracy")
    # seed s: (0.95 + 0.97 + 0.01 s) / 2 − (0.90 + 0.93 − 0.01 s) / 2 = 0.045 + 0.01 s, mean over s = 0, 1, 2
    assert gap["primary"] and gap["difference"]["mean"] == pytest.approx(0.055)
    assert contrast_cells(gap)[1] == "newest acc"
    plain = aggregate(by_seed, [Contrast("sgd", "hat", primary=True)])
    assert set(plain["variants"]["sgd"]["summary"]) == set(METRICS)
    assert {c["metric"] for c in plain["contrasts"]} == set(METRICS)

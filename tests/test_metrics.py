"""Metrics on hand-made accuracy matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hatnorm import metrics

A = [[0.9, 0.0, 0.0],
     [0.8, 0.7, 0.0],
     [0.6, 0.7, 0.5]]
JOINT = [[0.9, 0.0, 0.0],
         [0.9, 0.8, 0.0],
         [0.9, 0.8, 0.6]]
RANDOM = [0.5, 0.5, 0.25]


def test_average_accuracy() -> None:
    assert metrics.average_accuracy(A) == pytest.approx((0.6 + 0.7 + 0.5) / 3)
    assert metrics.average_accuracy(A, after=1) == pytest.approx(0.75)
    assert metrics.average_accuracy(A, after=0) == pytest.approx(0.9)


def test_backward_transfer() -> None:
    # ((0.6 - 0.9) + (0.7 - 0.7)) / 2
    assert metrics.backward_transfer(A) == pytest.approx(-0.15)
    assert metrics.backward_transfer([[0.8]]) == 0.0
    assert metrics.backward_transfer(torch.tensor([[0.9, 0.0], [0.9, 0.8]])) == 0.0


def test_forgetting_ratio_by_hand() -> None:
    rho = metrics.forgetting_ratio(A, RANDOM, JOINT)
    expected = {
        (0, 0): (0.9 - 0.5) / (0.9 - 0.5) - 1,   # 0: as good as joint training
        (1, 0): (0.8 - 0.5) / (0.9 - 0.5) - 1,   # -0.25
        (1, 1): (0.7 - 0.5) / (0.8 - 0.5) - 1,   # -1/3
        (2, 0): (0.6 - 0.5) / (0.9 - 0.5) - 1,   # -0.75
        (2, 1): (0.7 - 0.5) / (0.8 - 0.5) - 1,
        (2, 2): (0.5 - 0.25) / (0.6 - 0.25) - 1,
    }
    for (t, tau), value in expected.items():
        assert rho[t, tau] == pytest.approx(value)
    assert np.isnan(rho[0, 1]) and np.isnan(rho[1, 2])
    curve = metrics.mean_forgetting_ratio(A, RANDOM, JOINT)
    assert curve[0] == pytest.approx(0.0)
    assert curve[1] == pytest.approx((-0.25 - 1 / 3) / 2)
    assert curve[2] == pytest.approx((-0.75 - 1 / 3 + (0.25 / 0.35 - 1)) / 3)


def test_chance_level_is_minus_one() -> None:
    rho = metrics.forgetting_ratio([[0.5]], [0.5], [[0.9]])
    assert rho[0, 0] == pytest.approx(-1.0)


def test_undefined_ratio_is_nan() -> None:
    rho = metrics.forgetting_ratio(A, [0.9, 0.5, 0.25], JOINT)
    assert np.isnan(rho[0, 0]) and np.isnan(rho[2, 0])
    assert rho[2, 1] == pytest.approx((0.7 - 0.5) / (0.8 - 0.5) - 1)
    curve = metrics.mean_forgetting_ratio(A, [0.9, 0.5, 0.25], JOINT)
    assert np.isnan(curve).all()


def test_random_stratified_accuracy() -> None:
    train = torch.tensor([0, 0, 0, 1])   # p = (3/4, 1/4)
    test = torch.tensor([0, 1])          # q = (1/2, 1/2)
    assert metrics.random_stratified_accuracy(train, test) == pytest.approx(0.75 * 0.5 + 0.25 * 0.5)
    balanced = torch.arange(10).repeat(5)
    assert metrics.random_stratified_accuracy(balanced, balanced) == pytest.approx(0.1)
    assert math.isclose(metrics.random_stratified_accuracy(torch.tensor([2]), torch.tensor([3])), 0.0)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: metrics.average_accuracy([[0.5, 0.1]]),
     r"matrix must be a non-empty square matrix \[T, T\], got shape \[1, 2\]"),
    (lambda: metrics.average_accuracy(A, after=3), r"after must be an int in \[0, 3\), got 3"),
    (lambda: metrics.backward_transfer([[float("nan")]]), "matrix must be finite"),
    (lambda: metrics.forgetting_ratio(A, RANDOM[:2], JOINT), r"random \[3\]"),
    (lambda: metrics.random_stratified_accuracy(torch.tensor([]), torch.tensor([1])), "must not be empty"),
])
def test_bad_input_is_named(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()

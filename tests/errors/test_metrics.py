"""The metrics refuse a matrix, baseline or labels they cannot read."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hatnorm import metrics

A = [[0.9, 0.0], [0.8, 0.7]]


@pytest.mark.parametrize(("call", "exc", "match"), [
    (lambda: metrics.average_accuracy("A"), TypeError, r"^matrix must be a square matrix \[T, T\] of accuracies "
                                                       r"\(numbers\), got 'A'$"),
    (lambda: metrics.average_accuracy(None), TypeError, r"^matrix must be a square matrix .*, got None$"),
    (lambda: metrics.average_accuracy([[0.9, 0.1], [0.8]]), ValueError, r"^matrix must be a square matrix .*, got "
                                                                        r"\[\[0.9, 0.1\], \[0.8\]\] \("),
    (lambda: metrics.average_accuracy([0.9, 0.8]), ValueError, r"^matrix must be a non-empty square matrix \[T, T\], "
                                                               r"got shape \[2\]$"),
    (lambda: metrics.average_accuracy(np.zeros((0, 0))), ValueError, r"^matrix must be a non-empty square matrix"),
    (lambda: metrics.average_accuracy([[math.nan, 0.0], [0.5, 0.5]]), ValueError,
     r"^matrix must be finite on and below the diagonal"),
    (lambda: metrics.average_accuracy(A, after=2), ValueError, r"^after must be an int in \[0, 2\), got 2$"),
    (lambda: metrics.average_accuracy(A, after=True), ValueError, r"^after must be an int in \[0, 2\), got True$"),
    (lambda: metrics.backward_transfer(torch.ones(2, 3)), ValueError, r"^matrix must be a non-empty square matrix"),
    (lambda: metrics.forgetting_ratio(A, [0.5], A), ValueError, r"^joint must be \[2, 2\] and random \[2\], got "
                                                                r"\[2, 2\] and \[1\]$"),
    (lambda: metrics.forgetting_ratio(A, [0.5, math.nan], A), ValueError, r"^random must be finite, got "),
    (lambda: metrics.forgetting_ratio(A, "r", A), TypeError, r"^random must be one accuracy per task, got 'r'$"),
    (lambda: metrics.mean_forgetting_ratio(A, [0.5, 0.5], [[1.0]]), ValueError, r"^joint must be \[2, 2\]"),
    (lambda: metrics.random_stratified_accuracy([0, 1], torch.tensor([0])), TypeError,
     r"^train_labels must be an integer tensor of class labels, got \[0, 1\]$"),
    (lambda: metrics.random_stratified_accuracy(torch.tensor([0]), torch.tensor([0.5])), TypeError,
     r"^test_labels must be an integer tensor of class labels, got dtype torch.float32$"),
    (lambda: metrics.random_stratified_accuracy(torch.tensor([0]), torch.tensor([], dtype=torch.long)), ValueError,
     r"^train_labels and test_labels must not be empty, got 1 and 0 labels$"),
])
def test_metrics_refuse_bad_input(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()


"""Continual-learning metrics over an accuracy matrix.

``A[t][τ]`` is the accuracy on task τ after training tasks 0..t (rows: after task t; columns: tested
on τ). Entries with τ > t are not used by any metric here.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

Matrix = Sequence[Sequence[float]] | np.ndarray | Tensor


def _array(values: object, name: str, what: str) -> np.ndarray:
    """``values`` as a float64 array, or an error naming ``name`` and what it must be."""
    if isinstance(values, str | bytes) or values is None:
        raise TypeError(f"{name} must be {what}, got {values!r}")
    try:
        return np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64)
    except TypeError as error:
        raise TypeError(f"{name} must be {what}, got {values!r} ({error})") from None
    except ValueError as error:  # ragged rows, or text that is not a number
        raise ValueError(f"{name} must be {what}, got {values!r} ({error})") from None


def _square(matrix: Matrix, name: str) -> np.ndarray:
    a = _array(matrix, name, "a square matrix [T, T] of accuracies (numbers)")
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix [T, T], got shape {list(a.shape)}")
    lower = np.tril(a)
    if not np.isfinite(lower).all():
        raise ValueError(f"{name} must be finite on and below the diagonal, got {a.tolist()}")
    return a


def average_accuracy(matrix: Matrix, after: int | None = None) -> float:
    """Mean accuracy over tasks 0..t after training task t (the last task by default): mean_τ≤t A[t][τ]."""
    a = _square(matrix, "matrix")
    t = a.shape[0] - 1 if after is None else _index(after, a.shape[0], "after")
    return float(a[t, : t + 1].mean())


def backward_transfer(matrix: Matrix) -> float:
    """BWT = 1/(T−1) Σ_{τ<T−1} (A[T−1][τ] − A[τ][τ]) (Lopez-Paz & Ranzato 2017); 0 for a single task."""
    a = _square(matrix, "matrix")
    last = a.shape[0] - 1
    if last == 0:
        return 0.0
    return float(np.mean([a[last, tau] - a[tau, tau] for tau in range(last)]))


def forgetting_ratio(matrix: Matrix, random: Sequence[float], joint: Matrix) -> np.ndarray:
    """The forgetting ratio of Serrà et al.: ρ^{τ≤t} = (A^{τ≤t} − A_R^τ) / (A_J^{τ≤t} − A_R^τ) − 1.

    Args:
        matrix: the accuracy matrix of the method, ``[T, T]``.
        random: A_R^τ, the accuracy of a random stratified classifier on each task, ``[T]``.
        joint: A_J, the accuracy of joint multitask training on tasks ≤ t, tested on τ, ``[T, T]``.

    Returns:
        ``[T, T]`` array with ρ^{τ≤t} at ``[t, τ]`` for τ ≤ t and NaN above the diagonal. 0 means the
        method matches joint training, −1 means it is no better than chance. Where joint training is
        itself at chance (A_J = A_R) ρ is undefined and NaN.

    Raises:
        ValueError: for shapes that disagree.
    """
    a = _square(matrix, "matrix")
    j = _square(joint, "joint")
    r = _array(random, "random", "one accuracy per task")
    if j.shape != a.shape or r.shape != (a.shape[0],):
        raise ValueError(f"joint must be [{a.shape[0]}, {a.shape[0]}] and random [{a.shape[0]}], "
                         f"got {list(j.shape)} and {list(r.shape)}")
    if not np.isfinite(r).all():
        raise ValueError(f"random must be finite, got {r.tolist()}")
    rho = np.full(a.shape, np.nan)
    for t in range(a.shape[0]):
        for tau in range(t + 1):
            span = j[t, tau] - r[tau]
            if span != 0:
                rho[t, tau] = (a[t, tau] - r[tau]) / span - 1
    return rho


def mean_forgetting_ratio(matrix: Matrix, random: Sequence[float], joint: Matrix) -> np.ndarray:
    """ρ^{≤t} = mean over τ ≤ t of ρ^{τ≤t}, for every t: ``[T]`` (the curve of Serrà et al.'s Figure 4).

    A row with an undefined ρ^{τ≤t} (see :func:`forgetting_ratio`) gives NaN.
    """
    rho = forgetting_ratio(matrix, random, joint)
    return np.array([rho[t, : t + 1].mean() for t in range(rho.shape[0])])


def random_stratified_accuracy(train_labels: Tensor, test_labels: Tensor) -> float:
    """Expected accuracy of a classifier that draws each prediction from the training class frequencies.

    Σ_c p_train(c) · p_test(c): exact, so no random seed enters the metric.

    Args:
        train_labels: the training set's class labels, a non-empty integer tensor.
        test_labels: the test set's class labels, a non-empty integer tensor.
    """
    for name, labels in (("train_labels", train_labels), ("test_labels", test_labels)):
        if not isinstance(labels, Tensor):
            raise TypeError(f"{name} must be an integer tensor of class labels, got {labels!r}")
    if train_labels.numel() == 0 or test_labels.numel() == 0:
        raise ValueError(f"train_labels and test_labels must not be empty, got {train_labels.numel()} and "
                         f"{test_labels.numel()} labels")
    for name, labels in (("train_labels", train_labels), ("test_labels", test_labels)):
        if labels.dtype.is_floating_point or labels.dtype.is_complex:
            raise TypeError(f"{name} must be an integer tensor of class labels, got dtype {labels.dtype}")
    classes = torch.cat([train_labels.flatten(), test_labels.flatten()]).unique()
    p = torch.stack([(train_labels == c).double().mean() for c in classes])
    q = torch.stack([(test_labels == c).double().mean() for c in classes])
    return float((p * q).sum())


def _index(value: int, size: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < size:
        raise ValueError(f"{name} must be an int in [0, {size}), got {value!r}")
    return int(value)

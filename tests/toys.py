"""Toy task sequences shared by the trainer, checkpoint and multi-process tests."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from hatnorm.data import Task


def toy_tasks(n: int = 2, samples: int = 320, shape: tuple[int, ...] = (16,), *, test: int = 40,
              dtype: torch.dtype = torch.float32) -> list[Task]:
    """``n`` two-class tasks, task ``k`` labelled by the sign of input feature ``k``.

    The classes are separated by a gap: feature ``k`` is pushed at least 1 away from 0 (about two of
    its standard deviations), so a few epochs learn every task on any floating-point path and the
    accuracy checks that follow have a wide margin rather than a lucky one.
    """
    generator = torch.Generator().manual_seed(0)
    tasks = []
    for k in range(n):
        x = torch.randn(samples + test, *shape, generator=generator, dtype=dtype)
        flat = x.view(len(x), -1)
        flat[:, k] += flat[:, k].sign()
        y = (flat[:, k] > 0).long()
        tasks.append(Task(f"toy-{k}", (0, 1), TensorDataset(x[:samples], y[:samples]),
                          TensorDataset(x[samples:], y[samples:])))
    return tasks

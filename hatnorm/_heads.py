"""Multi-head output: one linear head per task, used and trained only for its task."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import final

import torch
from torch import Tensor, nn

from hatnorm._checks import check_batch, check_num_tasks, check_positive_int, check_task


def class_counts(num_classes: int | Sequence[int], num_tasks: int) -> list[int]:
    """``num_classes`` as one count per task: an int is repeated, a sequence must have ``num_tasks`` counts ≥ 1."""
    num_tasks = check_num_tasks(num_tasks)
    if isinstance(num_classes, numbers.Integral) and not isinstance(num_classes, bool):
        return [check_positive_int(num_classes, "num_classes")] * num_tasks
    if not isinstance(num_classes, Sequence) or isinstance(num_classes, str | bytes):
        raise TypeError(f"num_classes must be an int or a sequence of {num_tasks} ints, got {num_classes!r}")
    counts = list(num_classes)
    if len(counts) != num_tasks:
        raise ValueError(f"num_classes must have one count per task ({num_tasks}), got {len(counts)}: {counts}")
    return [check_positive_int(c, f"num_classes[{i}]") for i, c in enumerate(counts)]


@final
class TaskHeads(nn.Module):
    """One ``nn.Linear`` head per task; ``forward(x, task)`` uses head ``task`` only.

    Head t is owned by task t: :class:`hatnorm.HAT` trains it during task t and freezes it after.

    Args:
        in_features: the features of the last hidden layer.
        num_classes: the class count of every task, or one count per task.
        num_tasks: number of tasks.
    """

    def __init__(self, in_features: int, num_classes: int | Sequence[int], *, num_tasks: int) -> None:
        super().__init__()
        self.in_features = check_positive_int(in_features, "in_features")
        self.num_classes = class_counts(num_classes, num_tasks)
        self.num_tasks = int(num_tasks)
        self.heads = nn.ModuleList(nn.Linear(in_features, c) for c in self.num_classes)

    def forward(self, x: Tensor, task: int) -> Tensor:
        """The logits of task ``task`` for ``x`` ``[N, in_features]``: ``[N, num_classes[task]]``."""
        task = check_task(task, self.num_tasks)
        check_batch(x, (self.in_features,), like=self.heads[task].weight)
        return self.heads[task](x)

    def gradient_multipliers(self, task: int) -> dict[str, Tensor]:
        """Head ``task`` trains (multiplier 1), every other head is frozen (0)."""
        task = check_task(task, self.num_tasks)
        return {
            name: torch.full_like(p, float(name.split(".")[1] == str(task)))
            for name, p in self.named_parameters()
        }

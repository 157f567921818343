"""Multi-head output: one head per task (linear, or a convolution for a convolutional classifier), used and
trained only for its task."""

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


_SPATIAL = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


@final
class TaskHeads(nn.Module):
    """One head per task; ``forward(x, task)`` uses head ``task`` only.

    A head is an ``nn.Linear``, or, with ``conv``, a convolution configured like ``conv`` (kernel size, stride,
    padding, dilation, padding mode, bias) with its task's class count as output channels: the classifier of a
    model whose logits come from a convolution (SqueezeNet's ``Conv2d(512, classes, 1)``).
    Head t is owned by task t: :class:`hatnorm.HAT` trains it during task t and freezes it after.

    Args:
        in_features: the features of the last hidden layer (the input channels of a convolutional head).
        num_classes: the class count of every task, or one count per task.
        num_tasks: number of tasks.
        conv: the convolution each head is configured like (``nn.Conv1d``/``2d``/``3d`` with ``groups=1`` and
            ``in_features`` input channels); ``None`` for linear heads.
        bias: whether linear heads have a bias (MaxViT's classifier has none); a convolutional head has one
            when ``conv`` has.
    """

    def __init__(self, in_features: int, num_classes: int | Sequence[int], *, num_tasks: int,
                 conv: nn.Conv1d | nn.Conv2d | nn.Conv3d | None = None, bias: bool = True) -> None:
        super().__init__()
        in_features = check_positive_int(in_features, "in_features")
        counts = class_counts(num_classes, num_tasks)
        if conv is not None:
            if not isinstance(conv, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                raise TypeError(f"conv must be an nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(conv).__name__}")
            if conv.groups != 1 or conv.in_channels != in_features:
                raise ValueError(f"conv must have groups=1 and in_features={in_features} input channels, got "
                                 f"groups={conv.groups} and {conv.in_channels} input channels")
        self.in_features = in_features
        self.num_classes = counts
        self.num_tasks = int(num_tasks)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {bias!r}")
        self.heads = nn.ModuleList(nn.Linear(in_features, c, bias=bias) if conv is None else type(conv)(
            in_features, c, conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            bias=conv.bias is not None, padding_mode=conv.padding_mode) for c in counts)
        self._shape = (in_features,) if conv is None else (in_features, *_SPATIAL[len(conv.kernel_size)])

    @property
    def convolutional(self) -> bool:
        """Whether the heads are convolutions (reading ``[N, in_features, *spatial]``)."""
        return len(self._shape) > 1

    def forward(self, x: Tensor, task: int, *, trusted: bool = False) -> Tensor:
        """The logits of task ``task`` for ``x`` ``[N, in_features]``: ``[N, num_classes[task]]``; for
        convolutional heads, ``x`` ``[N, in_features, *spatial]`` gives ``[N, num_classes[task], *spatial']``.

        Args:
            x: the features.
            task: the task id, in ``[0, num_tasks)``.
            trusted: the caller has checked ``task`` and made ``x`` itself (a model that validated its input and
                task at the top), so neither is checked again.
        """
        if not trusted:
            task = check_task(task, self.num_tasks)
            check_batch(x, self._shape, like=self.heads[task].weight)
        return self.heads[task](x)

    def gradient_multipliers(self, task: int) -> dict[str, Tensor]:
        """Head ``task`` trains (multiplier 1), every other head is frozen (0)."""
        task = check_task(task, self.num_tasks)
        return {
            name: torch.full_like(p, float(name.split(".")[1] == str(task)))
            for name, p in self.named_parameters()
        }

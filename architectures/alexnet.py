"""Serrà et al.'s AlexNet (HAT, 2018): three convolutions and two fully connected layers, gated."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from hatnorm import HATGate, HATModule, MaskedNorm, NormSpec, TaskHeads, register_architecture
from hatnorm.blocks import Flatten, Layer, MaskSource
from hatnorm.checks import check_batch, check_batch_statistics, check_positive_int, check_task_and_scale
from hatnorm.norms import NoNorm


def _conv_out(size: int, kernel: int) -> int:
    """Side after a valid convolution with ``kernel`` and a 2×2 max-pool."""
    return (size - kernel + 1) // 2


class AlexNet(HATModule):
    """conv 64 (k = size//8) → conv 128 (k = size//10) → conv 256 (k = 2), each norm → gate → ReLU →
    dropout (0.2, 0.2, 0.5) → max-pool 2; FC 2048 → FC 2048 with dropout 0.5; one head per task.

    Args:
        num_classes: one class count per task.
        num_tasks: number of tasks.
        norm_layer_2d: norm factory for the convolutions (``[N, C, H, W]``).
        norm_layer_1d: norm factory for the fully connected layers (``[N, C]``).
        in_channels: input channels.
        size: input side, ≥ 28.
        norm_at: which of the 5 hidden layers get ``norm_layer``; the others only their gate.
        width: scales every layer's width (64, 128, 256, 2048, 2048 at 1.0); < 1 for quick CPU runs.
        s_max: the gates' largest scale.
    """

    def __init__(
        self,
        num_classes: Sequence[int],
        *,
        num_tasks: int,
        norm_layer_2d: Callable[[int], MaskedNorm],
        norm_layer_1d: Callable[[int], MaskedNorm],
        in_channels: int = 3,
        size: int = 32,
        norm_at: Sequence[bool] = (True,) * 5,
        width: float = 1.0,
        s_max: float = 400.0,
    ) -> None:
        super().__init__()
        if not isinstance(size, int) or size < 28:
            raise ValueError(f"size must be an int ≥ 28, got {size!r}")
        if len(norm_at) != 5:
            raise ValueError(f"norm_at must have 5 flags (3 convolutions, 2 fully connected), got {list(norm_at)}")
        kernels = (size // 8, size // 10, 2)
        side = size
        for k in kernels:
            side = _conv_out(side, k)
        if side < 1:
            raise ValueError(f"size {size} leaves no spatial positions after the three conv/pool stages")
        if not isinstance(width, int | float) or not 0 < width <= 16:
            raise ValueError(f"width must be a number in (0, 16], got {width!r}")
        self.in_channels, self.size = check_positive_int(in_channels, "in_channels"), size
        widths = tuple(max(1, round(w * width)) for w in (64, 128, 256, 2048, 2048))
        c1, c2, c3, f1, f2 = widths
        self.convs = nn.ModuleList([
            nn.Conv2d(in_channels, c1, kernels[0]), nn.Conv2d(c1, c2, kernels[1]), nn.Conv2d(c2, c3, kernels[2])])
        self.fcs = nn.ModuleList([nn.Linear(c3 * side * side, f1), nn.Linear(f1, f2)])
        self.norms = nn.ModuleList(
            (factory(w) if use else NoNorm(w, num_tasks=num_tasks))
            for w, use, factory in zip(widths, norm_at, [norm_layer_2d] * 3 + [norm_layer_1d] * 2, strict=True))
        self.gates = nn.ModuleList(HATGate(w, num_tasks=num_tasks, s_max=s_max) for w in widths)
        self.drops = nn.ModuleList(nn.Dropout(p) for p in (0.2, 0.2, 0.5, 0.5, 0.5))
        self.task_heads = TaskHeads(f2, num_classes, num_tasks=num_tasks)
        self.num_tasks = self.task_heads.num_tasks
        self.positions = side * side
        # the positions each norm sees per sample: a convolution's output map (before its pool), 1 after an FC
        seen, edge = [], size
        for k in kernels:
            seen.append((edge - k + 1) ** 2)
            edge = _conv_out(edge, k)
        seen += [1, 1]
        self._fewest_positions = min((p for p, norm in zip(seen, self.norms, strict=True) if norm.batch_statistics),
                                     default=None)

    def forward(self, x: Tensor, task: int, s: float | Tensor | None = None) -> Tensor:
        """The logits of task ``task`` for images ``x`` ``[N, in_channels, size, size]`` (N ≥ 1)."""
        check_batch(x, (self.in_channels, self.size, self.size), like=self.convs[0].weight)
        check_batch_statistics(x, self._fewest_positions, training=self.training)
        task, s = check_task_and_scale(task, s, num_tasks=self.num_tasks, training=self.training)
        # checked once here: the gates, norms and heads below take the trusted path
        h = x
        for i, conv in enumerate(self.convs):
            h = self.drops[i](F.relu(self.norms[i](conv(h), self.gates[i](task, s, trusted=True), task, trusted=True)))
            h = F.max_pool2d(h, 2)
        h = h.flatten(1)  # [N, c3·side·side]
        for i, fc in enumerate(self.fcs, start=3):
            h = self.drops[i](F.relu(self.norms[i](fc(h), self.gates[i](task, s, trusted=True), task, trusted=True)))
        return self.task_heads(h, task, trusted=True)

    def hat_layers(self) -> list[Layer]:
        g = self.gates
        inputs = [None, g[0], g[1], Flatten(g[2], self.positions), g[3]]
        weighted = [*self.convs, *self.fcs]
        return [layer for i in range(5) for layer in (
            Layer(weighted[i], out=g[i], inp=inputs[i]), Layer(self.norms[i], out=g[i]))]

    def head_units(self) -> MaskSource:
        return self.gates[4]


@register_architecture("alexnet", family="batch")
def alexnet(*, num_tasks: int, norm: NormSpec, num_classes: list[int], **options: Any) -> AlexNet:
    """Serrà's AlexNet for ``size``×``size`` inputs (default 32, ``in_channels`` 3, ``width`` 1)."""
    return AlexNet(num_classes, num_tasks=num_tasks, norm_layer_2d=norm.layer(num_tasks=num_tasks, dims=2),
                   norm_layer_1d=norm.layer(num_tasks=num_tasks, dims=1), **options)

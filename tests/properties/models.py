"""A small gated network for the property tests: data → (weighted layer → norm(x, a, t) → ReLU) × depth,
optionally followed by one head per task (after global average pooling for conv layers)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

import hatnorm


class GatedNet(hatnorm.HATModule):
    """``Linear`` (``[N, C]`` features) or 3×3 ``Conv2d`` (``[N, C, H, W]`` maps) layers, each followed by a
    task-aware norm that receives the layer's gate, then ReLU; with ``num_classes``, a :class:`TaskHeads`.

    Args:
        in_features: input features (linear) or channels (conv).
        widths: the units of each hidden layer.
        norm_layer: the norm factory, ``norm_layer(num_features)``.
        num_tasks: number of tasks.
        conv: convolutional layers instead of linear ones.
        num_classes: the class count of every task's head, which reads the last hidden layer (average-pooled
            over positions for conv); ``None`` for no heads (the output is the last hidden layer).
    """

    def __init__(self, in_features: int, widths: Sequence[int], *, norm_layer: Callable[[int], nn.Module],
                 num_tasks: int, conv: bool = False, num_classes: int | None = None) -> None:
        super().__init__()
        sizes = [in_features, *widths]
        if conv:
            self.layers = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in zip(sizes, widths, strict=False))
        else:
            self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(sizes, widths, strict=False))
        self.norms = nn.ModuleList(norm_layer(w) for w in widths)
        self.gates = nn.ModuleList(hatnorm.HATGate(w, num_tasks=num_tasks) for w in widths)
        self.task_heads = (None if num_classes is None
                           else hatnorm.TaskHeads(widths[-1], num_classes, num_tasks=num_tasks))

    def forward(self, x: Tensor, task: int, s: float | None = None) -> Tensor:
        for layer, norm, gate in zip(self.layers, self.norms, self.gates, strict=True):
            x = F.relu(norm(layer(x), gate(task, s), task))
        if self.task_heads is None:
            return x
        return self.task_heads(x.mean((2, 3)) if x.dim() == 4 else x, task)

    def hat_layers(self) -> list[hatnorm.blocks.Layer]:
        wiring = []
        previous = None  # the first layer reads data
        for layer, norm, gate in zip(self.layers, self.norms, self.gates, strict=True):
            wiring += [hatnorm.blocks.Layer(layer, out=gate, inp=previous), hatnorm.blocks.Layer(norm, out=gate)]
            previous = gate
        return wiring


def gated_net(norm: str, in_features: int, widths: Sequence[int], *, num_tasks: int, conv: bool = False,
              num_classes: int | None = None) -> GatedNet:
    """A :class:`GatedNet` with the registered norm ``norm``."""
    norm_layer = hatnorm.get_norm(norm).layer(num_tasks=num_tasks, dims=2 if conv else 1)
    return GatedNet(in_features, widths, norm_layer=norm_layer, num_tasks=num_tasks, conv=conv,
                    num_classes=num_classes)


def isolating_norms(conv: bool) -> list[str]:
    """The registered norms that declare they forget nothing (``MaskedNorm.isolates_tasks``) and fit a
    :class:`GatedNet` of linear (``[N, C]``) or conv (``[N, C, H, W]``) layers: built-in and plug-in alike."""
    return [name for name in hatnorm.list_norms() if hatnorm.get_norm(name).isolates_tasks
            and (not conv or hatnorm.get_norm(name).fits("batch"))]

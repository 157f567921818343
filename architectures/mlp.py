"""A gated multilayer perceptron: Linear → norm(x, a, t) → ReLU per hidden layer, one head per task."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from hatnorm import HATGate, HATModule, MaskedNorm, NormSpec, TaskHeads, register_architecture
from hatnorm.blocks import Layer, MaskSource
from hatnorm.checks import check_batch_statistics, check_flat_batch, check_positive_int, check_task_and_scale


class GatedMLP(HATModule):
    """Hidden layers ``Linear → norm → gate → ReLU`` over flattened inputs, then per-task heads.

    Args:
        in_features: the number of input features (inputs are flattened from dim 1).
        hidden: the width of each hidden layer.
        num_classes: one class count per task.
        num_tasks: number of tasks.
        norm_layer: ``norm_layer(num_features)`` → a :class:`MaskedNorm` over ``[N, C]``.
        s_max: the gates' largest scale.
        dropout: dropout after each hidden activation.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        num_classes: Sequence[int],
        *,
        num_tasks: int,
        norm_layer: Callable[[int], MaskedNorm],
        s_max: float = 400.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int(in_features, "in_features")
        if not isinstance(hidden, Sequence) or not hidden:
            raise ValueError(f"hidden must be a non-empty sequence of layer widths, got {hidden!r}")
        hidden = [check_positive_int(w, f"hidden[{i}]") for i, w in enumerate(hidden)]
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        widths = [in_features, *hidden]
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.norms = nn.ModuleList(norm_layer(w) for w in hidden)
        self.gates = nn.ModuleList(HATGate(w, num_tasks=num_tasks, s_max=s_max) for w in hidden)
        self.drop = nn.Dropout(dropout)
        self.task_heads = TaskHeads(widths[-1], num_classes, num_tasks=num_tasks)
        self.num_tasks = self.task_heads.num_tasks
        # every norm sees [N, C]: one value per sample and channel
        self._fewest_positions = 1 if any(norm.batch_statistics for norm in self.norms) else None

    def forward(self, x: Tensor, task: int, s: float | Tensor | None = None) -> Tensor:
        """The logits of task ``task`` for ``x`` ``[N, ...]`` with ``in_features`` values per sample (N ≥ 1)."""
        check_flat_batch(x, self.in_features, like=self.fcs[0].weight)
        check_batch_statistics(x, self._fewest_positions, training=self.training)
        task, s = check_task_and_scale(task, s, num_tasks=self.num_tasks, training=self.training)
        # checked once here: the gates, norms and heads below take the trusted path
        h = x.flatten(1)  # [N, in_features]
        for fc, norm, gate in zip(self.fcs, self.norms, self.gates, strict=True):
            h = self.drop(F.relu(norm(fc(h), gate(task, s, trusted=True), task, trusted=True)))
        return self.task_heads(h, task, trusted=True)

    def hat_layers(self) -> list[Layer]:
        layers = []
        previous = None  # the first layer reads data
        for fc, norm, gate in zip(self.fcs, self.norms, self.gates, strict=True):
            layers += [Layer(fc, out=gate, inp=previous), Layer(norm, out=gate)]
            previous = gate
        return layers

    def head_units(self) -> MaskSource:
        return self.gates[-1]


@register_architecture("mlp", family="any")
def mlp(
    *,
    num_tasks: int,
    norm: NormSpec,
    num_classes: list[int],
    in_features: int = 1024,
    hidden: Sequence[int] = (256, 256),
    **options: Any,
) -> GatedMLP:
    """A gated MLP (default 1024 → 256 → 256 → heads), for flattened 32×32 single-channel images."""
    return GatedMLP(in_features, hidden, num_classes, num_tasks=num_tasks, norm_layer=norm.layer(num_tasks=num_tasks,
                    dims=1), **options)

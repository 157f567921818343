"""A task-aware norm from outside hatnorm: masked BatchNorm statistics with a per-task affine.

Registered as ``"example_task_affine_bn"`` when hatnorm loads the ``hatnorm.norms`` entry points. It is
written against hatnorm's public API only (the :class:`hatnorm.MaskedNorm` protocol,
:func:`hatnorm.functional.masked_batch_norm`, :class:`hatnorm.exported.ExportedBatchNorm`), and hatnorm's tests check
that it trains without forgetting, exports, recalibrates and synchronises across processes like a built-in
norm: the proof that the protocol is the one extension point.

Per task t: running statistics ``[T, C]`` moved only on the units task t selects (masked BN), and its own
γ_t, β_t (per-task BN), output a ⊙ (γ_t·x̂ + β_t). The class declares its layout and ranks once; its gradient
multipliers follow from its parameters' shapes (``[T, C]``: task t trains row t only).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

import hatnorm

NAME = "example_task_affine_bn"


@hatnorm.register_norm(NAME)
class TaskAffineBatchNorm(hatnorm.MaskedNorm):
    """Masked BatchNorm statistics with one γ, β per task, over ``[N, C, *]``.

    Args:
        num_features: number of channels C.
        num_tasks: number of tasks T.
        dims: the layout hatnorm's builders pass (1: ``[N, C]``/``[N, C, L]``, 2: ``[N, C, H, W]``).
        eps: added to the variance.
        momentum: running-statistics momentum.
    """

    layout = "channels_first"
    ranks: ClassVar[dict[int | None, tuple[int, ...]]] = {1: (2, 3), 2: (4,)}
    batch_statistics = True
    isolates_tasks = True
    replaces = (nn.BatchNorm1d, nn.BatchNorm2d)

    def __init__(self, num_features: int, *, num_tasks: int, dims: int | None = 2, eps: float = 1e-5,
                 momentum: float = 0.1) -> None:
        super().__init__(num_features, num_tasks=num_tasks, dims=dims)
        self.eps, self.momentum = float(eps), float(momentum)
        self.weight = nn.Parameter(torch.ones(num_tasks, num_features))
        self.bias = nn.Parameter(torch.zeros(num_tasks, num_features))
        self.register_buffer("running_mean", torch.zeros(num_tasks, num_features))
        self.register_buffer("running_var", torch.ones(num_tasks, num_features))
        self.process_group: ProcessGroup | None = None

    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        return hatnorm.functional.masked_batch_norm(x, gate, self.weight[task], self.bias[task],
                                                    self.running_mean[task], self.running_var[task],
                                                    training=self.training, momentum=self.momentum,
                                         eps=self.eps, process_group=self.process_group)

    @classmethod
    def options_from(cls, module: nn.Module) -> dict[str, Any]:
        if not module.affine or not module.track_running_stats:
            raise ValueError(f"only BatchNorm1d/2d with affine=True and running statistics convert, got {module}")
        return {"eps": module.eps, "momentum": module.momentum or 0.1,
                "dims": 1 if isinstance(module, nn.BatchNorm1d) else 2}

    def export(self, task: int, gate: Tensor, keep: Tensor) -> nn.Module:
        def kept(t: Tensor) -> Tensor:
            return t.detach()[task, keep]

        return hatnorm.exported.ExportedBatchNorm(kept(self.weight) * gate, kept(self.bias) * gate,
                                         kept(self.running_mean).clone(), kept(self.running_var).clone(), self.eps)

    def running_statistics(self) -> list[Tensor]:
        return [self.running_mean, self.running_var]

    def statistics_slot(self, task: int) -> int | None:
        return task

    def sync(self, process_group: ProcessGroup | None) -> None:
        self.process_group = process_group

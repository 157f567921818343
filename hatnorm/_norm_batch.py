"""The channels-first norms over ``[N, C, *]`` (CNNs): the batch-statistics norms (masked, per-task, shared
and post-gate BatchNorm) and the masked GroupNorm and channel LayerNorm."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hatnorm._checks import check_non_negative, check_positive, check_positive_int
from hatnorm._exported import ExportedBatchNorm, ExportedGate, ExportedGroupNorm, ExportedLayerNorm
from hatnorm._norm_functional import (
    masked_batch_norm,
    masked_group_norm,
    masked_layer_norm,
    per_channel,
    selective_batch_norm,
)
from hatnorm._norm_protocol import ANY_RANK, MaskedNorm, unit_values

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

#: the input ranks per ``dims``: 1 (``[N, C]``, ``[N, C, L]``), 2 (``[N, C, H, W]``), ``None`` (any ``[N, C, *]``)
CHANNELS_FIRST_RANKS = {1: (2, 3), 2: (4,), None: ANY_RANK}


class _BatchNormBase(MaskedNorm):
    """Validation, options and the protocol hooks shared by the batch-statistics norms.

    ``process_group``: when set (by :func:`hatnorm.convert_sync`), training statistics are computed over
    the batches of every rank of the group; ``None`` normalises each process's batch alone. ``frozen``
    (set by :meth:`freeze`): the norm normalises with its running statistics in training too. ``dims``
    narrows the input layout: 1 (``[N, C]`` or ``[N, C, L]``), 2 (``[N, C, H, W]``), ``None`` (any
    ``[N, C, *]``).
    """

    layout = "channels_first"
    ranks = CHANNELS_FIRST_RANKS
    batch_statistics = True
    replaces = (nn.BatchNorm1d, nn.BatchNorm2d)
    #: γ, β one row per task (``[T, C]``), or shared by all tasks (``[C]``)
    per_task_affine: ClassVar[bool] = False
    #: running statistics one row per task (``[T, C]``), or shared by all tasks (``[C]``)
    per_task_statistics: ClassVar[bool] = True

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-5, momentum: float = 0.1,
                 dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks, dims=dims)
        self.eps = check_positive(eps, "eps")
        self.momentum = check_non_negative(momentum, "momentum")
        if self.momentum > 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        self.process_group: ProcessGroup | None = None
        self.frozen = False
        affine = (num_tasks, num_features) if self.per_task_affine else (num_features,)
        statistics = (num_tasks, num_features) if self.per_task_statistics else (num_features,)
        self.weight = nn.Parameter(torch.ones(affine))
        self.bias = nn.Parameter(torch.zeros(affine))
        self.register_buffer("running_mean", torch.zeros(statistics))
        self.register_buffer("running_var", torch.ones(statistics))

    @classmethod
    def options_from(cls, module: nn.Module) -> dict[str, Any]:
        if not isinstance(module, cls.replaces) or not module.affine or not module.track_running_stats:
            raise ValueError(f"only BatchNorm1d/2d with affine=True and running statistics convert, got {module}")
        return {"eps": module.eps, "momentum": module.momentum or 0.1,
                "dims": 1 if isinstance(module, nn.BatchNorm1d) else 2}

    def freeze(self) -> None:
        """Hold the norm at its current values, as PackNet and Piggyback hold pretrained BatchNorm: training
        normalises with the running statistics (which no longer move, recalibration included) and γ, β
        get no gradient (``requires_grad`` off, so optimizers leave them out)."""
        self.frozen = True
        for p in self.parameters(recurse=False):
            p.requires_grad_(False)

    @property
    def _batch_statistics(self) -> bool:
        """Whether this call normalises with batch statistics (and moves the running ones)."""
        return self.training and not self.frozen

    def export(self, task: int, gate: Tensor, keep: Tensor) -> nn.Module:
        return ExportedBatchNorm(unit_values(self.weight, task, keep) * gate,
                                 unit_values(self.bias, task, keep) * gate,
                                 unit_values(self.running_mean, task, keep).clone(),
                                 unit_values(self.running_var, task, keep).clone(), self.eps)

    def running_statistics(self) -> list[Tensor]:
        return [self.running_mean, self.running_var]

    def statistics_slot(self, task: int) -> int | None:
        return task if self.running_mean.dim() == 2 else None

    def sync(self, process_group: ProcessGroup | None) -> None:
        self.process_group = process_group

    def validate(self, x: Tensor, gate: Tensor, task: int) -> int:
        task = super().validate(x, gate, task)
        if self._batch_statistics and x.numel() // self.num_features < 2:
            raise ValueError(f"x: batch statistics need more than 1 value per channel in training, "
                             f"got shape {list(x.shape)}")
        return task


@final
class MaskedBatchNorm(_BatchNormBase):
    """Masked BatchNorm: shared γ/β, per-task running statistics, over ``[N, C, *]``.

    Output a ⊙ (γ·x̂ + β). In training, task t's running statistics move only for units with
    a > 0.5; every other unit and task keeps its statistics bit-identical. Evaluation uses task t's
    statistics. γ/β are protected by HAT like a bias. ``MaskedBatchNorm1d`` and ``MaskedBatchNorm2d``
    are this class.

    Args:
        num_features: number of channels C.
        num_tasks: number of tasks T.
        eps: added to the variance [1e-5].
        momentum: running-statistics momentum [0.1].
        dims: the input layout: 1 (``[N, C]``, ``[N, C, L]``), 2 (``[N, C, H, W]``) or ``None`` (any) [None].
    """

    isolates_tasks = True

    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        return masked_batch_norm(x, gate, self.weight, self.bias, self.running_mean[task], self.running_var[task],
                                 training=self._batch_statistics, momentum=self.momentum, eps=self.eps,
                                 process_group=self.process_group)


@final
class TaskBatchNorm(_BatchNormBase):
    """Per-task BatchNorm over ``[N, C, *]``: T independent BatchNorms, output a ⊙ BN_t(x).

    Task t trains BN t alone; the other tasks' γ, β and statistics are frozen (no gradient, no
    statistic update, not moved by the optimizer under :meth:`HAT.step`). ``TaskBatchNorm1d`` and
    ``TaskBatchNorm2d`` are this class.

    Args:
        num_features: number of channels C.
        num_tasks: number of tasks T.
        eps: added to the variance [1e-5].
        momentum: running-statistics momentum [0.1].
        dims: the input layout: 1 (``[N, C]``, ``[N, C, L]``), 2 (``[N, C, H, W]``) or ``None`` (any) [None].
    """

    isolates_tasks = True
    per_task_affine = True

    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        return selective_batch_norm(x, None, self.weight[task] * gate, self.bias[task] * gate, self.running_mean[task],
                                    self.running_var[task], training=self._batch_statistics, momentum=self.momentum,
                                    eps=self.eps, process_group=self.process_group)


@final
class SharedBatchNorm(_BatchNormBase):
    """The naive baseline over ``[N, C, *]``: one BatchNorm shared by all tasks, a ⊙ BN(x).

    γ/β are protected like a bias; the running statistics are shared and drift to the newest task,
    which is what makes HAT forget with an ordinary BatchNorm. ``SharedBatchNorm1d`` and
    ``SharedBatchNorm2d`` are this class.

    Args: as :class:`MaskedBatchNorm`.
    """

    per_task_statistics = False

    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        return selective_batch_norm(x, None, self.weight * gate, self.bias * gate, self.running_mean,
                                    self.running_var, training=self._batch_statistics, momentum=self.momentum,
                                    eps=self.eps, process_group=self.process_group)


@final
class PostGateBatchNorm(_BatchNormBase):
    """The placement ablation over ``[N, C, *]``: BN_t(a ⊙ x), the norm after the gate, with masked BN's
    shared γ/β and per-task statistics.

    Its output is not gated: units the task does not select still emit β, which later tasks may change,
    so it cannot be exported. ``PostGateBatchNorm1d`` and ``PostGateBatchNorm2d`` are this class.

    Args: as :class:`MaskedBatchNorm`.
    """

    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        return selective_batch_norm(x * per_channel(gate, x), gate.detach() > 0.5, self.weight, self.bias,
                                    self.running_mean[task], self.running_var[task],
                                    training=self._batch_statistics, momentum=self.momentum, eps=self.eps,
                                    process_group=self.process_group)

    def export(self, task: int, gate: Tensor, keep: Tensor) -> nn.Module:
        raise TypeError(f"model: cannot export {type(self).__name__}: the norm after the gate emits β on units "
                        "the task does not select; export supports masked, per-task and shared BatchNorm and "
                        "LayerNorm, and none")


#: the names of the 1d/2d twin classes, kept: each is the one class of its norm
MaskedBatchNorm1d = MaskedBatchNorm2d = MaskedBatchNorm
TaskBatchNorm1d = TaskBatchNorm2d = TaskBatchNorm
SharedBatchNorm1d = SharedBatchNorm2d = SharedBatchNorm
PostGateBatchNorm1d = PostGateBatchNorm2d = PostGateBatchNorm


def _groups(num_features: int, num_groups: int | None) -> int:
    """``num_groups``, or by default the largest divisor of the channels that is at most 32 (GroupNorm's 32)."""
    if num_groups is None:
        return math.gcd(num_features, 32)
    groups = check_positive_int(num_groups, "num_groups")
    if num_features % groups:
        raise ValueError(f"num_groups must divide num_features {num_features}, got {num_groups}")
    return groups


@final
class MaskedGroupNorm(MaskedNorm):
    """Masked GroupNorm over ``[N, C, *]``: per sample and group, statistics over the group's selected channels.

    Output a ⊙ (γ·x̂ + β) with x̂ from the selected channels of each group of C / G (m = 1[a > 0.5]) over all
    positions (:func:`masked_group_norm`); a group with no selected channel reads all its channels, its
    outputs gated to 0 once binarized. No running statistics (GroupNorm does not
    depend on the batch). γ/β are shared and protected by HAT like a bias. Export keeps every channel
    (the groups are fixed).

    Args:
        num_features: number of channels C.
        num_tasks: number of tasks T.
        num_groups: groups G, dividing C (default: the largest divisor of C that is at most 32).
        eps: added to the variance [1e-5].
        dims: the input layout: 1 (``[N, C]``, ``[N, C, L]``), 2 (``[N, C, H, W]``) or ``None`` (any) [None].
    """

    layout = "channels_first"
    ranks = CHANNELS_FIRST_RANKS
    replaces = (nn.GroupNorm,)
    prunable = False
    isolates_tasks = True

    def __init__(self, num_features: int, *, num_tasks: int, num_groups: int | None = None, eps: float = 1e-5,
                 dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks, dims=dims)
        self.num_groups = _groups(self.num_features, num_groups)
        self.eps = check_positive(eps, "eps")
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    @classmethod
    def options_from(cls, module: nn.Module) -> dict[str, Any]:
        if not isinstance(module, nn.GroupNorm) or not module.affine:
            raise ValueError(f"only GroupNorm with affine=True converts, got {module}")
        # GroupNorm does not say its layout: convolutional maps [N, C, H, W], where torch's models use it
        return {"num_groups": module.num_groups, "eps": module.eps, "dims": 2}

    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        return masked_group_norm(x, gate, self.weight, self.bias, self.num_groups, self.eps)

    def export(self, task: int, gate: Tensor, keep: Tensor) -> nn.Module:
        return ExportedGroupNorm(self.weight.detach()[keep], self.bias.detach()[keep], gate, self.num_groups, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_groups={self.num_groups}"


@final
class MaskedChannelLayerNorm(MaskedNorm):
    """Masked LayerNorm over the channels of ``[N, C, *]`` at every position (ConvNeXt's ``LayerNorm2d``).

    Statistics per sample and position over the selected channels only (m = 1[a > 0.5]); output
    a ⊙ (γ·x̂ + β); no selected channel gives zeros. For channels-last tensors ``[N, H, W, C]`` use
    :class:`MaskedLayerNorm`, which normalises the last dim. γ/β are shared and protected like a bias.

    Args:
        num_features: number of channels C.
        num_tasks: number of tasks T.
        eps: added to the variance [1e-6, ConvNeXt's].
        dims: the input layout: 1 (``[N, C]``, ``[N, C, L]``), 2 (``[N, C, H, W]``) or ``None`` (any) [None].
    """

    layout = "channels_first"
    ranks = CHANNELS_FIRST_RANKS
    isolates_tasks = True

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-6, dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks, dims=dims)
        self.eps = check_positive(eps, "eps")
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        return masked_layer_norm(x.movedim(1, -1), gate, self.weight, self.bias, self.eps).movedim(-1, 1)

    def export(self, task: int, gate: Tensor, keep: Tensor) -> nn.Module:
        selected = gate > 0.5
        if not bool(selected.any()):
            return ExportedGate(torch.zeros_like(gate), self.channel_dim)
        return ExportedLayerNorm(self.weight.detach()[keep] * gate, self.bias.detach()[keep] * gate, self.eps,
                                 None if bool(selected.all()) else selected, channel_dim=1)


class _AllChannelsNormBase(MaskedNorm):
    """The baselines of the masked channel norms: statistics over every channel, the ones other tasks use (and
    may change) included, so an earlier task's outputs can drift; γ/β shared (protected like a bias) or one row
    per task (``per_task_affine``). Output a ⊙ (γ·x̂ + β). Export keeps every channel (the statistics read
    them all)."""

    layout = "channels_first"
    ranks = CHANNELS_FIRST_RANKS
    prunable = False
    #: γ, β one row per task (``[T, C]``), or shared by all tasks (``[C]``)
    per_task_affine: ClassVar[bool] = False

    def __init__(self, num_features: int, *, num_tasks: int, eps: float, dims: int | None) -> None:
        super().__init__(num_features, num_tasks=num_tasks, dims=dims)
        self.eps = check_positive(eps, "eps")
        shape = (num_tasks, num_features) if self.per_task_affine else (num_features,)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))

    def affine(self, task: int) -> tuple[Tensor, Tensor]:
        """Task ``task``'s γ and β ``[C]``."""
        if self.per_task_affine:
            return self.weight[task], self.bias[task]
        return self.weight, self.bias


class _ChannelLayerNormBase(_AllChannelsNormBase):
    """LayerNorm over the channels of ``[N, C, *]`` at every position, statistics over every channel.

    Args:
        num_features: number of channels C.
        num_tasks: number of tasks T.
        eps: added to the variance [1e-6, as :class:`MaskedChannelLayerNorm`].
        dims: the input layout: 1 (``[N, C]``, ``[N, C, L]``), 2 (``[N, C, H, W]``) or ``None`` (any) [None].
    """

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-6, dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks, eps=eps, dims=dims)

    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        weight, bias = self.affine(task)
        return F.layer_norm(x.movedim(1, -1), (self.num_features,), weight * gate, bias * gate,
                            self.eps).movedim(-1, 1)

    def export(self, task: int, gate: Tensor, keep: Tensor) -> nn.Module:
        weight, bias = self.affine(task)
        return ExportedLayerNorm(weight.detach()[keep] * gate, bias.detach()[keep] * gate, self.eps, channel_dim=1)


@final
class SharedChannelLayerNorm(_ChannelLayerNormBase):
    """Shared channel LayerNorm baseline over ``[N, C, *]``: a ⊙ LN(x) over every channel at each position,
    γ/β shared and protected like a bias. Its statistics read channels later tasks may change, so it drifts.

    Args: as :class:`_ChannelLayerNormBase`.
    """


@final
class TaskChannelLayerNorm(_ChannelLayerNormBase):
    """Per-task channel LayerNorm over ``[N, C, *]``: a ⊙ LN_t(x) over every channel, task t's own γ_t, β_t.
    Its statistics read channels later tasks may change, so it drifts too.

    Args: as :class:`_ChannelLayerNormBase`.
    """

    per_task_affine = True


class _GroupNormBase(_AllChannelsNormBase):
    """GroupNorm over ``[N, C, *]``: per sample and group of C / G channels, statistics over every channel of the
    group.

    Args:
        num_features: number of channels C.
        num_tasks: number of tasks T.
        num_groups: groups G, dividing C (default: the largest divisor of C that is at most 32).
        eps: added to the variance [1e-5].
        dims: the input layout: 1 (``[N, C]``, ``[N, C, L]``), 2 (``[N, C, H, W]``) or ``None`` (any) [None].
    """

    def __init__(self, num_features: int, *, num_tasks: int, num_groups: int | None = None, eps: float = 1e-5,
                 dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks, eps=eps, dims=dims)
        self.num_groups = _groups(self.num_features, num_groups)

    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        weight, bias = self.affine(task)
        return F.group_norm(x, self.num_groups, weight * gate, bias * gate, self.eps)

    def export(self, task: int, gate: Tensor, keep: Tensor) -> nn.Module:
        weight, bias = self.affine(task)
        # γ, β folded with the gate, and every channel read (a mask of ones)
        return ExportedGroupNorm(weight.detach()[keep] * gate, bias.detach()[keep] * gate, torch.ones_like(gate),
                                 self.num_groups, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_groups={self.num_groups}"


@final
class SharedGroupNorm(_GroupNormBase):
    """Shared GroupNorm baseline over ``[N, C, *]``: a ⊙ GN(x), statistics over every channel of a group,
    γ/β shared and protected like a bias. Its statistics read channels later tasks may change, so it drifts.

    Args: as :class:`_GroupNormBase`.
    """


@final
class TaskGroupNorm(_GroupNormBase):
    """Per-task GroupNorm over ``[N, C, *]``: a ⊙ GN_t(x) over every channel of a group, task t's own γ_t, β_t.
    Its statistics read channels later tasks may change, so it drifts too.

    Args: as :class:`_GroupNormBase`.
    """

    per_task_affine = True

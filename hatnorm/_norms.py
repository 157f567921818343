"""The MaskedNorm protocol and its task-aware normalization layers.

A task-aware norm receives its layer's gate a^t and returns a ⊙ norm_t(x): norm and gate are one call,
placed as ``weighted op → norm(x, a, t) → activation``. The selection m = 1[a^t > 0.5] decides which
units' statistics are used and moved. Every norm reports the gradient multipliers of its own
parameters, so :class:`hatnorm.HAT` protects norms by the same mechanism as weights.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Literal, final

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

import hatnorm._fused as _fused
from hatnorm._checks import (
    Remembered,
    check_input,
    check_mask,
    check_non_negative,
    check_num_tasks,
    check_positive,
    check_positive_int,
    check_task,
)
from hatnorm._exported import (
    ExportedBatchNorm,
    ExportedGate,
    ExportedGroupNorm,
    ExportedLayerNorm,
    ExportedRMSNorm,
)
from hatnorm._masks import MaskState
from hatnorm._policies import GradientPolicy
from hatnorm._protected import Protected

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

#: which models a norm fits: channels in dim 1 (CNNs), features in the last dim (transformers), or both
Family = Literal["batch", "layer", "any"]


class _AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over the ranks of a process group. Its gradient is the sum of the ranks' gradients,
    so each rank's backward carries every rank's loss through the shared result."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def sync_batch_norm(
    x: Tensor,
    selected: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    *,
    momentum: float,
    eps: float,
    process_group: ProcessGroup,
) -> Tensor:
    """Training-mode batch norm over channel dim 1 with the statistics of every rank's batch together.

    Like :class:`torch.nn.SyncBatchNorm`: each rank's per-channel count, mean and biased variance go
    through one autograd-aware all-reduce over ``process_group`` and are combined exactly, so outputs and
    gradients (after DDP's gradient averaging) are those of the concatenated batch. The running statistics
    take the global mean and unbiased variance on ``selected`` channels only (``None``: every channel);
    the others stay bit-identical. Every rank must call it with the same ``selected``.

    Args:
        x: this rank's batch ``[N, C, *spatial]``.
        selected: bool ``[C]``, the channels whose running statistics move, or ``None`` for all.
        weight: γ ``[C]`` or ``None``.
        bias: β ``[C]`` or ``None``.
        running_mean: ``[C]``, updated in place.
        running_var: ``[C]``, updated in place.
        momentum: running-statistics momentum.
        eps: added to the variance.
        process_group: the ranks whose batches are normalised together.
    """
    # statistics in float32 at least, as F.batch_norm keeps them for half-precision inputs
    xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    var, mean = torch.var_mean(xs, dim=[0, *range(2, x.dim())], correction=0)  # [C] each
    count = torch.full_like(mean, x.numel() // x.shape[1])
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    # rank r fills row r of [world, 3, C]; the sum gathers all rows and sends each row's gradient home
    rows = F.pad(torch.stack([count, mean, var])[None], (0, 0, 0, 0, rank, world - rank - 1))
    counts, means, variances = _AllReduceSum.apply(rows, process_group).unbind(1)  # [world, C] each
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    # Chan et al.'s parallel variance: within-rank plus between-rank sums of squares
    var = (counts * (variances + (means - mean).square())).sum(0) / total
    shape = per_channel(mean, x).shape
    out = (xs - mean.view(shape)) * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    with torch.no_grad():
        new_mean = momentum * mean + (1 - momentum) * running_mean
        new_var = momentum * var * total / (total - 1) + (1 - momentum) * running_var
        if selected is not None:
            new_mean = torch.where(selected, new_mean, running_mean)
            new_var = torch.where(selected, new_var, running_var)
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return out.to(x.dtype)


def selective_batch_norm(
    x: Tensor,
    selected: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    *,
    training: bool,
    momentum: float,
    eps: float,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """``F.batch_norm`` over channel dim 1 whose running statistics move only on ``selected`` channels.

    While training, the batch statistics update a copy of the running statistics and only the selected
    channels take the new values: the others stay bit-identical (``selected=None`` moves every channel).
    Evaluation uses the running statistics. With a ``process_group``, training uses the statistics of
    every rank's batch together (:func:`sync_batch_norm`).
    """
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    if process_group is not None:
        return sync_batch_norm(x, selected, weight, bias, running_mean, running_var, momentum=momentum, eps=eps,
                               process_group=process_group)
    if selected is None:
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    new_mean, new_var = running_mean.clone(), running_var.clone()
    out = F.batch_norm(x, new_mean, new_var, weight, bias, True, momentum, eps)
    with torch.no_grad():
        running_mean.copy_(torch.where(selected, new_mean, running_mean))
        running_var.copy_(torch.where(selected, new_var, running_var))
    return out


def masked_batch_norm(
    x: Tensor,
    mask: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    *,
    training: bool,
    momentum: float,
    eps: float,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """a ⊙ (γ·x̂ + β) over channel dim 1, moving the running statistics of channels with a > 0.5 only.

    The gate folds into the affine (weight γ·a, bias β·a), so the layer is one ``F.batch_norm`` call.
    With a ``process_group``, training uses the statistics of every rank's batch together.
    """
    w = mask if weight is None else weight * mask
    b = None if bias is None else bias * mask
    return selective_batch_norm(x, mask.detach() > 0.5, w, b, running_mean, running_var,
                                training=training, momentum=momentum, eps=eps, process_group=process_group)


def per_channel(mask: Tensor, x: Tensor) -> Tensor:
    """``mask`` ``[C]`` shaped to broadcast over ``x`` ``[N, C, *spatial]``."""
    return mask.view(-1, *([1] * (x.dim() - 2)))


def masked_moments(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance of ``x`` over its last dim, counting only features with mask > 0.5.

    μ = Σ m_i z_i / Σ m_i, σ² = Σ m_i (z_i − μ)² / Σ m_i. With no selected feature both are 0.
    Returns two tensors of shape ``x.shape[:-1] + (1,)``.
    """
    mean, _, var = _centred_moments(x, _selection_weights(mask)[0])
    return mean, var


_selections = Remembered()


def _selection_weights(mask: Tensor) -> tuple[Tensor, Tensor]:
    """m/k with m = 1[a > 0.5] and k = Σ m (``[C]``), and k itself."""
    compiling = torch.compiler.is_compiling()
    if not compiling and (known := _selections.get(mask)) is not None:
        return known
    selected = (mask > 0.5).to(mask.dtype)
    count = selected.sum()
    weights = (selected / count.clamp_min(1), count)
    return weights if compiling else _selections.remember(mask, weights)


def _centred_moments(x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """μ, x − μ and σ² over the last dim, weighted by ``scale`` = m/k: each moment is one matrix-vector
    product with the selection, a single read of its operand."""
    mean = (x @ scale.to(x.dtype))[..., None]
    centred = x - mean
    var = ((centred * centred) @ scale.to(x.dtype))[..., None]
    return mean, centred, var


class _MaskedLayerNorm(torch.autograd.Function):
    """Masked LayerNorm with its backward handed to ATen's fused LayerNorm backward.

    With m = 1[a > 0.5], k = Σ m, x̂ = (x − μ)·r, r = (σ² + eps)^−½ and g = dy ⊙ γ ⊙ a, the gradient is
    ∂L/∂x = r·(g − m/k·(Σ g + x̂·Σ g x̂)), sums over all C features, since μ and σ² read only the selected
    ones. ``native_layer_norm_backward`` of x̂ itself, with mean 0 and rstd 1, computes
    g − 1/C·(Σ g + x̂·Σ g x̂) in one pass, and with it Σ dy x̂ and Σ dy over the batch. So with c = C·m/k:
    ∂L/∂x = r·(c·that + (1 − c)·g), formed in place. Handing it x̂ rather than x, μ and r keeps its sums
    centred: from x it would subtract Σ g x and μ·Σ g, which cancel where the selected features vary
    little (one selected feature: σ² = 0, r = eps^−½) and lose the gradient's leading digits.

    On the CPU, where :func:`hatnorm._fused.applies`, the same forward and gradient are one fused kernel
    pass each (the ATen passes above are the layer's cost there).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, mask: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        ctx.input_dtype = x.dtype
        ctx.fused = _fused.applies(x, mask, weight, bias)
        if ctx.fused:  # one pass per row on the CPU; x itself is saved, x̂ recomputed from μ and r
            scale, _ = _selection_weights(mask)
            out, mean, rstd = _fused.layer_norm_forward(x.contiguous(), scale, weight, bias, mask, eps)
            if any(ctx.needs_input_grad):
                ctx.save_for_backward(x, mean, rstd, scale, mask, weight, bias)
            return out
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in float32, as F.layer_norm
        scale, count = _selection_weights(mask.to(x.dtype))
        any_selected = count.clamp_max(1)  # no selected feature: zeros
        gate = mask * any_selected
        w, b = weight * gate, bias * gate
        # no tensor of x's size is freed at the end of the call (one that is lets the allocator return its
        # pages and the next call fault them in again: about 10x the forward's time at [8, 197, 768]):
        # for training x̂ is saved; without gradients the output holds (x − μ)², then x − μ, then the result
        mean = (x @ scale).unsqueeze_(-1)
        x_hat = x - mean
        if not any(ctx.needs_input_grad):
            rstd = (x_hat.square_() @ scale).unsqueeze_(-1).add_(eps).rsqrt_()
            return torch.addcmul(b, torch.sub(x, mean, out=x_hat).mul_(rstd), w, out=x_hat)
        out = x_hat * x_hat
        rstd = (out @ scale).unsqueeze_(-1).add_(eps).rsqrt_()
        torch.addcmul(b, x_hat.mul_(rstd), w, out=out)
        ctx.save_for_backward(x_hat, rstd, scale, gate, any_selected, weight, bias, w)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.fused:
            x, mean, rstd, scale, mask, weight, bias = ctx.saved_tensors
            return (*_fused.layer_norm_backward(dy, x.contiguous(), mean, rstd, scale, weight, bias, mask), None)
        x_hat, rstd, scale, gate, any_selected, weight, bias, w = ctx.saved_tensors
        wanted = ctx.needs_input_grad
        affine = any(wanted[1:4])
        dx, dy_x_hat, dy_sum = _aten_backward(dy, x_hat, rstd, scale, w, [wanted[0], affine, affine])
        dx = None if dx is None else dx.to(ctx.input_dtype)
        if not affine:
            return dx, None, None, None, None
        d_mask = torch.addcmul(dy_x_hat * weight, dy_sum, bias).mul_(any_selected)
        return dx, d_mask, dy_x_hat * gate, dy_sum * gate, None


def _aten_backward(dy: Tensor, x_hat: Tensor, rstd: Tensor, scale: Tensor, w: Tensor,
                   wanted: list[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The masked LayerNorm's ∂L/∂x, Σ dy·x̂ and Σ dy from ATen's LayerNorm backward (see _MaskedLayerNorm)."""
    centre, unit = torch.zeros_like(rstd), torch.ones_like(rstd)  # x̂'s own mean and rstd
    dx, dy_x_hat, dy_sum = torch.ops.aten.native_layer_norm_backward(
        dy, x_hat, [x_hat.shape[-1]], centre, unit, w, w, wanted)
    if dx is not None:
        spread = scale * x_hat.shape[-1]  # c = C·m/k
        unspread = torch.addcmul(w, w, spread, value=-1)  # (1 − c)·γ·a
        dx = dx.mul_(spread).addcmul_(dy, unspread).mul_(rstd)
    return dx, dy_x_hat, dy_sum


def masked_layer_norm(x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """a ⊙ (γ·x̂ + β) over the last dim, with x̂ normalised by the statistics of the selected features.

    Features outside the selection do not change the selected outputs. No selected feature gives zeros.
    """
    weight = torch.ones_like(mask) if weight is None else weight
    bias = torch.zeros_like(mask) if bias is None else bias
    return _MaskedLayerNorm.apply(x, mask, weight, bias, eps)


def masked_group_norm(x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int,
                      eps: float) -> Tensor:
    """a ⊙ (γ·x̂ + β) over ``x`` ``[N, C, *]``, x̂ normalised per sample and group of C / G channels by the
    statistics of the group's selected channels (m = 1[a > 0.5]) over every position.

    Channels outside the selection do not change the selected outputs, but are normalised with the same
    statistics, so their gates get a gradient (HAT can recruit them). A group with no selected channel
    reads all its channels: its outputs are gated by a (0 once binarized). With every channel selected
    it is ``F.group_norm``.
    """
    n, c = x.shape[:2]
    selected = (mask.detach() > 0.5).to(x.dtype).view(num_groups, c // num_groups)
    read = torch.where(selected.sum(1, keepdim=True) > 0, selected, torch.ones_like(selected))
    grouped = x.reshape(n, num_groups, c // num_groups, -1)  # [N, G, C/G, positions]
    weights = read[None, :, :, None] / (read.sum(1) * grouped.shape[-1])[None, :, None, None]
    mean = (grouped * weights).sum((2, 3), keepdim=True)
    centred = grouped - mean
    var = (centred.square() * weights).sum((2, 3), keepdim=True)
    x_hat = (centred * torch.rsqrt(var + eps)).reshape(x.shape)
    w = mask if weight is None else weight * mask
    b = torch.zeros_like(mask) if bias is None else bias * mask
    return torch.addcmul(per_channel(b, x), x_hat, per_channel(w, x))


def masked_rms_norm(x: Tensor, mask: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """a ⊙ γ ⊙ x / rms(x) over the last dim, rms² = Σ m_i x_i² / Σ m_i + eps over the selected features.

    Features outside the selection do not change the selected outputs; no selected feature gives zeros.
    With every feature selected it is ``F.rms_norm``.
    """
    scale, count = _selection_weights(mask)
    mean_square = (x.square() @ scale.to(x.dtype))[..., None]
    w = (mask if weight is None else weight * mask) * (count > 0).to(x.dtype)
    return x * torch.rsqrt(mean_square + eps) * w


class MaskedNorm(nn.Module, Protected):
    """The protocol of every task-aware norm: everything training, export, statistics re-estimation,
    multi-process training and conversion need from a norm is declared here, so a norm registered by
    another package (:func:`hatnorm.register_norm`, entry point ``hatnorm.norms``) works everywhere.

    A subclass implements :meth:`forward` (starting with :meth:`validate`) and ``gradient_multipliers``
    (see :class:`hatnorm.Protected`), sets :attr:`dims` and :attr:`channel_dim`, and overrides the hooks
    that concern it: :meth:`export`; for running statistics
    :meth:`running_statistics`, :meth:`statistics_slot` and a ``momentum`` attribute; :meth:`sync` for
    batch statistics over several processes; :attr:`replaces` and :meth:`options_from` for
    :func:`hatnorm.convert`.

    Args:
        num_features: number of units C (channels for batch norms, last-dim features for layer norms).
        num_tasks: number of tasks T.
    """

    #: which models the norm fits (the registry's default family for the class)
    family: ClassVar[Family] = "any"
    #: the tensor ranks the norm accepts, for checks and messages (an instance may narrow them)
    dims: tuple[int, ...]
    #: the dim holding the ``num_features`` units
    channel_dim: int
    #: whether training normalises with batch statistics, which need more than 1 value per channel
    batch_statistics: ClassVar[bool] = False
    #: the torch modules :func:`hatnorm.convert` may replace with this norm
    replaces: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: whether :func:`hatnorm.export` may remove the units a task does not use (not when the statistics
    #: read every unit, the removed ones too)
    prunable: ClassVar[bool] = True
    #: whether, under HAT's hard protection, training a task leaves every earlier task's outputs
    #: bit-identical (the invariant the property tests check for every norm that declares it); False for
    #: the baselines, whose shared statistics or affine follow the newest task
    isolates_tasks: ClassVar[bool] = False

    def __init__(self, num_features: int, *, num_tasks: int) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features")
        self.num_tasks = check_num_tasks(num_tasks)

    @abstractmethod
    def forward(self, x: Tensor, mask: Tensor, task: int) -> Tensor:
        """Normalise ``x`` for task ``task`` and apply ``mask``, the layer's gate ``[num_features]``:
        returns mask ⊙ norm_task(x)."""

    def end_task(self, task: int) -> None:
        """Consolidate after ``task`` ends. Norms whose state is complete at the end of training do nothing."""

    @classmethod
    def options_from(cls, module: nn.Module) -> dict[str, Any]:
        """The constructor options that make this norm stand for ``module`` (one of :attr:`replaces`),
        ``dims`` included; ``module``'s state is then loaded into every task slot.

        Raises:
            ValueError: ``module`` has a configuration this norm cannot reproduce.
        """
        raise ValueError(f"{cls.__name__} replaces no torch module")

    def export(self, task: int, mask: Tensor, keep: Tensor) -> nn.Module:
        """The plain inference module for ``task`` over the units ``keep`` (indices), with the gate values
        ``mask`` over those units folded in: it must equal this norm's evaluation output there
        (see :mod:`hatnorm._exported`).

        Raises:
            TypeError: this norm cannot be exported.
        """
        raise TypeError(f"model: cannot export a {type(self).__name__}; it declares no export")

    def running_statistics(self) -> list[Tensor]:
        """The buffers :func:`hatnorm.recalibrate_norms` re-estimates (and precise validation restores):
        statistics a training forward moves by ``momentum``. Norms without running statistics: none."""
        return []

    def statistics_slot(self, task: int) -> int | None:
        """Which slot of the running statistics a training forward for ``task`` moves: the task for
        per-task statistics, ``None`` for statistics shared by every task."""
        return None

    def sync(self, process_group: ProcessGroup | None) -> None:
        """Compute training statistics over the batches of every rank of ``process_group`` (``None``:
        each process alone); called by :func:`hatnorm.convert_sync`. Norms without batch statistics
        need no communication."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Accept a plain nn.BatchNorm/nn.LayerNorm state (pretrained weights): a per-unit tensor [C]
        # goes into every task slot of a per-task tensor [T, C]; BatchNorm's step counter has no use here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        own = dict(self.named_parameters(recurse=False)) | dict(self.named_buffers(recurse=False))
        for name, tensor in own.items():
            incoming = state_dict.get(prefix + name)
            if incoming is not None and tensor.dim() == 2 and incoming.shape == tensor.shape[1:]:
                state_dict[prefix + name] = incoming.expand_as(tensor).clone()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def validate(self, x: Tensor, mask: Tensor, task: int) -> int:
        """Check a call's input (rank :attr:`dims`, ``num_features`` units in :attr:`channel_dim`, dtype and
        device of the norm's parameters), its gate and its task; returns the task as an int. Every
        :meth:`forward` starts with it, so bad calls fail with the same messages in every norm."""
        # any own parameter fixes the dtype and device x must meet; read from the dict, since a
        # parameters() generator would cost more than all the checks together
        like = next(iter(self._parameters.values()), None)
        check_input(x, self.num_features, dims=self.dims, channel_dim=self.channel_dim, like=like)
        check_mask(mask, self.num_features, like=like, device=x.device)
        return check_task(task, self.num_tasks)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_tasks={self.num_tasks}"


def _slot(t: Tensor, task: int, keep: Tensor) -> Tensor:
    """``t``'s values for ``task`` (its row, for per-task tensors ``[T, C]``) over the units ``keep``."""
    return (t[task] if t.dim() == 2 else t).detach()[keep]


#: the tensor ranks a batch norm accepts per layout (``dims``)
_BATCH_LAYOUTS = {1: (2, 3), 2: (4,), None: (2, 3, 4, 5)}


def _batch_layout(dims: object) -> tuple[int, ...]:
    if dims not in _BATCH_LAYOUTS or isinstance(dims, bool):
        raise ValueError(f"dims must be 1 ([N, C] or [N, C, L]), 2 ([N, C, H, W]) or None (any [N, C, *]), "
                         f"got {dims!r}")
    return _BATCH_LAYOUTS[dims]  # type: ignore[index]


class _BatchNormBase(MaskedNorm):
    """Validation, options and the protocol hooks shared by the batch-statistics norms.

    ``process_group``: when set (by :func:`hatnorm.convert_sync`), training statistics are computed over
    the batches of every rank of the group; ``None`` normalises each process's batch alone. ``frozen``
    (set by :meth:`freeze`): the norm normalises with its running statistics in training too. ``dims``
    narrows the input layout: 1 (``[N, C]`` or ``[N, C, L]``), 2 (``[N, C, H, W]``), ``None`` (any
    ``[N, C, *]``).
    """

    family = "batch"
    channel_dim = 1
    batch_statistics = True
    replaces = (nn.BatchNorm1d, nn.BatchNorm2d)
    #: γ, β one row per task (``[T, C]``), or shared by all tasks (``[C]``)
    per_task_affine: ClassVar[bool] = False
    #: running statistics one row per task (``[T, C]``), or shared by all tasks (``[C]``)
    per_task_statistics: ClassVar[bool] = True

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-5, momentum: float = 0.1,
                 dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks)
        self.eps = check_positive(eps, "eps")
        self.momentum = check_non_negative(momentum, "momentum")
        if self.momentum > 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        self.dims = _batch_layout(dims)
        self.process_group: ProcessGroup | None = None
        self.frozen = False
        affine = (num_tasks, num_features) if self.per_task_affine else (num_features,)
        statistics = (num_tasks, num_features) if self.per_task_statistics else (num_features,)
        self.weight = nn.Parameter(torch.ones(affine))
        self.bias = nn.Parameter(torch.zeros(affine))
        self.register_buffer("running_mean", torch.zeros(statistics))
        self.register_buffer("running_var", torch.ones(statistics))

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        if self.per_task_affine:  # task t trains its own row only
            own = torch.zeros_like(self.weight)
            own[task] = 1
            return {"weight": own, "bias": own}
        rate = policy.unit_rate(previous)  # shared γ/β, protected like a bias
        return {"weight": rate, "bias": rate}

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

    def export(self, task: int, mask: Tensor, keep: Tensor) -> nn.Module:
        return ExportedBatchNorm(_slot(self.weight, task, keep) * mask, _slot(self.bias, task, keep) * mask,
                                 _slot(self.running_mean, task, keep).clone(),
                                 _slot(self.running_var, task, keep).clone(), self.eps)

    def running_statistics(self) -> list[Tensor]:
        return [self.running_mean, self.running_var]

    def statistics_slot(self, task: int) -> int | None:
        return task if self.running_mean.dim() == 2 else None

    def sync(self, process_group: ProcessGroup | None) -> None:
        self.process_group = process_group

    def validate(self, x: Tensor, mask: Tensor, task: int) -> int:
        task = super().validate(x, mask, task)
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

    def forward(self, x: Tensor, mask: Tensor, task: int) -> Tensor:
        task = self.validate(x, mask, task)
        return masked_batch_norm(x, mask, self.weight, self.bias, self.running_mean[task], self.running_var[task],
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

    def forward(self, x: Tensor, mask: Tensor, task: int) -> Tensor:
        task = self.validate(x, mask, task)
        return selective_batch_norm(x, None, self.weight[task] * mask, self.bias[task] * mask, self.running_mean[task],
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

    def forward(self, x: Tensor, mask: Tensor, task: int) -> Tensor:
        self.validate(x, mask, task)
        return selective_batch_norm(x, None, self.weight * mask, self.bias * mask, self.running_mean,
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

    def forward(self, x: Tensor, mask: Tensor, task: int) -> Tensor:
        task = self.validate(x, mask, task)
        return selective_batch_norm(x * per_channel(mask, x), mask.detach() > 0.5, self.weight, self.bias,
                                    self.running_mean[task], self.running_var[task],
                                    training=self._batch_statistics, momentum=self.momentum, eps=self.eps,
                                    process_group=self.process_group)

    def export(self, task: int, mask: Tensor, keep: Tensor) -> nn.Module:
        raise TypeError(f"model: cannot export {type(self).__name__}: the norm after the gate emits β on units "
                        "the task does not select; export supports masked, per-task and shared BatchNorm and "
                        "LayerNorm, and none")


#: the names of the 1d/2d twin classes, kept: each is the one class of its norm
MaskedBatchNorm1d = MaskedBatchNorm2d = MaskedBatchNorm
TaskBatchNorm1d = TaskBatchNorm2d = TaskBatchNorm
SharedBatchNorm1d = SharedBatchNorm2d = SharedBatchNorm
PostGateBatchNorm1d = PostGateBatchNorm2d = PostGateBatchNorm


@final
class NoNorm(MaskedNorm):
    """No normalization, the pure gate: a ⊙ x.

    Args:
        num_features: number of gated units.
        num_tasks: number of tasks.
        channel_dim: where the units are: 1 (``[N, C, *spatial]``, CNNs) or -1 (the last dim, transformers).
    """

    dims = (2, 3, 4, 5)
    channel_dim = 1
    replaces = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
    isolates_tasks = True

    def __init__(self, num_features: int, *, num_tasks: int, channel_dim: int = 1) -> None:
        super().__init__(num_features, num_tasks=num_tasks)
        if channel_dim not in (1, -1):
            raise ValueError(f"channel_dim must be 1 (channels first) or -1 (features last), got {channel_dim!r}")
        self.channel_dim = channel_dim

    @classmethod
    def options_from(cls, module: nn.Module) -> dict[str, Any]:
        if not isinstance(module, cls.replaces):
            raise ValueError(f"no norm replaces BatchNorm1d/2d and LayerNorm, got {module}")
        return {"dims": None if isinstance(module, nn.LayerNorm) else 1 if isinstance(module, nn.BatchNorm1d) else 2}

    def forward(self, x: Tensor, mask: Tensor, task: int) -> Tensor:
        self.validate(x, mask, task)
        return x * (per_channel(mask, x) if self.channel_dim == 1 else mask)

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        return {}

    def export(self, task: int, mask: Tensor, keep: Tensor) -> nn.Module:
        return ExportedGate(None if bool((mask == 1).all()) else mask, self.channel_dim)


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

    family = "batch"
    channel_dim = 1
    replaces = (nn.GroupNorm,)
    prunable = False
    isolates_tasks = True

    def __init__(self, num_features: int, *, num_tasks: int, num_groups: int | None = None, eps: float = 1e-5,
                 dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks)
        self.num_groups = _groups(self.num_features, num_groups)
        self.eps = check_positive(eps, "eps")
        self.dims = _batch_layout(dims)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    @classmethod
    def options_from(cls, module: nn.Module) -> dict[str, Any]:
        if not isinstance(module, nn.GroupNorm) or not module.affine:
            raise ValueError(f"only GroupNorm with affine=True converts, got {module}")
        # GroupNorm does not say its layout: convolutional maps [N, C, H, W], where torch's models use it
        return {"num_groups": module.num_groups, "eps": module.eps, "dims": 2}

    def forward(self, x: Tensor, mask: Tensor, task: int) -> Tensor:
        self.validate(x, mask, task)
        return masked_group_norm(x, mask, self.weight, self.bias, self.num_groups, self.eps)

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        rate = policy.unit_rate(previous)
        return {"weight": rate, "bias": rate}

    def export(self, task: int, mask: Tensor, keep: Tensor) -> nn.Module:
        return ExportedGroupNorm(self.weight.detach()[keep], self.bias.detach()[keep], mask, self.num_groups, self.eps)

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

    family = "batch"
    channel_dim = 1
    isolates_tasks = True

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-6, dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks)
        self.eps = check_positive(eps, "eps")
        self.dims = _batch_layout(dims)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor, mask: Tensor, task: int) -> Tensor:
        self.validate(x, mask, task)
        return masked_layer_norm(x.movedim(1, -1), mask, self.weight, self.bias, self.eps).movedim(-1, 1)

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        rate = policy.unit_rate(previous)
        return {"weight": rate, "bias": rate}

    def export(self, task: int, mask: Tensor, keep: Tensor) -> nn.Module:
        selected = mask > 0.5
        if not bool(selected.any()):
            return ExportedGate(torch.zeros_like(mask), self.channel_dim)
        return ExportedLayerNorm(self.weight.detach()[keep] * mask, self.bias.detach()[keep] * mask, self.eps,
                                 None if bool(selected.all()) else selected, channel_dim=1)


class _LayerNormBase(MaskedNorm):
    """Validation, options and the protocol hooks shared by the layer norms over the last dim."""

    family = "layer"
    dims = (2, 3, 4)
    channel_dim = -1
    replaces = (nn.LayerNorm,)

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, num_tasks=num_tasks)
        self.eps = check_positive(eps, "eps")

    @classmethod
    def options_from(cls, module: nn.Module) -> dict[str, Any]:
        if (not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1
                or not module.elementwise_affine or module.bias is None):
            raise ValueError(f"only LayerNorm over the last dim with γ and β converts, got {module}")
        return {"eps": module.eps, "dims": None}

    def export(self, task: int, mask: Tensor, keep: Tensor) -> nn.Module:
        # statistics over every feature: export keeps every unit of these norms (prunable is False)
        return ExportedLayerNorm(_slot(self.weight, task, keep) * mask, _slot(self.bias, task, keep) * mask, self.eps)


@final
class MaskedLayerNorm(_LayerNormBase):
    """Masked LayerNorm over the last dim: statistics over the selected features only.

    μ = Σ m_i z_i / Σ m_i, σ² = Σ m_i (z_i − μ)² / Σ m_i with m = 1[a > 0.5]; output a ⊙ (γ·x̂ + β);
    no selected feature gives zeros. γ/β are shared and protected by HAT like a bias.

    Args:
        num_features: number of features C (the last dim).
        num_tasks: number of tasks T.
        eps: added to the variance [1e-5].
    """

    isolates_tasks = True

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, num_tasks=num_tasks, eps=eps)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor, mask: Tensor, task: int) -> Tensor:
        self.validate(x, mask, task)
        return masked_layer_norm(x, mask, self.weight, self.bias, self.eps)

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        rate = policy.unit_rate(previous)
        return {"weight": rate, "bias": rate}

    def export(self, task: int, mask: Tensor, keep: Tensor) -> nn.Module:
        selected = mask > 0.5
        if not bool(selected.any()):  # no feature selected: the norm gives zeros
            return ExportedGate(torch.zeros_like(mask), self.channel_dim)
        return ExportedLayerNorm(_slot(self.weight, task, keep) * mask, _slot(self.bias, task, keep) * mask,
                                 self.eps, None if bool(selected.all()) else selected)


@final
class SharedLayerNorm(_LayerNormBase):
    """Shared LayerNorm baseline: a ⊙ LN(x) over all features, γ/β protected like a bias."""

    prunable = False

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, num_tasks=num_tasks, eps=eps)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor, mask: Tensor, task: int) -> Tensor:
        self.validate(x, mask, task)
        return F.layer_norm(x, (self.num_features,), self.weight * mask, self.bias * mask, self.eps)

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        rate = policy.unit_rate(previous)
        return {"weight": rate, "bias": rate}


@final
class TaskLayerNorm(_LayerNormBase):
    """Per-task LayerNorm: a ⊙ LN_t(x) over all features with task t's own γ_t, β_t."""

    prunable = False

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, num_tasks=num_tasks, eps=eps)
        self.weight = nn.Parameter(torch.ones(num_tasks, num_features))
        self.bias = nn.Parameter(torch.zeros(num_tasks, num_features))

    def forward(self, x: Tensor, mask: Tensor, task: int) -> Tensor:
        task = self.validate(x, mask, task)
        return F.layer_norm(x, (self.num_features,), self.weight[task] * mask, self.bias[task] * mask, self.eps)

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        own = torch.zeros_like(self.weight)
        own[task] = 1
        return {"weight": own, "bias": own}


@final
class MaskedRMSNorm(_LayerNormBase):
    """Masked RMSNorm over the last dim (modern transformers): rms over the selected features only.

    rms² = Σ m_i z_i² / Σ m_i + eps with m = 1[a > 0.5]; output a ⊙ γ ⊙ z / rms; no selected feature gives
    zeros. One γ, shared and protected by HAT like a bias (RMSNorm has no β).

    Args:
        num_features: number of features C (the last dim).
        num_tasks: number of tasks T.
        eps: added to the mean square [1e-6].
    """

    replaces = (nn.RMSNorm,)
    isolates_tasks = True

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-6) -> None:
        super().__init__(num_features, num_tasks=num_tasks, eps=eps)
        self.weight = nn.Parameter(torch.ones(num_features))

    @classmethod
    def options_from(cls, module: nn.Module) -> dict[str, Any]:
        if not isinstance(module, nn.RMSNorm) or len(module.normalized_shape) != 1 or not module.elementwise_affine:
            raise ValueError(f"only RMSNorm over the last dim with γ converts, got {module}")
        # torch's eps=None is the dtype's machine epsilon
        eps = module.eps if module.eps is not None else torch.finfo(module.weight.dtype).eps
        return {"eps": eps, "dims": None}

    def forward(self, x: Tensor, mask: Tensor, task: int) -> Tensor:
        self.validate(x, mask, task)
        return masked_rms_norm(x, mask, self.weight, self.eps)

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        return {"weight": policy.unit_rate(previous)}

    def export(self, task: int, mask: Tensor, keep: Tensor) -> nn.Module:
        selected = mask > 0.5
        return ExportedRMSNorm(self.weight.detach()[keep] * mask * bool(selected.any()), self.eps,
                               None if bool(selected.all()) else selected)

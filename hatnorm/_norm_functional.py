"""The task-aware norms as functions: batch norm with selective (and multi-process) statistics, and the
masked layer, group and RMS norms whose statistics read the selected units only (m = 1[a > 0.5]).

Every function takes the layer's gate a and returns a ⊙ norm(x); the norm classes
(:mod:`hatnorm._norm_batch`, :mod:`hatnorm._norm_layer`) hold their parameters and call these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

import hatnorm._fused as _fused
from hatnorm._checks import Remembered

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


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
    gate: Tensor,
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
    w = gate if weight is None else weight * gate
    b = None if bias is None else bias * gate
    return selective_batch_norm(x, gate.detach() > 0.5, w, b, running_mean, running_var,
                                training=training, momentum=momentum, eps=eps, process_group=process_group)


def per_channel(gate: Tensor, x: Tensor) -> Tensor:
    """``gate`` ``[C]`` shaped to broadcast over ``x`` ``[N, C, *spatial]``."""
    return gate.view(-1, *([1] * (x.dim() - 2)))


def masked_moments(x: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance of ``x`` over its last dim, counting only features with gate > 0.5.

    μ = Σ m_i z_i / Σ m_i, σ² = Σ m_i (z_i − μ)² / Σ m_i. With no selected feature both are 0.
    Returns two tensors of shape ``x.shape[:-1] + (1,)``.
    """
    mean, _, var = _centred_moments(x, _selection_weights(gate)[0])
    return mean, var


_selections = Remembered()


def _selection_weights(gate: Tensor) -> tuple[Tensor, Tensor]:
    """m/k with m = 1[a > 0.5] and k = Σ m (``[C]``), and k itself."""
    compiling = torch.compiler.is_compiling()
    if not compiling and (known := _selections.get(gate)) is not None:
        return known
    selected = (gate > 0.5).to(gate.dtype)
    count = selected.sum()
    weights = (selected / count.clamp_min(1), count)
    return weights if compiling else _selections.remember(gate, weights)


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
    def forward(ctx: Any, x: Tensor, gate: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        ctx.input_dtype = x.dtype
        ctx.fused = _fused.applies(x, gate, weight, bias)
        if ctx.fused:  # one pass per row on the CPU; x itself is saved, x̂ recomputed from μ and r
            scale, _ = _selection_weights(gate)
            out, mean, rstd = _fused.layer_norm_forward(x.contiguous(), scale, weight, bias, gate, eps)
            if any(ctx.needs_input_grad):
                ctx.save_for_backward(x, mean, rstd, scale, gate, weight, bias)
            return out
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in float32, as F.layer_norm
        scale, count = _selection_weights(gate.to(x.dtype))
        any_selected = count.clamp_max(1)  # no selected feature: zeros
        live = gate * any_selected
        w, b = weight * live, bias * live
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
        ctx.save_for_backward(x_hat, rstd, scale, live, any_selected, weight, bias, w)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.fused:
            x, mean, rstd, scale, gate, weight, bias = ctx.saved_tensors
            return (*_fused.layer_norm_backward(dy, x.contiguous(), mean, rstd, scale, weight, bias, gate), None)
        x_hat, rstd, scale, live, any_selected, weight, bias, w = ctx.saved_tensors
        wanted = ctx.needs_input_grad
        affine = any(wanted[1:4])
        dx, dy_x_hat, dy_sum = _aten_backward(dy, x_hat, rstd, scale, w, [wanted[0], affine, affine])
        dx = None if dx is None else dx.to(ctx.input_dtype)
        if not affine:
            return dx, None, None, None, None
        d_gate = torch.addcmul(dy_x_hat * weight, dy_sum, bias).mul_(any_selected)
        return dx, d_gate, dy_x_hat * live, dy_sum * live, None


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


def masked_layer_norm(x: Tensor, gate: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """a ⊙ (γ·x̂ + β) over the last dim, with x̂ normalised by the statistics of the selected features.

    Features outside the selection do not change the selected outputs. No selected feature gives zeros.
    """
    weight = torch.ones_like(gate) if weight is None else weight
    bias = torch.zeros_like(gate) if bias is None else bias
    return _MaskedLayerNorm.apply(x, gate, weight, bias, eps)


def masked_group_norm(x: Tensor, gate: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int,
                      eps: float) -> Tensor:
    """a ⊙ (γ·x̂ + β) over ``x`` ``[N, C, *]``, x̂ normalised per sample and group of C / G channels by the
    statistics of the group's selected channels (m = 1[a > 0.5]) over every position.

    Channels outside the selection do not change the selected outputs, but are normalised with the same
    statistics, so their gates get a gradient (HAT can recruit them). A group with no selected channel
    reads all its channels: its outputs are gated by a (0 once binarized). With every channel selected
    it is ``F.group_norm``.
    """
    n, c = x.shape[:2]
    selected = (gate.detach() > 0.5).to(x.dtype).view(num_groups, c // num_groups)
    read = torch.where(selected.sum(1, keepdim=True) > 0, selected, torch.ones_like(selected))
    grouped = x.reshape(n, num_groups, c // num_groups, -1)  # [N, G, C/G, positions]
    weights = read[None, :, :, None] / (read.sum(1) * grouped.shape[-1])[None, :, None, None]
    mean = (grouped * weights).sum((2, 3), keepdim=True)
    centred = grouped - mean
    var = (centred.square() * weights).sum((2, 3), keepdim=True)
    x_hat = (centred * torch.rsqrt(var + eps)).reshape(x.shape)
    w = gate if weight is None else weight * gate
    b = torch.zeros_like(gate) if bias is None else bias * gate
    return torch.addcmul(per_channel(b, x), x_hat, per_channel(w, x))


def masked_rms_norm(x: Tensor, gate: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """a ⊙ γ ⊙ x / rms(x) over the last dim, rms² = Σ m_i x_i² / Σ m_i + eps over the selected features.

    Features outside the selection do not change the selected outputs; no selected feature gives zeros.
    With every feature selected it is ``F.rms_norm``.
    """
    scale, count = _selection_weights(gate)
    mean_square = (x.square() @ scale.to(x.dtype))[..., None]
    w = (gate if weight is None else weight * gate) * (count > 0).to(x.dtype)
    return x * torch.rsqrt(mean_square + eps) * w

"""Plain inference modules for one task: what a task-aware norm becomes in :func:`hatnorm.export`.

A norm's :meth:`~hatnorm.MaskedNorm.export` returns one of these (or a module of its own): the norm's
evaluation formula for the task with the gate folded into its affine, over the units export keeps.
Each is called as the norm was, ``module(x, gate, task)`` (``trusted=True`` added by a model that checked its
input); the extra arguments are ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ExportedBatchNorm(nn.Module):
    """A batch norm in evaluation form for one task, the gate folded into γ and β: ``F.batch_norm(x, μ_t, σ²_t,
    γ·a, β·a)``; extra arguments (the gate and task the model passes) are ignored."""

    def __init__(self, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.register_buffer("running_mean", running_mean)
        self.register_buffer("running_var", running_var)
        self.eps = eps

    def forward(self, x: Tensor, *unused: object, **unused_options: object) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ExportedLayerNorm(nn.Module):
    """A layer norm over the kept features for one task, the gate folded into γ and β.

    The statistics are those of the original norm: over the task's selected features (masked LN, where a
    residual stream keeps units other tasks selected) or over every kept feature (``F.layer_norm``).

    Args:
        weight: γ·a over the kept features.
        bias: β·a over the kept features.
        eps: added to the variance.
        selected: which kept features the statistics read (``None``: all of them).
    """

    def __init__(self, weight: Tensor, bias: Tensor, eps: float, selected: Tensor | None = None, *,
                 channel_dim: int = -1) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.eps = eps
        self.channel_dim = channel_dim  # -1: features last; 1: the channels of [N, C, *]
        self.register_buffer("selected", selected)

    def forward(self, x: Tensor, *unused: object, **unused_options: object) -> Tensor:
        z = x.movedim(1, -1) if self.channel_dim == 1 else x
        if self.selected is None:
            out = F.layer_norm(z, (z.shape[-1],), self.weight, self.bias, self.eps)
        else:
            read = z[..., self.selected]
            mean = read.mean(-1, keepdim=True)
            var = (read - mean).square().mean(-1, keepdim=True)
            out = torch.addcmul(self.bias, (z - mean) * torch.rsqrt(var + self.eps), self.weight)
        return out.movedim(-1, 1) if self.channel_dim == 1 else out


class ExportedRMSNorm(nn.Module):
    """An RMS norm over the kept features for one task, the gate folded into γ; the mean square reads the
    task's selected features (``selected``; ``None``: all of them)."""

    def __init__(self, weight: Tensor, eps: float, selected: Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.eps = eps
        self.register_buffer("selected", selected)

    def forward(self, x: Tensor, *unused: object, **unused_options: object) -> Tensor:
        read = x if self.selected is None else x[..., self.selected]
        return x * torch.rsqrt(read.square().mean(-1, keepdim=True) + self.eps) * self.weight


class ExportedGroupNorm(nn.Module):
    """A group norm for one task over every channel, γ and β folded with the gate; each group's statistics
    read its selected channels (all of them in a group with none selected, whose outputs the gate zeroes)."""

    def __init__(self, weight: Tensor, bias: Tensor, mask: Tensor, num_groups: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight * mask)
        self.bias = nn.Parameter(bias * mask)
        selected = (mask > 0.5).to(weight.dtype).view(num_groups, -1)
        read = torch.where(selected.sum(1, keepdim=True) > 0, selected, torch.ones_like(selected))
        self.register_buffer("read", read / read.sum(1, keepdim=True))
        self.num_groups, self.eps = num_groups, eps

    def forward(self, x: Tensor, *unused: object, **unused_options: object) -> Tensor:
        grouped = x.reshape(x.shape[0], self.num_groups, x.shape[1] // self.num_groups, -1)
        weights = self.read[None, :, :, None] / grouped.shape[-1]
        mean = (grouped * weights).sum((2, 3), keepdim=True)
        centred = grouped - mean
        var = (centred.square() * weights).sum((2, 3), keepdim=True)
        x_hat = (centred * torch.rsqrt(var + self.eps)).reshape(x.shape)
        shape = (-1, *([1] * (x.dim() - 2)))
        return torch.addcmul(self.bias.view(shape), x_hat, self.weight.view(shape))


class ExportedGate(nn.Module):
    """The pure gate (no norm) folded for one task: identity when every kept unit is selected, else ``x·a``."""

    def __init__(self, mask: Tensor | None, channel_dim: int) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.channel_dim = channel_dim

    def forward(self, x: Tensor, *unused: object, **unused_options: object) -> Tensor:
        if self.mask is None:
            return x
        return x * (self.mask.view(-1, *([1] * (x.dim() - 2))) if self.channel_dim == 1 else self.mask)

"""The channels-last norms over the features in the last dim (transformers): masked, shared and per-task
LayerNorm and masked RMSNorm."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hatnorm._checks import check_positive
from hatnorm._exported import ExportedGate, ExportedLayerNorm, ExportedRMSNorm
from hatnorm._norm_functional import masked_layer_norm, masked_rms_norm
from hatnorm._norm_protocol import MaskedNorm, unit_values


class _LayerNormBase(MaskedNorm):
    """Validation, options and the protocol hooks shared by the layer norms over the last dim."""

    layout = "channels_last"
    #: ``None``: features in the last dim of ``[N, *, C]``; 1: ``[N, C]`` (an MLP's), the same rule
    ranks: ClassVar[Mapping[int | None, tuple[int, ...]]] = {None: (2, 3, 4), 1: (2, 3, 4)}
    replaces = (nn.LayerNorm,)

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-5, dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks, dims=dims)
        self.eps = check_positive(eps, "eps")

    @classmethod
    def options_from(cls, module: nn.Module) -> dict[str, Any]:
        if (not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1
                or not module.elementwise_affine or module.bias is None):
            raise ValueError(f"only LayerNorm over the last dim with γ and β converts, got {module}")
        return {"eps": module.eps, "dims": None}

    def export(self, task: int, gate: Tensor, keep: Tensor) -> nn.Module:
        # statistics over every feature: export keeps every unit of these norms (prunable is False)
        return ExportedLayerNorm(unit_values(self.weight, task, keep) * gate, unit_values(self.bias, task, keep) * gate,
                                 self.eps)


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

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-5, dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks, eps=eps, dims=dims)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        return masked_layer_norm(x, gate, self.weight, self.bias, self.eps)

    def export(self, task: int, gate: Tensor, keep: Tensor) -> nn.Module:
        selected = gate > 0.5
        if not bool(selected.any()):  # no feature selected: the norm gives zeros
            return ExportedGate(torch.zeros_like(gate), self.channel_dim)
        return ExportedLayerNorm(unit_values(self.weight, task, keep) * gate, unit_values(self.bias, task, keep) * gate,
                                 self.eps, None if bool(selected.all()) else selected)


@final
class SharedLayerNorm(_LayerNormBase):
    """Shared LayerNorm baseline: a ⊙ LN(x) over all features, γ/β protected like a bias."""

    prunable = False

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-5, dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks, eps=eps, dims=dims)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        return F.layer_norm(x, (self.num_features,), self.weight * gate, self.bias * gate, self.eps)


@final
class TaskLayerNorm(_LayerNormBase):
    """Per-task LayerNorm: a ⊙ LN_t(x) over all features with task t's own γ_t, β_t."""

    prunable = False

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-5, dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks, eps=eps, dims=dims)
        self.weight = nn.Parameter(torch.ones(num_tasks, num_features))
        self.bias = nn.Parameter(torch.zeros(num_tasks, num_features))

    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        return F.layer_norm(x, (self.num_features,), self.weight[task] * gate, self.bias[task] * gate, self.eps)


class _RMSNormBase(_LayerNormBase):
    """What the RMS norms share: they replace ``nn.RMSNorm`` (γ, no β) and default to eps 1e-6."""

    replaces = (nn.RMSNorm,)

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-6, dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks, eps=eps, dims=dims)

    @classmethod
    def options_from(cls, module: nn.Module) -> dict[str, Any]:
        if not isinstance(module, nn.RMSNorm) or len(module.normalized_shape) != 1 or not module.elementwise_affine:
            raise ValueError(f"only RMSNorm over the last dim with γ converts, got {module}")
        # torch's eps=None is the dtype's machine epsilon
        eps = module.eps if module.eps is not None else torch.finfo(module.weight.dtype).eps
        return {"eps": eps, "dims": None}

    def export(self, task: int, gate: Tensor, keep: Tensor) -> nn.Module:
        # statistics over every feature: export keeps every unit of these norms (prunable is False)
        return ExportedRMSNorm(unit_values(self.weight, task, keep) * gate, self.eps)


@final
class MaskedRMSNorm(_RMSNormBase):
    """Masked RMSNorm over the last dim (modern transformers): rms over the selected features only.

    rms² = Σ m_i z_i² / Σ m_i + eps with m = 1[a > 0.5]; output a ⊙ γ ⊙ z / rms; no selected feature gives
    zeros. One γ, shared and protected by HAT like a bias (RMSNorm has no β).

    Args:
        num_features: number of features C (the last dim).
        num_tasks: number of tasks T.
        eps: added to the mean square [1e-6].
    """

    isolates_tasks = True

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-6, dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks, eps=eps, dims=dims)
        self.weight = nn.Parameter(torch.ones(num_features))

    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        return masked_rms_norm(x, gate, self.weight, self.eps)

    def export(self, task: int, gate: Tensor, keep: Tensor) -> nn.Module:
        selected = gate > 0.5
        return ExportedRMSNorm(self.weight.detach()[keep] * gate * bool(selected.any()), self.eps,
                               None if bool(selected.all()) else selected)


@final
class SharedRMSNorm(_RMSNormBase):
    """Shared RMSNorm baseline: a ⊙ γ ⊙ x / rms(x) with the mean square over all features, γ protected like a bias.

    Args:
        num_features: number of features C (the last dim).
        num_tasks: number of tasks T.
        eps: added to the mean square [1e-6].
    """

    prunable = False

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-6, dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks, eps=eps, dims=dims)
        self.weight = nn.Parameter(torch.ones(num_features))

    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        return F.rms_norm(x, (self.num_features,), self.weight * gate, self.eps)


@final
class TaskRMSNorm(_RMSNormBase):
    """Per-task RMSNorm: a ⊙ γ_t ⊙ x / rms(x) over all features with task t's own γ_t.

    Args:
        num_features: number of features C (the last dim).
        num_tasks: number of tasks T.
        eps: added to the mean square [1e-6].
    """

    prunable = False

    def __init__(self, num_features: int, *, num_tasks: int, eps: float = 1e-6, dims: int | None = None) -> None:
        super().__init__(num_features, num_tasks=num_tasks, eps=eps, dims=dims)
        self.weight = nn.Parameter(torch.ones(num_tasks, num_features))

    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        return F.rms_norm(x, (self.num_features,), self.weight[task] * gate, self.eps)

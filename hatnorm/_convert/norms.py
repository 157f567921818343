"""Which task-aware norm replaces each torch norm of a model, and building it from the torch norm's state."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from hatnorm._convert.error import ConversionError
from hatnorm._norm_protocol import MaskedNorm
from hatnorm._norm_registry import NormSpec, get_norm, list_norms

#: the kinds of torch norm a per-kind ``norm`` mapping of :func:`hatnorm.convert` names
KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "batch": (nn.BatchNorm1d, nn.BatchNorm2d), "layer": (nn.LayerNorm,), "group": (nn.GroupNorm,),
    "rms": (nn.RMSNorm,),
}


class Norms:
    """The task-aware norm for each torch norm of a model: one norm for all, or one per kind."""

    def __init__(self, norm: object) -> None:
        self.by_kind: dict[str, NormSpec] | None = None
        if isinstance(norm, Mapping):
            unknown = [k for k in norm if k not in KINDS]
            if unknown:
                raise ValueError(f"norm: the keys of a per-kind mapping must be among {list(KINDS)}, got "
                                 f"{unknown[0]!r}")
            self.by_kind = {kind: spec_of(name) for kind, name in norm.items()}
            self.single = None
        else:
            self.single = spec_of(norm)

    def for_kind(self, kind: str) -> NormSpec:
        """The norm replacing the norms of ``kind`` (a key of :data:`KINDS`), for the structural converters."""
        if self.by_kind is None:
            return self.single
        if kind not in self.by_kind:
            raise ConversionError(f"norm: the model's {kind} norms need a norm, but the mapping gives only "
                                  f"{sorted(self.by_kind)}; add {kind!r}")
        return self.by_kind[kind]

    def for_module(self, module: nn.Module, where: str) -> NormSpec:
        if self.by_kind is None:
            return self.single
        kind = next((k for k, types in KINDS.items() if isinstance(module, types)), None)
        if kind is None or kind not in self.by_kind:
            raise ConversionError(f"norm: no norm for {where}; the mapping gives "
                                  f"{sorted(self.by_kind)}" + ("" if kind is None else f", add {kind!r}"))
        return self.by_kind[kind]


def spec_of(norm: object) -> NormSpec:
    spec = get_norm(norm) if isinstance(norm, str) else norm
    if not isinstance(spec, NormSpec):
        raise TypeError(f"norm must be a registered norm name, a NormSpec, or a mapping from kinds {list(KINDS)} "
                        f"to them, got {norm!r}")
    return spec


def make_norm(module: nn.Module, spec: NormSpec, num_tasks: int, where: str) -> MaskedNorm:
    """The task-aware norm standing for ``module``, its γ, β and statistics in every task slot."""
    if not isinstance(module, spec.replaces):
        fitting = [n for n in list_norms() if isinstance(module, get_norm(n).replaces)]
        raise ConversionError(f"norm {spec.name!r} cannot replace {where}: it replaces "
                              f"{', '.join(t.__name__ for t in spec.replaces) or 'none'}; norms that replace "
                              f"{type(module).__name__}: {fitting}; a model with several kinds of norm takes one "
                              "per kind, e.g. norm={'batch': 'masked_bn', 'layer': 'masked_ln'}")
    module = _with_affine(module)
    try:
        options = spec.options_from(module)
    except ValueError as error:
        raise ConversionError(f"{where}: {error}") from None
    norm = spec.layer(num_tasks=num_tasks, **options)(num_features(module))
    if any(True for _ in norm.parameters()) or any(True for _ in norm.buffers()):
        norm.load_state_dict(module.state_dict())
    return norm.to(next(module.parameters()).device)


def _with_affine(module: nn.Module) -> nn.Module:
    """A LayerNorm over the last dim or a GroupNorm without β (MetaFormer's ``LayerNorm2dNoBias`` and
    ``GroupNorm1NoBias``) or without γ and β, as the norm with them that computes the same: β = 0, γ = 1 (they become
    parameters a task may learn, protected like the others); any other module as it is."""
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and module.bias is None:
        full = nn.LayerNorm(module.normalized_shape, eps=module.eps)
    elif isinstance(module, nn.GroupNorm) and module.bias is None:
        full = nn.GroupNorm(module.num_groups, module.num_channels, eps=module.eps)
    else:
        return module
    if module.weight is None:
        return full
    full = full.to(device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        full.weight.copy_(module.weight)
    return full


def norm_modules() -> tuple[type[nn.Module], ...]:
    """The torch norms convert recognises: BatchNorm, LayerNorm and whatever a registered norm replaces."""
    return (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, *(t for n in list_norms() for t in get_norm(n).replaces))


def num_features(module: nn.Module) -> int:
    """The units of a torch norm: its γ's length, or its declared feature count."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor):
        return weight.shape[0]
    return module.num_features if hasattr(module, "num_features") else module.normalized_shape[-1]


"""The norm registry: names → task-aware norm builders, resolved once at the model boundary."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from hatnorm._norms import (
    MaskedBatchNorm1d,
    MaskedBatchNorm2d,
    MaskedLayerNorm,
    MaskedNorm,
    NoNorm,
    PostGateBatchNorm1d,
    PostGateBatchNorm2d,
    SharedBatchNorm1d,
    SharedBatchNorm2d,
    SharedLayerNorm,
    TaskBatchNorm1d,
    TaskBatchNorm2d,
    TaskLayerNorm,
)
from hatnorm._registry import Registry, check_callable

Family = Literal["batch", "layer", "any"]
NormBuilder = Callable[..., MaskedNorm]
FAMILIES: tuple[Family, ...] = ("batch", "layer", "any")


@dataclass(frozen=True)
class NormSpec:
    """A registered norm.

    Attributes:
        name: the registry name.
        family: ``"batch"`` (channels in dim 1, for CNNs), ``"layer"`` (features in the last dim, for
            transformers) or ``"any"`` (fits both).
        builder: ``builder(num_features, *, num_tasks, dims, **options)`` → a :class:`MaskedNorm`;
            ``dims`` is 1 for ``[N, C]``/``[N, C, L]`` inputs, 2 for ``[N, C, H, W]``, and ``None``
            for features in the last dim (``[N, tokens, D]``, transformers).
    """

    name: str
    family: Family
    builder: NormBuilder

    def fits(self, family: Family) -> bool:
        """Whether this norm can stand in a model that needs ``family`` (``"any"``: a model that takes every norm)."""
        return family == "any" or self.family in (family, "any")

    def layer(self, *, num_tasks: int, dims: int | None = 2, **options: Any) -> Callable[[int], MaskedNorm]:
        """A factory ``norm_layer(num_features)`` with the task options bound, to hand to a model."""
        return functools.partial(self.builder, num_tasks=num_tasks, dims=dims, **options)


NORMS: Registry[NormSpec] = Registry("norm", "hatnorm.norms")


def register_norm(name: str, *, family: Family) -> Callable[[NormBuilder], NormBuilder]:
    """Register a norm builder under ``name``.

    The builder is called as ``builder(num_features, *, num_tasks, dims, **options)`` and returns a
    :class:`MaskedNorm`. A duplicate name is a ``ValueError``.

    Args:
        name: the registry name.
        family: ``"batch"``, ``"layer"`` or ``"any"``: which models the norm fits.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")

    def wrap(builder: NormBuilder) -> NormBuilder:
        check_callable(builder, "norm")
        NORMS.register(name, NormSpec(name, family, builder))
        return builder

    return wrap


def get_norm(name: str) -> NormSpec:
    """The norm registered as ``name``; an unknown name is a ``ValueError`` listing the registered ones."""
    return NORMS.get(name)


def list_norms(family: Family | None = None) -> list[str]:
    """The registered norm names, all of them or those that fit ``family`` (``"batch"`` or ``"layer"``)."""
    if family is None:
        return NORMS.names()
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)} or None, got {family!r}")
    return [n for n in NORMS.names() if NORMS.get(n).fits(family)]


def _by_dims(name: str, one: type[MaskedNorm], two: type[MaskedNorm]) -> NormBuilder:
    def build(num_features: int, *, num_tasks: int, dims: int | None = 2, **options: Any) -> MaskedNorm:
        if dims not in (1, 2):
            raise ValueError(f"dims must be 1 ([N, C] or [N, C, L]) or 2 ([N, C, H, W]) for norm {name!r}, "
                             f"got {dims!r}")
        return (one if dims == 1 else two)(num_features, num_tasks=num_tasks, **options)

    build.__name__ = name
    build.__doc__ = f"Build {one.__name__} (dims=1) or {two.__name__} (dims=2)."
    return build


def _features_last(name: str, cls: type[MaskedNorm]) -> NormBuilder:
    def build(num_features: int, *, num_tasks: int, dims: int | None = None, **options: Any) -> MaskedNorm:
        if dims not in (None, 1):
            raise ValueError(f"dims must be None (features in the last dim) or 1 ([N, C]) for norm {name!r}, "
                             f"got {dims!r}")
        return cls(num_features, num_tasks=num_tasks, **options)

    build.__name__ = name
    build.__doc__ = f"Build {cls.__name__} over the last dim (dims=None, or 1 for [N, C])."
    return build


def _no_norm(num_features: int, *, num_tasks: int, dims: int | None = 2, **options: Any) -> MaskedNorm:
    """Build :class:`NoNorm` gating dim 1 (dims=1 or 2) or the last dim (dims=None)."""
    if dims not in (None, 1, 2):
        raise ValueError(f"dims must be None (features last), 1 or 2 for norm 'none', got {dims!r}")
    return NoNorm(num_features, num_tasks=num_tasks, channel_dim=-1 if dims is None else 1, **options)


register_norm("masked_bn", family="batch")(_by_dims("masked_bn", MaskedBatchNorm1d, MaskedBatchNorm2d))
register_norm("task_bn", family="batch")(_by_dims("task_bn", TaskBatchNorm1d, TaskBatchNorm2d))
register_norm("shared_bn", family="batch")(_by_dims("shared_bn", SharedBatchNorm1d, SharedBatchNorm2d))
register_norm("post_gate_bn", family="batch")(_by_dims("post_gate_bn", PostGateBatchNorm1d, PostGateBatchNorm2d))
register_norm("masked_ln", family="layer")(_features_last("masked_ln", MaskedLayerNorm))
register_norm("shared_ln", family="layer")(_features_last("shared_ln", SharedLayerNorm))
register_norm("task_ln", family="layer")(_features_last("task_ln", TaskLayerNorm))
register_norm("none", family="any")(_no_norm)

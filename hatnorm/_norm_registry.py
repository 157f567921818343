"""The norm registry: names → task-aware norm builders, resolved once at the model boundary."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from hatnorm._norms import (
    Family,
    MaskedBatchNorm,
    MaskedChannelLayerNorm,
    MaskedGroupNorm,
    MaskedLayerNorm,
    MaskedNorm,
    MaskedRMSNorm,
    NoNorm,
    PostGateBatchNorm,
    SharedBatchNorm,
    SharedLayerNorm,
    TaskBatchNorm,
    TaskLayerNorm,
)
from hatnorm._registry import Registry, check_callable

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
        norm_class: the :class:`MaskedNorm` subclass the builder makes, whose declarations
            (:attr:`~MaskedNorm.replaces`, :meth:`~MaskedNorm.options_from`) :func:`hatnorm.convert`
            reads; ``None`` for a builder registered without it (it then replaces the torch norms of its
            family, with their layout only).
    """

    name: str
    family: Family
    builder: NormBuilder
    norm_class: type[MaskedNorm] | None = None

    @property
    def isolates_tasks(self) -> bool:
        """Whether the norm's class declares that it forgets nothing under HAT (:attr:`MaskedNorm.isolates_tasks`);
        False for a builder registered without its class."""
        return self.norm_class is not None and self.norm_class.isolates_tasks

    @property
    def batch_statistics(self) -> bool:
        """Whether the norm's class normalises with batch statistics in training (False without its class)."""
        return self.norm_class is not None and self.norm_class.batch_statistics

    @property
    def replaces(self) -> tuple[type[nn.Module], ...]:
        """The torch modules :func:`hatnorm.convert` may replace with this norm."""
        if self.norm_class is not None:
            return self.norm_class.replaces
        return {"batch": _BATCH, "layer": _LAYER, "any": _BATCH + _LAYER}[self.family]

    def options_from(self, module: nn.Module) -> dict[str, Any]:
        """The builder options that make this norm stand for ``module`` (``dims`` included).

        Raises:
            ValueError: this norm cannot stand for ``module``.
        """
        if not isinstance(module, self.replaces):
            raise ValueError(f"norm {self.name!r} cannot replace {type(module).__name__}; it replaces "
                             f"{', '.join(t.__name__ for t in self.replaces) or 'no torch module'}")
        if self.norm_class is not None:
            return self.norm_class.options_from(module)
        return {"dims": None if isinstance(module, nn.LayerNorm) else 1 if isinstance(module, nn.BatchNorm1d) else 2}

    def fits(self, family: Family) -> bool:
        """Whether this norm can stand in a model that needs ``family`` (``"any"``: a model that takes every norm)."""
        return family == "any" or self.family in (family, "any")

    def layer(self, *, num_tasks: int, dims: int | None = 2, **options: Any) -> Callable[[int], MaskedNorm]:
        """A factory ``norm_layer(num_features)`` with the task options bound, to hand to a model."""
        return functools.partial(self.builder, num_tasks=num_tasks, dims=dims, **options)


NORMS: Registry[NormSpec] = Registry("norm", "hatnorm.norms")
_BATCH: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
_LAYER: tuple[type[nn.Module], ...] = (nn.LayerNorm,)


def register_norm(name: str, *, family: Family | None = None,
                  norm_class: type[MaskedNorm] | None = None) -> Callable[[NormBuilder], NormBuilder]:
    """Register a norm under ``name``: a :class:`MaskedNorm` subclass, or a builder function.

    A builder is called as ``builder(num_features, *, num_tasks, dims, **options)`` and returns a
    :class:`MaskedNorm`; a class is called the same way (its constructor takes ``dims``). Registering a
    class (or a builder with its ``norm_class``) is what lets :func:`hatnorm.convert` use the norm's
    declarations. A duplicate name is a ``ValueError``.

    Args:
        name: the registry name.
        family: ``"batch"``, ``"layer"`` or ``"any"``: which models the norm fits (default: the class's
            :attr:`~MaskedNorm.family`; required for a builder function).
        norm_class: for a builder function, the class it builds.
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    if norm_class is not None and not (isinstance(norm_class, type) and issubclass(norm_class, MaskedNorm)):
        raise TypeError(f"norm_class must be a MaskedNorm subclass, got {norm_class!r}")

    def wrap(builder: NormBuilder) -> NormBuilder:
        check_callable(builder, "norm")
        cls = builder if isinstance(builder, type) and issubclass(builder, MaskedNorm) else norm_class
        kind = family if family is not None else None if cls is None else cls.family
        if kind is None:
            raise ValueError(f"family must be given for the norm builder {name!r} (a function, not a MaskedNorm "
                             "class)")
        NORMS.register(name, NormSpec(name, kind, builder, cls))
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


def _with_layouts(name: str, cls: type[MaskedNorm], layouts: tuple[int | None, ...], *,
                  passes_dims: bool) -> NormBuilder:
    """The builder of ``cls`` for the registry's layouts ``layouts`` (``dims``: 1, 2, or ``None`` for
    features last); ``passes_dims``: the class takes ``dims`` (the batch norms narrow their input check)."""
    allowed = {1: "1 ([N, C] or [N, C, L])", 2: "2 ([N, C, H, W])", None: "None (features in the last dim)"}

    def build(num_features: int, *, num_tasks: int, dims: int | None = layouts[0], **options: Any) -> MaskedNorm:
        if dims not in layouts or isinstance(dims, bool):
            raise ValueError(f"dims must be {' or '.join(allowed[d] for d in layouts)} for norm {name!r}, "
                             f"got {dims!r}")
        layout = {"dims": dims} if passes_dims else {}
        return cls(num_features, num_tasks=num_tasks, **layout, **options)

    build.__name__ = name
    build.__doc__ = f"Build {cls.__name__} for the layouts dims={list(layouts)}."
    return build


def _no_norm(num_features: int, *, num_tasks: int, dims: int | None = 2, **options: Any) -> MaskedNorm:
    """Build :class:`NoNorm` gating dim 1 (dims=1 or 2) or the last dim (dims=None)."""
    if dims not in (None, 1, 2):
        raise ValueError(f"dims must be None (features last), 1 or 2 for norm 'none', got {dims!r}")
    return NoNorm(num_features, num_tasks=num_tasks, channel_dim=-1 if dims is None else 1, **options)


for _name, _cls in (("masked_bn", MaskedBatchNorm), ("task_bn", TaskBatchNorm), ("shared_bn", SharedBatchNorm),
                    ("post_gate_bn", PostGateBatchNorm)):
    register_norm(_name, norm_class=_cls)(_with_layouts(_name, _cls, (2, 1), passes_dims=True))
for _name, _cls in (("masked_gn", MaskedGroupNorm), ("masked_cln", MaskedChannelLayerNorm)):
    register_norm(_name, norm_class=_cls)(_with_layouts(_name, _cls, (2, 1), passes_dims=True))
for _name, _cls in (("masked_ln", MaskedLayerNorm), ("shared_ln", SharedLayerNorm), ("task_ln", TaskLayerNorm),
                    ("masked_rms", MaskedRMSNorm)):
    register_norm(_name, norm_class=_cls)(_with_layouts(_name, _cls, (None, 1), passes_dims=False))
register_norm("none", family="any", norm_class=NoNorm)(_no_norm)

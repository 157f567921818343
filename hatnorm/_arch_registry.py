"""The architecture registry and ``build``: names → model builders, norms resolved at the boundary."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from hatnorm._checks import check_num_tasks
from hatnorm._gate import HATGate
from hatnorm._heads import class_counts
from hatnorm._norm_registry import FAMILIES, Family, NormSpec, get_norm, list_norms
from hatnorm._registry import Registry, check_callable

ArchitectureBuilder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ArchitectureSpec:
    """A registered architecture.

    Attributes:
        name: the registry name.
        family: the norm family the model needs (``"batch"`` for CNNs, ``"layer"`` for transformers).
        builder: ``builder(*, num_tasks, norm: NormSpec, num_classes: list[int], **options)`` → model.
    """

    name: str
    family: Family
    builder: ArchitectureBuilder


ARCHITECTURES: Registry[ArchitectureSpec] = Registry("architecture", "hatnorm.architectures")


def register_architecture(name: str, *, family: Family) -> Callable[[ArchitectureBuilder], ArchitectureBuilder]:
    """Register a model builder under ``name``; a duplicate name is a ``ValueError``.

    The builder is called by :func:`build` as ``builder(*, num_tasks, norm, num_classes, **options)``
    with ``norm`` a resolved :class:`NormSpec` and ``num_classes`` one count per task.

    Args:
        name: the registry name.
        family: the norm family the model needs: ``"batch"`` or ``"layer"``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")

    def wrap(builder: ArchitectureBuilder) -> ArchitectureBuilder:
        check_callable(builder, "architecture")
        ARCHITECTURES.register(name, ArchitectureSpec(name, family, builder))
        return builder

    return wrap


def get_architecture(name: str) -> ArchitectureSpec:
    """The architecture registered as ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    return ARCHITECTURES.get(name)


def list_architectures() -> list[str]:
    """The registered architecture names."""
    return ARCHITECTURES.names()


def build(
    name: str,
    *,
    num_tasks: int,
    norm: str | NormSpec = "masked_bn",
    num_classes: int | Sequence[int],
    reference: bool = False,
    **options: Any,
) -> nn.Module:
    """Build the registered architecture ``name`` with a task-aware norm and one head per task.

    Args:
        name: a registered architecture (see :func:`list_architectures`).
        num_tasks: number of tasks.
        norm: a registered norm name (see :func:`list_norms`) that fits the architecture.
        num_classes: the class count of every task, or one count per task.
        reference: Serrà et al.'s code rather than the paper: soft cumulative masks σ(s_max·e), every
            gate built with ``binarize=False``; train it with ``HAT(model, reference=True)``
            (:class:`hatnorm.training.HATMethod` ``(reference=True)``) [False].
        **options: architecture options (input size, width, ``s_max``, ...).
    """
    if not isinstance(reference, bool):
        raise TypeError(f"reference must be a bool, got {reference!r}")
    spec = get_architecture(name)
    num_tasks = check_num_tasks(num_tasks)
    if isinstance(norm, str):
        norm = get_norm(norm)
    if not isinstance(norm, NormSpec):
        raise TypeError(f"norm must be a registered norm name or a NormSpec, got {norm!r}")
    if not norm.fits(spec.family):
        raise ValueError(f"norm {norm.name!r} does not fit architecture {name!r}; allowed: {list_norms(spec.family)}")
    counts = class_counts(num_classes, num_tasks)
    model = spec.builder(num_tasks=num_tasks, norm=norm, num_classes=counts, **options)
    if reference:
        for gate in model.modules():
            if isinstance(gate, HATGate):
                gate.binarize = False
    return model

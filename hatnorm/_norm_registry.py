"""The norm registry: names → task-aware norm classes, resolved once at the model boundary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from hatnorm._norm_batch import (
    MaskedBatchNorm,
    MaskedChannelLayerNorm,
    MaskedGroupNorm,
    PostGateBatchNorm,
    SharedBatchNorm,
    SharedChannelLayerNorm,
    SharedGroupNorm,
    TaskBatchNorm,
    TaskChannelLayerNorm,
    TaskGroupNorm,
)
from hatnorm._norm_contract import check_declarations
from hatnorm._norm_layer import (
    MaskedLayerNorm,
    MaskedRMSNorm,
    SharedLayerNorm,
    SharedRMSNorm,
    TaskLayerNorm,
    TaskRMSNorm,
)
from hatnorm._norm_protocol import FAMILY_OF, Family, MaskedNorm, NoNorm
from hatnorm._registry import Registry, check_callable

FAMILIES: tuple[Family, ...] = ("batch", "layer", "any")


@dataclass(frozen=True)
class NormSpec:
    """A registered norm: its name and its class, whose declarations say everything else.

    Attributes:
        name: the registry name.
        norm_class: the :class:`MaskedNorm` subclass, built as ``norm_class(num_features, *, num_tasks, dims,
            **options)``; its :attr:`~MaskedNorm.layout`, :attr:`~MaskedNorm.ranks`,
            :attr:`~MaskedNorm.replaces` and :meth:`~MaskedNorm.options_from` are read by models and
            :func:`hatnorm.convert`.
    """

    name: str
    norm_class: type[MaskedNorm]

    @property
    def family(self) -> Family:
        """Which models the norm fits, from its class's layout: ``"batch"`` (channels in dim 1, CNNs),
        ``"layer"`` (features in the last dim, transformers) or ``"any"``."""
        return FAMILY_OF[self.norm_class.layout]

    @property
    def isolates_tasks(self) -> bool:
        """Whether the norm's class declares that it forgets nothing under HAT (:attr:`MaskedNorm.isolates_tasks`)."""
        return self.norm_class.isolates_tasks

    @property
    def batch_statistics(self) -> bool:
        """Whether the norm's class normalises with batch statistics in training."""
        return self.norm_class.batch_statistics

    @property
    def replaces(self) -> tuple[type[nn.Module], ...]:
        """The torch modules :func:`hatnorm.convert` may replace with this norm."""
        return self.norm_class.replaces

    def options_from(self, module: nn.Module) -> dict[str, Any]:
        """The constructor options that make this norm stand for ``module`` (``dims`` included).

        Raises:
            ValueError: this norm cannot stand for ``module``.
        """
        if not isinstance(module, self.replaces):
            raise ValueError(f"norm {self.name!r} cannot replace {type(module).__name__}; it replaces "
                             f"{', '.join(t.__name__ for t in self.replaces) or 'no torch module'}")
        return self.norm_class.options_from(module)

    def fits(self, family: Family) -> bool:
        """Whether this norm can stand in a model that needs ``family`` (``"any"``: a model that takes every norm)."""
        return family == "any" or self.family in (family, "any")

    def layer(self, *, num_tasks: int, dims: int | None = 2, **options: Any) -> Callable[[int], MaskedNorm]:
        """A factory ``norm_layer(num_features)`` with the task options bound, to hand to a model.

        The first norm a process builds of a class is checked against the class's declarations on a probe
        (:func:`hatnorm._norm_contract.check_declarations`): the output's shape, and, for a norm that declares
        :attr:`~MaskedNorm.isolates_tasks`, that it leaves an earlier task's outputs bit-identical.

        Args:
            num_tasks: number of tasks.
            dims: the input layout the model feeds, one of the class's :attr:`~MaskedNorm.ranks`.
            **options: the class's other constructor options (``eps``, ...).
        """
        cls = self.norm_class

        def norm_layer(num_features: int) -> MaskedNorm:
            norm = cls(num_features, num_tasks=num_tasks, dims=dims, **options)
            # the probe: twice the units (half of them closed to task 0) and at least 2 tasks
            check_declarations(self.name, cls, lambda: cls(2 * num_features, num_tasks=max(num_tasks, 2), dims=dims,
                                                           **options))
            return norm

        return norm_layer


NORMS: Registry[NormSpec] = Registry("norm", "hatnorm.norms")


def register_norm(name: str, *, family: Family | None = None) -> Callable[[type[MaskedNorm]], type[MaskedNorm]]:
    """Register a :class:`MaskedNorm` subclass under ``name`` (a class decorator); a duplicate name is a
    ``ValueError``. The class declares everything the registry needs: its layout (and with it the family),
    the ranks it takes, what it replaces.

    Args:
        name: the registry name.
        family: optionally, the family the class must have (``"batch"``, ``"layer"`` or ``"any"``): a check of
            the class's :attr:`~MaskedNorm.layout`, not a second declaration.
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")

    def wrap(norm_class: type[MaskedNorm]) -> type[MaskedNorm]:
        check_callable(norm_class, "norm")
        if not (isinstance(norm_class, type) and issubclass(norm_class, MaskedNorm)):
            raise TypeError(f"the registered norm must be a MaskedNorm subclass (the registry stores classes), "
                            f"got {norm_class!r}")
        declared = FAMILY_OF.get(norm_class.layout)
        if declared is None:
            raise ValueError(f"{norm_class.__name__}.layout must be one of {list(FAMILY_OF)}, got "
                             f"{norm_class.layout!r}")
        if family is not None and family != declared:
            raise ValueError(f"family: {norm_class.__name__} declares layout {norm_class.layout!r}, family "
                             f"{declared!r}; got {family!r}")
        NORMS.register(name, NormSpec(name, norm_class))
        return norm_class

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


for _name, _cls in (("masked_bn", MaskedBatchNorm), ("task_bn", TaskBatchNorm), ("shared_bn", SharedBatchNorm),
                    ("post_gate_bn", PostGateBatchNorm), ("masked_gn", MaskedGroupNorm),
                    ("masked_cln", MaskedChannelLayerNorm), ("shared_gn", SharedGroupNorm), ("task_gn", TaskGroupNorm),
                    ("shared_cln", SharedChannelLayerNorm), ("task_cln", TaskChannelLayerNorm),
                    ("masked_ln", MaskedLayerNorm),
                    ("shared_ln", SharedLayerNorm), ("task_ln", TaskLayerNorm), ("masked_rms", MaskedRMSNorm),
                    ("shared_rms", SharedRMSNorm), ("task_rms", TaskRMSNorm),
                    ("none", NoNorm)):
    register_norm(_name)(_cls)

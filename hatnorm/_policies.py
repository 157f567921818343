"""Gradient policies: how much of a parameter's gradient survives, given what earlier tasks used.

A policy maps the masks earlier tasks left on a parameter's units to a rate in [0, 1] that
multiplies its gradient. :class:`hatnorm.HAT` asks once per task, at task start. Policies whose rates change
every step (AdaHAT as its authors run it, FG-AdaHAT) are :class:`hatnorm.policies.StepPolicy` subclasses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

import torch
from torch import Tensor

from hatnorm._checks import check_positive
from hatnorm._masks import MaskState
from hatnorm._registry import Registry, check_callable


class GradientPolicy(ABC):
    """The interface every gradient policy implements."""

    @abstractmethod
    def rate(self, cumulative: Tensor, summative: Tensor, free: float) -> Tensor:
        """The gradient multiplier of each parameter entry.

        Args:
            cumulative: a^{<t} of the entry's units (for a weight, min over its output and input unit).
            summative: how many earlier tasks used the entry (for a weight, min over its two units).
            free: the fraction of the layer's output units earlier tasks left unused.
        """

    def unit_rate(self, out: MaskState) -> Tensor:
        """The multiplier of a per-unit parameter (bias, γ, β): shape ``[N]``."""
        return self.rate(out.cumulative, out.summative, out.free)

    def weight_rate(self, out: MaskState, inp: MaskState | None) -> Tensor:
        """The multiplier of a weight ``[out, in]`` from its output and input units (Serrà et al. eq. 3).

        ``inp`` may be ``[in]`` or already ``[out, in]`` (grouped convolutions); ``None`` means the
        layer reads data, and only the output side protects it.
        """
        if inp is None:
            return self.rate(out.cumulative[:, None], out.summative[:, None], out.free)
        cum_in, sum_in = inp.cumulative, inp.summative
        if cum_in.dim() == 1:
            cum_in, sum_in = cum_in[None, :], sum_in[None, :]
        return self.rate(
            torch.minimum(out.cumulative[:, None], cum_in),
            torch.minimum(out.summative[:, None], sum_in),
            out.free,
        )


@dataclass(frozen=True)
class PolicySpec:
    """A registered gradient policy: its name and what builds it.

    Attributes:
        name: the registry name.
        factory: the class or function that builds the policy, ``factory(**options)`` → :class:`GradientPolicy`.
    """

    name: str
    factory: Callable[..., GradientPolicy]


POLICIES: Registry[PolicySpec] = Registry("gradient policy", "hatnorm.policies")


def register_policy(name: str) -> Callable[[Callable[..., GradientPolicy]], Callable[..., GradientPolicy]]:
    """Register a gradient policy class (or factory) under ``name`` (a decorator); a duplicate name is a
    ``ValueError``.

    Args:
        name: the registry name.
    """

    def wrap(factory: Callable[..., GradientPolicy]) -> Callable[..., GradientPolicy]:
        check_callable(factory, POLICIES.kind)
        POLICIES.register(name, PolicySpec(name, factory))
        return factory

    return wrap


def get_policy(name: str) -> PolicySpec:
    """The gradient policy registered as ``name``; an unknown name is a ``ValueError`` listing the registered ones.

    Args:
        name: a registered policy name (see :func:`list_policies`).
    """
    return POLICIES.get(name)


def create_policy(name: str, **options: Any) -> GradientPolicy:
    """Build the gradient policy registered as ``name``.

    Args:
        name: a registered policy name (see :func:`list_policies`).
        **options: the policy's constructor options (``alpha``, ``reference``, ...).
    """
    return get_policy(name).factory(**options)


def list_policies() -> list[str]:
    """The names of the registered gradient policies."""
    return POLICIES.names()


@final
@register_policy("hat")
class HATPolicy(GradientPolicy):
    """HAT's hard protection: g' = (1 − a^{<t})·g (Serrà et al. eq. 3)."""

    def rate(self, cumulative: Tensor, summative: Tensor, free: float) -> Tensor:
        return 1 - cumulative


@final
class AdaHATPolicy(GradientPolicy):
    """AdaHAT's soft protection (Wang et al., ECML-PKDD 2024, eqs. 8–9), with multipliers fixed at task start:
    the policy ``"adahat"`` (:func:`hatnorm.create_policy`; its ``reference=True`` form follows the authors' code).

    An entry used by n earlier tasks keeps the rate r/(n + r) of its gradient, with
    r = α/(ε + sparsity); entries no task used keep their whole gradient. hatnorm fixes multipliers
    for a whole task, so the network sparsity is taken at task start as the fraction of the layer's
    units earlier tasks left free (the paper reads it from the running regulariser): a nearly full
    layer gets a larger r and lets old units adapt more.

    Args:
        alpha: the adjustment intensity α [0.1].
        epsilon: ε, keeps r finite when no capacity is free [0.1].
    """

    def __init__(self, alpha: float = 0.1, epsilon: float = 0.1) -> None:
        self.alpha = check_positive(alpha, "alpha")
        self.epsilon = check_positive(epsilon, "epsilon")

    def rate(self, cumulative: Tensor, summative: Tensor, free: float) -> Tensor:
        r = self.alpha / (self.epsilon + free)
        return r / (summative + r)

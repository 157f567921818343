"""The contract of a module that reports the gradient multipliers of its own parameters."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from hatnorm._masks import MaskState
from hatnorm._policies import GradientPolicy


class Protected(ABC):
    """A module whose parameters HAT protects through the multipliers the module reports.

    Norms implement it (:class:`hatnorm.MaskedNorm`), and so can any module with per-unit parameters
    (a position embedding over the residual stream, a learned scale): wire it with
    ``hatnorm.blocks.Layer(module, out=gate)`` and HAT asks it once per task.
    """

    @abstractmethod
    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        """The gradient multiplier of each of this module's parameters while training ``task``.

        Args:
            previous: what earlier tasks left on the module's units (its gate's masks).
            task: the task about to be trained.
            policy: the gradient policy for parameters shared between tasks.

        Returns:
            parameter name (as in ``named_parameters``) → multiplier broadcastable to the parameter;
            a parameter left out is not governed by HAT, and the coverage check refuses the model
            unless it is frozen.
        """

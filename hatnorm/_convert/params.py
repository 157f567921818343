"""Parameters a converted graph reads directly, protected by HAT: a parameter whose entries each meet one unit
(:class:`ParameterUse`), one that biases attention for a whole head (:class:`TaskParameter`), and a module that
computes such a bias (:class:`TaskModule`)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from hatnorm._masks import MaskState
from hatnorm._policies import GradientPolicy
from hatnorm._protected import Protected


class TaskParameter(nn.Module, Protected):
    """A parameter that biases attention scores (a relative position bias table): each task has its own copy,
    trained only during its task, so no task moves another's.

    Args:
        parameter: the original parameter; every task's copy starts from it.
        num_tasks: number of tasks.
    """

    def __init__(self, parameter: nn.Parameter, num_tasks: int) -> None:
        super().__init__()
        self.copies = nn.Parameter(parameter.detach().unsqueeze(0).repeat(num_tasks, *[1] * parameter.dim()))

    def forward(self, task: int) -> Tensor:
        return self.copies[task]

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        own = torch.zeros_like(self.copies)
        own[task] = 1
        return {"copies": own}


class TaskModule(nn.Module, Protected):
    """A module that computes attention biases from fixed inputs (Swin v2's continuous position bias MLP): each
    task has its own copy, trained only during its task, so no task moves another's.

    Args:
        module: the original module; every task's copy starts from it.
        num_tasks: number of tasks.
    """

    def __init__(self, module: nn.Module, num_tasks: int) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(module) for _ in range(num_tasks))

    def forward(self, task: int, *args: Tensor) -> Tensor:
        return self.copies[task](*args)

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        return {name: torch.full_like(p, float(name.split(".")[1] == str(task)))
                for name, p in self.named_parameters()}


class ParameterUse(nn.Module, Protected):
    """A parameter the traced forward reads directly (a layer scale, a position embedding, a class token),
    protected like a bias of the units its entries multiply or are added to.

    Args:
        parameter: the parameter, moved here from the module that held it.
        units: for every entry (flattened), the unit of the layer's mask source it belongs to.
    """

    def __init__(self, parameter: nn.Parameter, units: Tensor) -> None:
        super().__init__()
        self.parameter = parameter
        self.register_buffer("units", units.reshape(parameter.shape), persistent=False)

    def forward(self) -> Tensor:
        return self.parameter

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        rate = policy.unit_rate(previous)
        return {"parameter": rate[self.units.to(rate.device)].to(self.parameter.dtype)}


class BufferUse(nn.Module, Protected):
    """A buffer the traced forward multiplies a gated tensor by, one entry per unit (a fixed per-channel scale):
    it holds no parameter, so HAT has nothing to protect, but as a wired module it keeps those units whole when
    :func:`hatnorm.export` removes unused units (the buffer still has an entry for every unit).

    Args:
        buffer: the buffer, moved here from the module that held it.
    """

    def __init__(self, buffer: Tensor) -> None:
        super().__init__()
        self.register_buffer("buffer", buffer)

    def forward(self) -> Tensor:
        return self.buffer

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        return {}

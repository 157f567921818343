"""Parameters a converted graph reads directly, protected by HAT: a parameter whose entries each meet one unit
(:class:`ParameterUse`), one that biases attention for a whole head (:class:`TaskParameter`), a module that
computes such a bias (:class:`TaskModule`), a layer that computes its weight row by row (:class:`UnitRows`, around
a convolution whose traced weight computation is replayed, :class:`ComputedWeightConv`), and a transposed
convolution with its weight stored as a convolution's (:class:`TransposedConv`)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
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


class UnitRows(nn.Module, Protected):
    """A convolution that computes its weight from its own parameters, each output unit's row from that row alone
    (weight standardisation: BiT's ``StdConv2d``, NFNet's ``ScaledStdConv2d`` with its gain): a row's statistics
    read every input unit, so a row an earlier task used is frozen whole (every parameter protected by the output
    units only, as for a layer reading data).

    Args:
        layer: the convolution, called as it is.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    @property
    def weight(self) -> Tensor:
        """The layer's own weight ``[out, ...]`` (its rows, one per output unit)."""
        return self.layer.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        rate = policy.unit_rate(previous)
        return {f"layer.{name}": rate.to(p.device, p.dtype).view(-1, *[1] * (p.dim() - 1)).expand_as(p)
                for name, p in self.layer.named_parameters()}


class ComputedWeightConv(nn.Module):
    """A convolution by a weight its forward computes from the module's own parameters (weight standardisation written
    in a forward that ``torch.fx`` cannot trace alone, so it is traced into: timm's ``StdConv2dSame`` and
    ``ScaledStdConv2dSame`` pad by the input's size first): the traced computation of the weight replayed on those
    parameters, then the convolution. :class:`UnitRows` wraps it, every row protected by its output unit.

    Args:
        parameters: the parameters the computation reads, by name (``weight`` among them), moved here.
        compute: the computation: a graph module taking those parameters in their order, giving the weight.
        bias: the convolution's bias (its own parameter), or ``None``.
        convolution: ``F.conv1d``, ``F.conv2d`` or ``F.conv3d``.
        options: the convolution's stride, padding, dilation and groups, as the forward passed them.
    """

    def __init__(self, parameters: dict[str, nn.Parameter], compute: nn.Module, bias: nn.Parameter | None,
                 convolution: Callable[..., Tensor], options: tuple[object, ...]) -> None:
        super().__init__()
        self.names = tuple(parameters)
        for name, parameter in parameters.items():
            self.register_parameter(name, parameter)
        self.compute = compute
        self.bias = bias
        self.convolution, self.options = convolution, options

    def forward(self, x: Tensor) -> Tensor:
        weight = self.compute(*(getattr(self, name) for name in self.names))
        return self.convolution(x, weight, self.bias, *self.options)


#: the functional transposed convolution of each number of spatial dims
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class TransposedConv(nn.Module):
    """A transposed convolution (``nn.ConvTranspose1d/2d/3d``) with its weight stored as a convolution's,
    ``[out, in/groups, *kernel]``, so HAT protects it like any convolution: entry ``[o, i]`` by output unit ``o``
    and input unit ``i`` (each output channel reads the input channels of its group, as in a grouped convolution).
    torch stores it ``[in, out/groups, *kernel]``; the forward puts it back in that layout, the same values.

    Args:
        layer: the transposed convolution (zero padding); its bias is kept, its weight moved here.
    """

    #: the dim of the input that holds its units (channels), read by FG-AdaHAT's activation importance
    input_unit_dim = 1

    def __init__(self, layer: nn.modules.conv._ConvTransposeNd) -> None:
        super().__init__()
        weight, groups = layer.weight, layer.groups
        kernel = weight.shape[2:]
        self.in_channels, self.out_channels, self.groups = layer.in_channels, layer.out_channels, groups
        self.stride, self.padding, self.output_padding, self.dilation = (
            layer.stride, layer.padding, layer.output_padding, layer.dilation)
        stored = weight.detach().view(groups, weight.shape[0] // groups, weight.shape[1], *kernel).transpose(1, 2)
        self.weight = nn.Parameter(stored.reshape(layer.out_channels, weight.shape[0] // groups, *kernel).clone(),
                                   requires_grad=weight.requires_grad)
        self.bias = layer.bias

    def forward(self, x: Tensor) -> Tensor:
        groups, kernel = self.groups, self.weight.shape[2:]
        per_group = self.out_channels // groups
        weight = self.weight.view(groups, per_group, self.in_channels // groups, *kernel).transpose(1, 2)
        weight = weight.reshape(self.in_channels, per_group, *kernel)
        return _CONV_TRANSPOSE[len(kernel)](x, weight, self.bias, self.stride, self.padding, self.output_padding,
                                            groups, self.dilation)

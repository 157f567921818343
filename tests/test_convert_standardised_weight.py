"""Weight standardisation written in a forward that is traced into (timm's ``StdConv2dSame`` and
``ScaledStdConv2dSame``: TF "SAME" padding computed from the input's size, which ``torch.fx`` cannot trace alone, then
``F.batch_norm`` over the rows of the weight): the weight's computation and the convolution become one layer whose
rows are protected by their output units. Small models convert, reproduce the original with open gates and forget
nothing under AdamW; a standardised weight that is not a convolution's is refused naming the line."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm
from hatnorm._convert.params import ComputedWeightConv, UnitRows

NORM = {"batch": "masked_bn", "group": "masked_gn"}


def pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TF's "SAME" padding, from the input's size (a branch on it: fx cannot trace it without the example)."""
    size = x.shape[-1]
    pad = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    if pad > 0:
        x = F.pad(x, [pad // 2, pad - pad // 2, pad // 2, pad - pad // 2])
    return x


class StdConvSame(nn.Conv2d):
    """timm's ``StdConv2dSame``: padding by the input's size, then each output unit's row of weights standardised."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                              eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConvSame(nn.Conv2d):
    """timm's ``ScaledStdConv2dSame``: the same with a learned gain per output unit and a fixed scale."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, self.out_channels).view(-1, 1, 1, 1))
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class HybridStem(nn.Module):
    """ViT-hybrid's stem: a standardised convolution, a GroupNorm, then a scaled one with a bias and no norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = StdConvSame(3, 8, 3, stride=2, bias=False)
        self.norm = nn.GroupNorm(2, 8)
        self.conv2 = ScaledStdConvSame(8, 8, 3, stride=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.norm(self.conv1(x)))))
        return self.head(h.mean((2, 3)))


def test_standardised_convolutions_traced_into_convert_and_reproduce() -> None:
    torch.manual_seed(0)
    assert_open_gates_reproduce(filled(HybridStem()), NORM, torch.randn(2, 3, 15, 15))


def test_standardised_convolutions_traced_into_forget_nothing() -> None:
    torch.manual_seed(0)
    assert_a_second_task_forgets_nothing(filled(HybridStem()), NORM, torch.randn(2, 3, 15, 15))


def test_each_becomes_one_layer_with_its_parameters_protected_by_rows() -> None:
    torch.manual_seed(0)
    original = HybridStem()
    converted = hatnorm.convert(original, num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 15, 15))
    layers = [m.layer for m in converted.modules() if isinstance(m, UnitRows)]
    assert [type(m) for m in layers] == [ComputedWeightConv, ComputedWeightConv]
    assert [sorted(n for n, _ in m.named_parameters()) for m in layers] == [["weight"], ["bias", "gain", "weight"]]
    assert torch.equal(layers[1].gain, original.conv2.gain)


class StandardisedLinear(nn.Module):
    """A Linear whose weight rows are standardised by ``F.batch_norm``: no convolution reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.weight = nn.Parameter(torch.randn(4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(self.weight.unsqueeze(0), None, None, training=True, momentum=0.0, eps=1e-6)
        return F.linear(self.conv(x).mean((2, 3)), weight[0])


def test_a_standardised_weight_no_convolution_reads_is_refused_naming_the_line() -> None:
    with pytest.raises(hatnorm.ConversionError,
                       match=r"test_convert_standardised_weight\.py:\d+ `weight = F\.batch_norm.*of a convolution"):
        hatnorm.convert(StandardisedLinear(), num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 8, 8))

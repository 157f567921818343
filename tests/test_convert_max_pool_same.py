"""-inf padding before a max-pool (timm's ``MaxPool2dSame``, TensorFlow's 'SAME' padding: NASNet, PNASNet): the
padding is -inf whatever the gates, but a max-pool whose every window also holds a value of the map drops it, so a
closed unit still gives 0. The convolutions beside them pad the same way, by their kernel's size read from the weight
(timm's ``Conv2dSame``). Small models convert, reproduce the original with open gates and forget nothing under
AdamW; -inf padding read by anything else, or by a max-pool with a window of padding only, is refused naming the
line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm


class SameConv(nn.Conv2d):
    """timm's ``Conv2dSame``: zero 'SAME' padding computed from the kernel size its forward reads off the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.weight.shape[-2:]
        ph = max((-(-x.shape[-2] // self.stride[0]) - 1) * self.stride[0] + kh - x.shape[-2], 0)
        pw = max((-(-x.shape[-1] // self.stride[1]) - 1) * self.stride[1] + kw - x.shape[-1], 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class SamePadded(nn.Module):
    """Max-pools after asymmetric -inf padding: a functional one (``MaxPool2dSame``'s forward) and a module; a
    depthwise convolution with 'SAME' padding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2, stride=2)
        self.mix = nn.Sequential(SameConv(8, 8, 5, stride=2, groups=8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = F.max_pool2d(F.pad(h, (0, 1, 0, 1), value=-float("inf")), (3, 3), (2, 2), (0, 0), (1, 1), False)
        h = self.pool(F.pad(self.mix(h), (1, 0, 1, 0), value=-float("inf")))
        return self.head(h.mean((2, 3)))


NORM = {"batch": "masked_bn"}


def test_open_gates_reproduce_the_original() -> None:
    assert_open_gates_reproduce(filled(SamePadded()), NORM, torch.randn(4, 3, 15, 15))


def test_training_a_second_task_forgets_nothing() -> None:
    assert_a_second_task_forgets_nothing(filled(SamePadded()), NORM, torch.randn(4, 3, 15, 15))


class Refused(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pad(self.conv(x), (2, 2, 2, 2), value=-float("inf"))
        h = F.avg_pool2d(h, 3) if self.kind == "average" else F.max_pool2d(h, 2, 1)
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize(("kind", "message"), [
    ("average", r"pads with -inf, which only a max-pool may read .* but avg_pool2d reads it"),
    ("padding only", r"pads with -inf before a max-pool with a window that holds padding only"),
])
def test_other_readers_of_minus_inf_padding_are_refused_naming_the_line(kind: str, message: str) -> None:
    with pytest.raises(hatnorm.ConversionError, match=message) as refused:
        hatnorm.convert(Refused(kind), num_tasks=2, example_input=torch.randn(2, 3, 8, 8))
    assert "test_convert_max_pool_same.py:" in str(refused.value)

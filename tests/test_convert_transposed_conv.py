"""Transposed convolutions (LowFormer's upsampling, decoders' ``nn.ConvTranspose2d``): converted like a convolution,
their weight stored ``[out, in/groups, *kernel]`` so HAT protects each entry by its output and input units. Small
models convert, reproduce the original with open gates and forget nothing under AdamW; a call with ``output_size``
and a transposed convolution as the classifier are refused naming the line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm
from hatnorm._convert.params import TransposedConv


class Upsampling(nn.Module):
    """A strided grouped transposed convolution with output padding, followed by a norm, and one in 1-D followed by
    nothing but a residual add (a gate of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.bn = nn.BatchNorm2d(6)
        self.line = nn.ConvTranspose1d(6, 6, 3, padding=1, bias=False)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.up(self.down(x))))
        t = h.flatten(2)
        t = t + self.line(t)
        return self.head(t.mean(2))


NORM = {"batch": "masked_bn"}


def test_the_weight_is_stored_as_a_convolutions_and_computes_the_same() -> None:
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2)
    stored = TransposedConv(layer)
    assert stored.weight.shape == (6, 2, 3, 3)
    # output channel o of group g reads input channel i of that group through weight[i, o - g * 3]
    assert torch.equal(stored.weight[4, 1], layer.weight[3, 1])
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(stored(x), layer(x))


def test_open_gates_reproduce_the_original() -> None:
    assert_open_gates_reproduce(filled(Upsampling()), NORM, torch.randn(4, 3, 16, 16))


def test_training_a_second_task_forgets_nothing() -> None:
    assert_a_second_task_forgets_nothing(filled(Upsampling()), NORM, torch.randn(4, 3, 16, 16))


def test_the_wiring_protects_the_weight_by_both_units() -> None:
    model = hatnorm.convert(filled(Upsampling()), num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 16, 16))
    wired = [layer for layer in model.hat_layers() if isinstance(layer.module, TransposedConv)]
    assert len(wired) == 2
    assert all(layer.inp is not None for layer in wired)


class SizedUpsampling(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.kind == "output_size":
            return self.head(self.up(h, output_size=[17, 17]).mean((2, 3)))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.up(h), 1), 1)


@pytest.mark.parametrize(("kind", "message"), [
    ("output_size", r"module 'up' \(ConvTranspose2d\): a transposed convolution is converted when it is called on its "
                    r"input alone \(no output_size\)"),
    ("classifier", r"module 'up' \(ConvTranspose2d\): a transposed convolution gives the model's output"),
])
def test_uses_outside_the_rule_are_refused_naming_the_line(kind: str, message: str) -> None:
    with pytest.raises(hatnorm.ConversionError, match=message) as refused:
        hatnorm.convert(SizedUpsampling(kind), num_tasks=2, example_input=torch.randn(2, 3, 8, 8))
    assert "test_convert_transposed_conv.py:" in str(refused.value)


def test_fg_adahat_reads_its_activation_along_the_channels() -> None:
    """FG-AdaHAT's activation importance reads a transposed convolution's input units along its channels (dim 1),
    as for any convolution: on 12×12 images the layer reads 8 channels of 6×6 maps (read along its last dim they
    would be 6 units, and the importance of the gate before it would not have one value per unit)."""
    model = hatnorm.convert(filled(Upsampling()), num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 12, 12))
    hat = hatnorm.HAT(model, policy=hatnorm.policies.FGAdaHATPolicy(importance="input_weight_abs_sum_x_activation_abs"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(0)
    hat.begin_task(0)
    model.train()
    for b in range(2):
        s = hat.scale(b, 2)
        loss = hat.loss(F.cross_entropy(model(torch.randn(4, 3, 12, 12), task=0, s=s), torch.randint(0, 4, (4,))), s)
        opt.zero_grad()
        loss.backward()
        hat.protect(s)
        hat.step(opt)
    hat.end_task()
    assert all(bool(torch.isfinite(summed).all()) and bool((summed > 0).any()) for summed in hat.policy.summed)

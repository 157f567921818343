"""Attention whose values are a sigmoid's output (iFormer's single-head modulation attention:
``v, gate = sigmoid(v_gate(x)).chunk(2, dim=1)``, v the values of the attention, gate scaling its output): a closed
unit's sigmoid is 0.5, not 0, so a gate goes between the sigmoid's output and the attention, and the attention's output
holds that gate's units. Small models (fused ``F.scaled_dot_product_attention`` and written out, ``v @ attnᵀ``)
convert, reproduce the original with open gates and forget nothing under AdamW; values whose units are unknown (a
product of two sigmoids) are refused naming the line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm
from hatnorm._convert.runtime import GatedNorm
from hatnorm._norm_protocol import NoNorm

DIM = 8


def conv_norm(inp: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, out, 1, bias=False), nn.BatchNorm2d(out))


class SigmoidValues(nn.Module):
    """iFormer's SHMA on a 4×4 map: q and k from 1×1 convolutions, the values and an output gate from one convolution
    and a sigmoid, chunked; ``fused``: ``F.scaled_dot_product_attention`` on heads-last tensors, else the written-out
    ``v @ attn.transpose(-2, -1)`` on channels-first ones; ``misuse``: the values are a product of two sigmoids."""

    def __init__(self, fused: bool = True, misuse: bool = False) -> None:
        super().__init__()
        self.fused, self.misuse = fused, misuse
        self.embed = nn.Sequential(nn.Conv2d(3, DIM, 4, stride=4), nn.BatchNorm2d(DIM))
        self.q, self.k = conv_norm(DIM, DIM // 2), conv_norm(DIM, DIM // 2)
        self.v_gate = conv_norm(DIM, 2 * DIM)
        self.proj = conv_norm(DIM, DIM)
        self.head = nn.Linear(DIM, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, _, h, w = x.shape
        v, gate = torch.sigmoid(self.v_gate(x)).chunk(2, dim=1)
        if self.misuse:
            v = v * torch.sigmoid(x)
        q, k, v = self.q(x).flatten(2), self.k(x).flatten(2), v.flatten(2)
        if self.fused:
            out = F.scaled_dot_product_attention(q.transpose(-1, -2).unsqueeze(1), k.transpose(-1, -2).unsqueeze(1),
                                                 v.transpose(-1, -2).unsqueeze(1))
            out = out.transpose(-1, -2).reshape(b, -1, h, w)
        else:
            attn = ((q * 0.5).transpose(-2, -1) @ k).softmax(dim=-1)
            out = (v @ attn.transpose(-2, -1)).view(b, -1, h, w)
        x = x + self.proj(out * gate)
        return self.head(x.mean((2, 3)))


NORM = {"batch": "masked_bn"}


@pytest.mark.parametrize("fused", [True, False])
def test_open_gates_reproduce_the_original(fused: bool) -> None:
    assert_open_gates_reproduce(filled(SigmoidValues(fused)), NORM, torch.randn(4, 3, 16, 16))


@pytest.mark.parametrize("fused", [True, False])
def test_training_a_second_task_forgets_nothing(fused: bool) -> None:
    assert_a_second_task_forgets_nothing(filled(SigmoidValues(fused)), NORM, torch.randn(4, 3, 16, 16))


@pytest.mark.parametrize("fused", [True, False])
def test_the_values_get_a_gate_of_their_own(fused: bool) -> None:
    model = hatnorm.convert(filled(SigmoidValues(fused)), num_tasks=2, norm=NORM,
                            example_input=torch.randn(2, 3, 16, 16))
    gates = [m for m in model.modules() if isinstance(m, GatedNorm) and isinstance(m.norm, NoNorm)]
    assert [g.gate.num_features for g in gates] == [DIM]


def test_values_of_unknown_units_are_refused_naming_the_line() -> None:
    with pytest.raises(hatnorm.ConversionError, match=r"sigmoid-like activation") as refused:
        hatnorm.convert(SigmoidValues(misuse=True), num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 16, 16))
    assert "test_convert_sigmoid_values.py:" in str(refused.value)

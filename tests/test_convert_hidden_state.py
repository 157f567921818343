"""EfficientViM's hidden-state mixer (HSM-SSD) and its head: the tokens x are weighed into a small hidden state by
gated values, ``h = x @ (a * b)ᵀ`` (a softmax over the tokens of a gated projection plus a parameter, b gated), mixed
along the channels, then spread back over the tokens by gated values, ``y = h @ c``; each product keeps the units of
its left factor, which do not vary along the dim it contracts. The heads' logits are weighed by a softmax of a
parameter and summed: the heads are per task, so are those weights. A small model converts, reproduces the original
with open gates and forgets nothing under AdamW; logits weighed by values computed from the input are refused naming
the line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm
from hatnorm._convert.params import TaskParameter

DIM, STATE = 8, 4


class HiddenState(nn.Module):
    """A 4×4 map of DIM channels through one HSM-SSD mixer (as timm's, with its ``A`` and ``D`` parameters), then two
    heads, on the pooled map and on the pooled hidden state, weighed by ``softmax(weights)``; ``misuse``: weighed by
    a statistic of the input instead."""

    def __init__(self, misuse: bool = False) -> None:
        super().__init__()
        self.misuse = misuse
        self.embed = nn.Sequential(nn.Conv2d(3, DIM, 4, stride=4), nn.BatchNorm2d(DIM))
        self.bcdt = nn.Conv1d(DIM, 3 * STATE, 1, bias=False)
        self.dw = nn.Conv2d(3 * STATE, 3 * STATE, 3, padding=1, groups=3 * STATE)
        self.hz = nn.Conv1d(DIM, 2 * DIM, 1, bias=False)
        self.out = nn.Conv1d(DIM, DIM, 1, bias=False)
        self.A = nn.Parameter(torch.rand(STATE) * 4)
        self.D = nn.Parameter(torch.ones(1))
        self.heads = nn.ModuleList([nn.Linear(DIM, 4), nn.Linear(DIM, 4)])
        self.weights = nn.Parameter(torch.randn(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        batch, _, height, width = x.shape
        t = x.flatten(2)
        bcdt = self.dw(self.bcdt(t).reshape(batch, -1, height, width)).flatten(2)
        b, c, dt = torch.split(bcdt, [STATE, STATE, STATE], dim=1)
        a = (dt + self.A.view(1, -1, 1)).softmax(-1)
        h = t @ (a * b).transpose(-2, -1)
        h, z = torch.split(self.hz(h), [DIM, DIM], dim=1)
        h = self.out(h * F.silu(z) + h * self.D)
        x = x + (h @ c).reshape(batch, -1, height, width)
        features = [x.flatten(2).mean(-1), h.mean(-1)]
        weights = t.mean((1, 2)).sigmoid()[None, :, None].expand(2, -1, 1) if self.misuse else self.weights.softmax(-1)
        return torch.stack([weights[i] * head(features[i]) for i, head in enumerate(self.heads)]).sum(0)


NORM = {"batch": "masked_bn"}


def test_open_gates_reproduce_the_original() -> None:
    assert_open_gates_reproduce(filled(HiddenState()), NORM, torch.randn(4, 3, 16, 16))


def test_training_a_second_task_forgets_nothing() -> None:
    assert_a_second_task_forgets_nothing(filled(HiddenState()), NORM, torch.randn(4, 3, 16, 16))


def test_the_weights_of_the_heads_are_copied_per_task() -> None:
    model = hatnorm.convert(filled(HiddenState()), num_tasks=3, norm=NORM, example_input=torch.randn(2, 3, 16, 16))
    copies = sorted(tuple(m.copies.shape) for m in model.modules() if isinstance(m, TaskParameter))
    assert copies == [(3, 1), (3, 2)]  # D, shared by every unit, and the weights of the heads


def test_logits_weighed_by_values_of_the_input_are_refused_naming_the_line() -> None:
    with pytest.raises(hatnorm.ConversionError, match=r"gives the model's output") as refused:
        hatnorm.convert(HiddenState(misuse=True), num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 16, 16))
    assert "test_convert_hidden_state.py:" in str(refused.value)

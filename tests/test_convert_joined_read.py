"""A layer whose input holds other units at other positions of the dims it does not contract (CvT's attention: the
cls token joined to the tokens of a convolutional projection, ``cat((cls_token, query), 1)``, each with its own gate's
units, then read by one Linear): the weight of feature i meets the unit of feature i at every position, so it is
protected by the join of those units, as a residual add's. A small model converts, reproduces the original with open
gates and forgets nothing under AdamW; a mean over the tokens of such a tensor (it would mix the units) is refused
naming the line."""

from __future__ import annotations

import pytest
import torch
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm
from hatnorm._masks import Residual

DIM, SIDE = 8, 4


class ClsJoined(nn.Module):
    """CvT's self-attention with a cls token: the tokens put back on their map, a depthwise convolution and a
    BatchNorm (the query projection), flattened and joined after the cls token, then a Linear; ``pooled``: the joined
    tensor averaged over the tokens instead."""

    def __init__(self, pooled: bool = False) -> None:
        super().__init__()
        self.pooled = pooled
        self.embed = nn.Conv2d(3, DIM, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM) * 0.1)
        self.norm = nn.LayerNorm(DIM)
        self.conv = nn.Conv2d(DIM, DIM, 3, padding=1, groups=DIM, bias=False)
        self.bn = nn.BatchNorm2d(DIM)
        self.query = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        b, n, _ = t.shape
        t = self.norm(torch.cat((self.cls_token.expand(b, -1, -1), t), dim=1))
        cls_token, tokens = torch.split(t, [1, n], 1)
        grid = tokens.permute(0, 2, 1).reshape(b, DIM, SIDE, SIDE)
        joined = torch.cat((cls_token, self.bn(self.conv(grid)).flatten(2).permute(0, 2, 1)), dim=1)
        if self.pooled:
            return self.head(joined.mean(1))
        return self.head(self.query(joined)[:, 0])


NORM = {"batch": "masked_bn", "layer": "masked_ln"}


def test_open_gates_reproduce_the_original() -> None:
    assert_open_gates_reproduce(filled(ClsJoined()), NORM, torch.randn(4, 3, 16, 16))


def test_training_a_second_task_forgets_nothing() -> None:
    assert_a_second_task_forgets_nothing(filled(ClsJoined()), NORM, torch.randn(4, 3, 16, 16))


def test_the_layer_reads_the_join_of_both_gates() -> None:
    model = hatnorm.convert(filled(ClsJoined()), num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 16, 16))
    joined = [layer.inp for layer in model.hat_layers() if isinstance(layer.inp, Residual)]
    assert len(joined) == 1 and len(joined[0].paths) == 2 and joined[0].num_features == DIM


def test_a_mean_over_the_tokens_of_the_joined_units_is_refused_naming_the_line() -> None:
    with pytest.raises(hatnorm.ConversionError, match=r"it would mix units") as refused:
        hatnorm.convert(ClsJoined(pooled=True), num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 16, 16))
    assert "test_convert_joined_read.py:" in str(refused.value)

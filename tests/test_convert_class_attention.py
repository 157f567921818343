"""CaiT's class attention: ``cls_token.expand(B, -1, -1)`` is read in two places by each class-attention block, joined
to the tokens (``cat((x_cls, x), 1)``, the keys and values) and added to the block's output (the residual). One gate
follows the expanded token, so both read one gated tensor and the parameter is protected once by that gate's units. A
small model converts, reproduces the original with open gates and forgets nothing under AdamW; a class token read
through two separate expansions is refused naming the line."""

from __future__ import annotations

import pytest
import torch
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm
from hatnorm._convert.params import ParameterUse

DIM, HEADS = 8, 2


class ClassAttention(nn.Module):
    """Patch tokens, then a class token that attends to them (its query alone; keys and values from it and the
    tokens), with a residual of its own and an MLP; ``twice``: the residual reads the class token through an expansion
    of its own."""

    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        self.twice = twice
        self.embed = nn.Conv2d(3, DIM, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM) * 0.1)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(DIM), nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.head = nn.Linear(DIM, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, _ = x.shape
        x_cls = self.cls_token.expand(b, -1, -1)
        u = self.norm1(torch.cat((x_cls, x), dim=1))
        q = self.q(u[:, :1]).reshape(b, 1, HEADS, DIM // HEADS).transpose(1, 2)
        k = self.k(u).reshape(b, n + 1, HEADS, DIM // HEADS).transpose(1, 2)
        v = self.v(u).reshape(b, n + 1, HEADS, DIM // HEADS).transpose(1, 2)
        attn = ((q * 0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(b, 1, DIM))
        x_cls = (self.cls_token.expand(b, -1, -1) if self.twice else x_cls) + out
        x_cls = x_cls + self.mlp(self.norm2(x_cls))
        return self.head(self.norm(torch.cat((x_cls, x), dim=1))[:, 0])


NORM = {"layer": "masked_ln"}


def test_open_gates_reproduce_the_original() -> None:
    assert_open_gates_reproduce(filled(ClassAttention()), NORM, torch.randn(4, 3, 16, 16))


def test_training_a_second_task_forgets_nothing() -> None:
    assert_a_second_task_forgets_nothing(filled(ClassAttention()), NORM, torch.randn(4, 3, 16, 16))


def test_the_class_token_is_protected_once_by_the_units_of_its_gate() -> None:
    model = hatnorm.convert(filled(ClassAttention()), num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 16, 16))
    uses = [m for m in model.modules() if isinstance(m, ParameterUse)]
    assert len(uses) == 1 and uses[0].units.flatten().tolist() == list(range(DIM))


def test_a_class_token_expanded_twice_is_refused_naming_the_line() -> None:
    with pytest.raises(hatnorm.ConversionError) as refused:
        hatnorm.convert(ClassAttention(twice=True), num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 16, 16))
    assert "test_convert_class_attention.py:" in str(refused.value)
    assert "self.cls_token.expand(b, -1, -1) if self.twice" in str(refused.value)

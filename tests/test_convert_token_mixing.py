"""Linear layers over the tokens (MLP-Mixer's token MLP, ResMLP's token Linear, gMLP's spatial gating unit): each
output value mixes one unit's values at every token, so the units stay, but the weights are shared by every unit:
each task gets its own copy; a bias makes a closed unit nonzero, so a gate follows it. Small models convert,
reproduce the original with open gates and forget nothing under AdamW; a Linear whose input's units vary along the
dim it reads as well is refused naming the line."""

from __future__ import annotations

import pytest
import torch
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm
from hatnorm._convert.params import TaskParameter

TOKENS = 16  # a 16×16 image cut into 4×4 patches


class Mixer(nn.Module):
    """MLP-Mixer's block: a token MLP (two Linears over the tokens, with biases) added to the stream, then a
    channel MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm1 = nn.LayerNorm(8)
        self.tokens = nn.Sequential(nn.Linear(TOKENS, 12), nn.GELU(), nn.Linear(12, TOKENS))
        self.norm2 = nn.LayerNorm(8)
        self.channels = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.tokens(self.norm1(t).transpose(1, 2)).transpose(1, 2)
        t = t + self.channels(self.norm2(t))
        return self.head(t.mean(1))


class SpatialGating(nn.Module):
    """gMLP's spatial gating unit: half the channels, normalised and mixed over the tokens (with a bias), multiply
    the other half."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(TOKENS, TOKENS)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        u, v = torch.nn.functional.gelu(self.fc1(t)).chunk(2, dim=-1)
        v = self.proj(self.norm(v).transpose(-1, -2))
        return self.head((t + self.fc2(u * v.transpose(-1, -2))).mean(1))


class NoBiasTokens(nn.Module):
    """ResMLP's token mixing without a bias: closed units stay 0, no gate needed."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.tokens = nn.Linear(TOKENS, TOKENS, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        return self.head((t + self.tokens(t.transpose(1, 2)).transpose(1, 2)).mean(1))


MODELS = {"mixer": Mixer, "spatial_gating": SpatialGating, "no_bias_tokens": NoBiasTokens}
NORM = {"layer": "masked_ln"}


@pytest.mark.parametrize("name", list(MODELS))
def test_open_gates_reproduce_the_original(name: str) -> None:
    assert_open_gates_reproduce(filled(MODELS[name]()), NORM, torch.randn(4, 3, 16, 16))


@pytest.mark.parametrize("name", list(MODELS))
def test_training_a_second_task_forgets_nothing(name: str) -> None:
    assert_a_second_task_forgets_nothing(filled(MODELS[name]()), NORM, torch.randn(4, 3, 16, 16))


def test_the_token_layers_are_copied_per_task() -> None:
    model = hatnorm.convert(filled(Mixer()), num_tasks=3, norm=NORM, example_input=torch.randn(2, 3, 16, 16))
    copies = sorted(tuple(m.copies.shape) for m in model.modules() if isinstance(m, TaskParameter))
    assert copies == sorted([(3, 12, TOKENS), (3, 12), (3, TOKENS, 12), (3, TOKENS)])


class Symmetrised(nn.Module):
    """A Linear over the last dim of ``t + tᵀ`` (16 tokens × 16 channels): its input's units vary along both dims."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.tokens = nn.Linear(TOKENS, TOKENS)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2)
        return self.head(self.tokens(t + t.transpose(1, 2)).mean(1))


def test_a_layer_over_tokens_and_units_together_is_refused_naming_the_line() -> None:
    with pytest.raises(hatnorm.ConversionError, match=r"module 'tokens' \(Linear\) reads dim -1, but its input's units "
                                                      r"also vary along other dims") as refused:
        hatnorm.convert(Symmetrised(), num_tasks=2, example_input=torch.randn(2, 3, 16, 16))
    assert "test_convert_token_mixing.py:" in str(refused.value)

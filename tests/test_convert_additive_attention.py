"""SwiftFormer's efficient additive attention: ``query @ w_g`` gives one value per token computed across the query's
features (each entry of ``w_g`` meets one unit, protected by it), normalised over the tokens (timm) or softmaxed
(transformers) it weighs the query into
a global query, which multiplies the keys. A small model converts, reproduces the original with open gates and
forgets nothing under AdamW; the per-token values added to the stream are refused naming the line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm
from hatnorm._convert.params import ParameterUse


class AdditiveAttention(nn.Module):
    def __init__(self, misuse: bool = False, softmax: bool = False) -> None:
        super().__init__()
        self.misuse, self.softmax = misuse, softmax
        self.embed = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.BatchNorm2d(8))
        self.to_query = nn.Linear(8, 8)
        self.to_key = nn.Linear(8, 8)
        self.w_g = nn.Parameter(torch.randn(8, 1))
        self.proj = nn.Linear(8, 8)
        self.final = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).permute(0, 2, 1)
        query = F.normalize(self.to_query(t), dim=-1)
        key = F.normalize(self.to_key(t), dim=-1)
        weights = query @ self.w_g * 8 ** -0.5
        weights = weights.softmax(dim=-1) if self.softmax else F.normalize(weights, dim=1)  # transformers' / timm's
        if self.misuse:
            return self.head((t + weights).mean(1))
        glob = torch.sum(weights * query, dim=1, keepdim=True)
        out = self.final(self.proj(glob * key) + query)
        return self.head((t + out).mean(1))


NORM = {"batch": "masked_bn"}


@pytest.mark.parametrize("softmax", [False, True])
def test_open_gates_reproduce_the_original(softmax: bool) -> None:
    assert_open_gates_reproduce(filled(AdditiveAttention(softmax=softmax)), NORM, torch.randn(4, 3, 16, 16))


@pytest.mark.parametrize("softmax", [False, True])
def test_training_a_second_task_forgets_nothing(softmax: bool) -> None:
    assert_a_second_task_forgets_nothing(filled(AdditiveAttention(softmax=softmax)), NORM, torch.randn(4, 3, 16, 16))


def test_each_entry_of_the_projection_is_protected_by_its_unit() -> None:
    model = hatnorm.convert(filled(AdditiveAttention()), num_tasks=2, norm=NORM,
                            example_input=torch.randn(2, 3, 16, 16))
    uses = [m for m in model.modules() if isinstance(m, ParameterUse)]
    assert len(uses) == 1 and uses[0].units.flatten().tolist() == list(range(8))


def test_the_per_token_values_added_to_the_stream_are_refused_naming_the_line() -> None:
    with pytest.raises(hatnorm.ConversionError, match=r"one value per token computed across the features") as refused:
        hatnorm.convert(AdditiveAttention(misuse=True), num_tasks=2, example_input=torch.randn(2, 3, 16, 16))
    assert "test_convert_additive_attention.py:" in str(refused.value)

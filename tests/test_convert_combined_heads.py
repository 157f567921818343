"""Classifiers combined into the output through ops that keep each class apart (VOLO's token-labelling head: the
class token's logits plus half the most confident patch token's,
``head(x[:, 0]) + 0.5 * aux_head(x[:, 1:]).max(1)[0]``; SwiftFormer's two heads averaged, each a Linear subclass
calling ``F.linear``): both become per-task heads. A small model converts,
reproduces the original with open gates and forgets nothing under AdamW; a combination through an op across the
classes is refused naming the line (the second Linear is then a layer, and the maximum mixes its units)."""

from __future__ import annotations

import pytest
import torch
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm
from hatnorm._convert.runtime import Heads


class TokenLabelling(nn.Module):
    def __init__(self, across_classes: bool = False) -> None:
        super().__init__()
        self.across_classes = across_classes
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)
        self.aux_head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        aux = self.aux_head(t[:, 1:])
        if self.across_classes:
            return self.head(t[:, 0]) + 0.5 * aux.max(-1, keepdim=True)[0].mean(1)
        return self.head(t[:, 0]) + 0.5 * aux.max(1)[0]


class FunctionalLinear(nn.Linear):
    """timm's ``Linear``: a Linear subclass whose forward calls ``F.linear`` on its own parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class AveragedHeads(nn.Module):
    """SwiftFormer's head: a classifier and a distillation classifier, both ``FunctionalLinear``, averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.head = FunctionalLinear(8, 5)
        self.head_dist = FunctionalLinear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(x).flatten(2).transpose(1, 2)).mean(1)
        return (self.head(h) + self.head_dist(h)) / 2


MODELS = {"token_labelling": TokenLabelling, "averaged_functional_heads": AveragedHeads}
NORM = {"layer": "masked_ln"}


@pytest.mark.parametrize("name", list(MODELS))
def test_open_gates_reproduce_the_original(name: str) -> None:
    assert_open_gates_reproduce(filled(MODELS[name]()), NORM, torch.randn(4, 3, 16, 16))


@pytest.mark.parametrize("name", list(MODELS))
def test_training_a_second_task_forgets_nothing(name: str) -> None:
    assert_a_second_task_forgets_nothing(filled(MODELS[name]()), NORM, torch.randn(4, 3, 16, 16))


@pytest.mark.parametrize("name", list(MODELS))
def test_both_classifiers_become_heads(name: str) -> None:
    model = hatnorm.convert(filled(MODELS[name]()), num_tasks=2, norm=NORM, num_classes=[3, 4],
                            example_input=torch.randn(2, 3, 16, 16))
    assert sum(isinstance(m, Heads) for m in model.modules()) == 2
    assert model(torch.randn(2, 3, 16, 16), task=1).shape == (2, 4)


def test_a_combination_across_the_classes_is_refused_naming_the_line() -> None:
    with pytest.raises(hatnorm.ConversionError, match=r"operation max: only a mean over dims the units do not vary "
                                                      r"in") as refused:
        hatnorm.convert(TokenLabelling(across_classes=True), num_tasks=2, norm=NORM,
                        example_input=torch.randn(2, 3, 16, 16))
    assert "test_convert_combined_heads.py:" in str(refused.value)

"""What the output does not read is not converted (transformers' ``SiglipForImageClassification``: the vision model's
attention-pooling head, cross-attention from a learned probe, beside the mean of the tokens its classifier reads). A
small model with such a head converts, reproduces the original with open gates and forgets nothing under AdamW, the
head's parameters gone; the same head read by the classifier is refused naming the line."""

from __future__ import annotations

import pytest
import torch
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm

DIM = 8


class ProbePooling(nn.Module):
    """Patch tokens through a self-attention block; an attention-pooling head (a learned probe as the query of
    ``nn.MultiheadAttention`` over the tokens) whose output the classifier reads only when ``pooled``, else the mean of
    the tokens (SigLIP's classifier)."""

    def __init__(self, pooled: bool = False) -> None:
        super().__init__()
        self.pooled = pooled
        self.embed = nn.Conv2d(3, DIM, 4, stride=4)
        self.norm = nn.LayerNorm(DIM)
        self.attention = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.probe = nn.Parameter(torch.randn(1, 1, DIM))
        self.pool = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.classifier = nn.Linear(DIM, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        t = t + self.attention(t, t, t)[0]
        head = self.pool(self.probe.repeat(t.shape[0], 1, 1), t, t)[0][:, 0]
        return self.classifier(head if self.pooled else t.mean(1))


NORM = {"layer": "masked_ln"}


def test_open_gates_reproduce_the_original() -> None:
    assert_open_gates_reproduce(filled(ProbePooling()), NORM, torch.randn(4, 3, 16, 16))


def test_training_a_second_task_forgets_nothing() -> None:
    assert_a_second_task_forgets_nothing(filled(ProbePooling()), NORM, torch.randn(4, 3, 16, 16))


def test_the_unread_head_is_left_out() -> None:
    model = hatnorm.convert(filled(ProbePooling()), num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 16, 16))
    names = [name for name, _ in model.named_parameters()]
    assert names and not any("probe" in name or "pool." in name for name in names)


def test_the_head_read_by_the_classifier_is_refused_naming_the_line() -> None:
    with pytest.raises(hatnorm.ConversionError, match=r"only self-attention") as refused:
        hatnorm.convert(ProbePooling(pooled=True), num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 16, 16))
    assert "test_convert_dead_branch.py:" in str(refused.value)

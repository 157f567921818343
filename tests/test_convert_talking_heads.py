"""Talking-heads attention (CaiT, EfficientFormerV2): the scores of the heads mixed by a layer over the heads dim
before and after the softmax, a Linear on the scores permuted heads-last (CaiT's ``proj_l``/``proj_w``) or a 1×1
convolution over dim 1 (EfficientFormerV2's ``talking_head1``/``talking_head2``, after a position bias). The mixing
layers hold no unit, so each task gets its own copy of them. Small models convert, reproduce the original with open
gates and forget nothing under AdamW; mixed scores read by anything but the product with the values are refused
naming the line."""

from __future__ import annotations

import pytest
import torch
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm
from hatnorm._convert.params import TaskParameter

HEADS, DIM, TOKENS = 3, 12, 16  # a 16×16 image cut into 4×4 patches


class TalkingHeads(nn.Module):
    """Attention whose scores are mixed across the heads before and after the softmax: ``kind`` ``"linear"`` as
    CaiT (``proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)``), ``"conv"`` as EfficientFormerV2 (a position
    bias gathered by an index, then ``Conv2d(heads, heads, 1)`` on ``[B, heads, N, N]``); ``misuse`` adds the mixed
    scores' mean over the keys to the values."""

    def __init__(self, kind: str = "linear", misuse: bool = False) -> None:
        super().__init__()
        self.kind, self.misuse = kind, misuse
        self.embed = nn.Sequential(nn.Conv2d(3, DIM, 4, stride=4), nn.BatchNorm2d(DIM))
        self.norm = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        if kind == "conv":
            self.mix_before, self.mix_after = nn.Conv2d(HEADS, HEADS, 1), nn.Conv2d(HEADS, HEADS, 1)
            self.position_bias = nn.Parameter(torch.randn(HEADS, TOKENS) * 0.1)
            self.register_buffer("index", torch.randint(0, TOKENS, (TOKENS, TOKENS)), persistent=False)
        else:
            self.mix_before, self.mix_after = nn.Linear(HEADS, HEADS), nn.Linear(HEADS, HEADS)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 4)

    def mix(self, layer: nn.Module, attn: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return layer(attn)
        return layer(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        b, n, _ = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        attn = (q * 0.5) @ k.transpose(-2, -1)
        if self.kind == "conv":
            attn = attn + self.position_bias[:, self.index]
        attn = self.mix(self.mix_before, attn).softmax(dim=-1)
        attn = self.mix(self.mix_after, attn)
        if self.misuse:
            v = v + attn.mean(-1, keepdim=True)
        out = (attn @ v).transpose(1, 2).reshape(b, n, DIM)
        return self.head((t + self.proj(out)).mean(1))


NORM = {"batch": "masked_bn", "layer": "masked_ln"}
KINDS = ["linear", "conv"]


@pytest.mark.parametrize("kind", KINDS)
def test_open_gates_reproduce_the_original(kind: str) -> None:
    assert_open_gates_reproduce(filled(TalkingHeads(kind)), NORM, torch.randn(4, 3, 16, 16))


@pytest.mark.parametrize("kind", KINDS)
def test_training_a_second_task_forgets_nothing(kind: str) -> None:
    assert_a_second_task_forgets_nothing(filled(TalkingHeads(kind)), NORM, torch.randn(4, 3, 16, 16))


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_of_the_mixing_layers_is_copied_per_task(kind: str) -> None:
    original = filled(TalkingHeads(kind))
    model = hatnorm.convert(original, num_tasks=3, norm=NORM, example_input=torch.randn(2, 3, 16, 16))
    copies = sorted(tuple(m.copies.shape) for m in model.modules() if isinstance(m, TaskParameter))
    mixing = [*original.mix_before.parameters(), *original.mix_after.parameters()]
    if kind == "conv":
        mixing.append(original.position_bias)
    assert copies == sorted((3, *p.shape) for p in mixing)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_scores_read_by_anything_but_the_values_product_are_refused_naming_the_line(kind: str) -> None:
    with pytest.raises(hatnorm.ConversionError, match=r"attention scores may only be") as refused:
        hatnorm.convert(TalkingHeads(kind, misuse=True), num_tasks=2, norm=NORM,
                        example_input=torch.randn(2, 3, 16, 16))
    assert "test_convert_talking_heads.py:" in str(refused.value) and "attn.mean(-1" in str(refused.value)

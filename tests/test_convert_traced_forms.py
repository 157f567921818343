"""Forms of Python the example trace follows: an item assignment (``x[i] = v``: MViTv2 writes a position bias into
part of its attention scores, ConViT fills its position indices column by column), torch's factories and a buffer's
``expand`` called with traced sizes (Gemma 4's ``torch.ones(b, n)``), and ``torch.autocast(device_type=
x.device.type)`` (EfficientViT's attention), a buffer replaced by the forward (ConViT), ``torch.finfo`` of a traced
dtype and a module made in the forward (ImageGPT). Each small model converts, reproduces the original with open gates
and forgets nothing under AdamW; an item assignment into gated units is refused naming its line."""

from __future__ import annotations

import pytest
import torch
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm

NORM = {"layer": "masked_ln", "batch": "masked_bn"}


class ScoresWrittenInPlace(nn.Module):
    """Attention whose scores past a class token get a relative position bias written into them in place (MViTv2's
    ``attn[:, :, 1:, 1:] = attn[:, :, 1:, 1:] + bias``), the bias indices filled column by column, a mask of ones
    made from traced sizes and a frequency buffer expanded to the batch (Gemma 4), inside an autocast region named
    by the input's device type (EfficientViT); the indices cached in a buffer the forward replaces (ConViT), a
    ``torch.finfo`` of the scores' dtype and a softmax module made in the forward (ImageGPT)."""

    def __init__(self, dim: int = 8, tokens: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rel = nn.Parameter(torch.randn(2 * tokens - 1) * 0.1)
        self.register_buffer("frequencies", torch.linspace(0.5, 1.5, dim))
        self.register_buffer("index", torch.zeros(1, 1, dtype=torch.long), persistent=False)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 4)

    @staticmethod
    def relative_index(n: int) -> torch.Tensor:
        """Each pair of tokens' offset, filled column by column."""
        index = torch.zeros(n, n, dtype=torch.long)
        index[:, :] = torch.arange(n).view(-1, 1) - torch.arange(n).view(1, -1) + n - 1
        return index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        b, n, c = t.shape
        cls = t.mean(1, keepdim=True)
        t = torch.cat([cls, t], dim=1)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = (q @ k.transpose(-2, -1)) * c ** -0.5
        if self.index.shape[0] != n:  # ConViT's cached indices, replaced at another size
            self.index = self.relative_index(n)
        scores[:, 1:, 1:] = scores[:, 1:, 1:] + self.rel[self.index]
        keep = torch.ones(b, n + 1, dtype=torch.bool)
        scores = scores.masked_fill(~keep[:, None, :], torch.finfo(scores.dtype).min)
        h = self.proj(nn.Softmax(dim=-1)(scores) @ v)  # ImageGPT's softmax module made in the forward
        h = h * self.frequencies[None, None, :].expand(b, -1, -1).mean()
        return self.head(h[:, 0])


class GatedItemWritten(nn.Module):
    """A convolution's first channel overwritten in place: the written channel would hold a value whatever its gate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        b = h.shape[0]
        h[:, 0] = torch.ones(b, h.shape[2], h.shape[3])
        return self.head(h.mean((2, 3)))


def test_scores_written_in_place_convert_reproduce_and_forget_nothing() -> None:
    torch.manual_seed(0)
    original = filled(ScoresWrittenInPlace())
    x = torch.randn(2, 3, 8, 8)
    assert_open_gates_reproduce(original, NORM, x)
    assert_a_second_task_forgets_nothing(original, NORM, x)


def test_an_item_assignment_into_gated_units_is_refused_naming_its_line() -> None:
    with pytest.raises(hatnorm.ConversionError,
                       match=r"test_convert_traced_forms\.py:\d+ `h\[:, 0\] = torch\.ones\(b, h\.shape\[2\], "
                             r"h\.shape\[3\]\)`: operation setitem_: an item assignment \(x\[i\] = v\) is converted "
                             r"into data or attention scores only"):
        hatnorm.convert(GatedItemWritten().eval(), num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 8, 8))

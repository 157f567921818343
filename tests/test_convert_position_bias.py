"""Position biases computed from parameters alone (Swin v2's continuous position bias MLP over a buffer of log-spaced
coordinates, gathered by a relative position index; Swin v2-CR's meta MLP; timm's relative position MLP; SAM's
decomposed relative position logits, q summed over its features with a table gathered by coordinates): no unit of a
gate holds them, so they may bias attention scores only, and each task gets its own copy of every parameter they
come from. Small models convert, reproduce the original with open gates and forget nothing under AdamW; such values
read anywhere else are refused naming the line."""

from __future__ import annotations

import pytest
import torch
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm
from hatnorm._convert.params import TaskParameter

WINDOW = 4  # tokens per side: a 16×16 image cut into 4×4 patches


def coordinates() -> tuple[torch.Tensor, torch.Tensor]:
    """Swin v2's log-spaced relative coordinates ``[2W-1, 2W-1, 2]`` and the index of each query-key pair in them."""
    side = torch.arange(-(WINDOW - 1), WINDOW, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(side, side, indexing="ij"), -1)
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / 3
    grid = torch.stack(torch.meshgrid(torch.arange(WINDOW), torch.arange(WINDOW), indexing="ij")).flatten(1)
    relative = (grid[:, :, None] - grid[:, None, :]).permute(1, 2, 0) + WINDOW - 1
    return table, relative[..., 0] * (2 * WINDOW - 1) + relative[..., 1]


class BiasedAttention(nn.Module):
    """Two-head attention over 16 tokens with a position bias from an MLP over fixed coordinates, chosen by
    ``kind``: Swin v2's (gathered by an index, ``16 * sigmoid``), or Swin v2-CR's (the MLP's output reshaped, with a
    dropout and a LayerNorm-free MLP of two layers)."""

    def __init__(self, kind: str = "swin_v2") -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        if kind == "swin_v2":
            self.mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(inplace=True), nn.Linear(16, 2, bias=False))
        else:
            self.mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
        table, index = coordinates()
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("index", index, persistent=False)
        grid = torch.stack(torch.meshgrid(torch.arange(WINDOW), torch.arange(WINDOW), indexing="ij")).flatten(1)
        pairs = (grid[:, :, None] - grid[:, None, :]).permute(1, 2, 0).reshape(-1, 2).float()
        self.register_buffer("pairs", torch.sign(pairs) * torch.log1p(pairs.abs()), persistent=False)
        self.head = nn.Linear(8, 4)

    def bias(self) -> torch.Tensor:
        n = WINDOW * WINDOW
        if self.kind == "swin_v2":
            table = self.mlp(self.table).view(-1, 2)
            bias = table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
            return 16 * torch.sigmoid(bias).unsqueeze(0)
        return self.mlp(self.pairs).transpose(1, 0).reshape(2, n, n).unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        b, n, _ = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * 0.5 + self.bias()
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, 8)
        return self.head((t + self.proj(out)).mean(1))


class DecomposedRelativePositions(nn.Module):
    """SAM's attention: heads folded into the batch, relative position logits ``einsum("bhwc,hkc->bhwk", q, Rh)`` (and
    along the width) for ``Rh`` gathered from a parameter by relative coordinates, added to the scores as the mask
    of ``F.scaled_dot_product_attention`` (``fused``) or written out."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.rel_pos_h = nn.Parameter(torch.randn(2 * WINDOW - 1, 4) * 0.1)
        self.rel_pos_w = nn.Parameter(torch.randn(2 * WINDOW - 1, 4) * 0.1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        b, n, _ = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).reshape(3, b * 2, n, 4).unbind(0)
        coords = torch.arange(WINDOW)[:, None] - torch.arange(WINDOW)[None, :] + WINDOW - 1
        r_q = q.reshape(b * 2, WINDOW, WINDOW, 4)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, self.rel_pos_h[coords])
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, self.rel_pos_w[coords])
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(-1, n, n)
        if self.fused:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            out = ((q @ k.transpose(-2, -1)) * 0.5 + bias).softmax(-1) @ v
        out = out.view(b, 2, n, 4).transpose(1, 2).reshape(b, n, 8)
        return self.head((t + self.proj(out)).mean(1))


MODELS = {"swin_v2": lambda: BiasedAttention("swin_v2"), "swin_v2_cr": lambda: BiasedAttention("swin_v2_cr"),
          "sam_fused": lambda: DecomposedRelativePositions(fused=True),
          "sam_written_out": lambda: DecomposedRelativePositions(fused=False)}
NORM = {"layer": "masked_ln"}
KINDS = ["swin_v2", "swin_v2_cr"]


@pytest.mark.parametrize("name", list(MODELS))
def test_open_gates_reproduce_the_original(name: str) -> None:
    assert_open_gates_reproduce(filled(MODELS[name]()), NORM, torch.randn(4, 3, 16, 16))


@pytest.mark.parametrize("name", list(MODELS))
def test_training_a_second_task_forgets_nothing(name: str) -> None:
    assert_a_second_task_forgets_nothing(filled(MODELS[name]()), NORM, torch.randn(4, 3, 16, 16))


def test_the_relative_position_tables_are_copied_per_task() -> None:
    model = hatnorm.convert(filled(DecomposedRelativePositions(fused=True)), num_tasks=3, norm=NORM,
                            example_input=torch.randn(2, 3, 16, 16))
    copies = [tuple(m.copies.shape) for m in model.modules() if isinstance(m, TaskParameter)]
    assert copies == [(3, 2 * WINDOW - 1, 4)] * 2


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_of_the_bias_is_copied_per_task(kind: str) -> None:
    model = hatnorm.convert(filled(BiasedAttention(kind)), num_tasks=3, norm=NORM,
                            example_input=torch.randn(2, 3, 16, 16))
    copies = [m for m in model.modules() if isinstance(m, TaskParameter)]
    layers = [m for m in BiasedAttention(kind).mlp if isinstance(m, nn.Linear)]
    expected = sorted([tuple(p.shape) for layer in layers for p in layer.parameters()])
    assert sorted(tuple(c.copies.shape[1:]) for c in copies) == expected
    assert all(c.copies.shape[0] == 3 for c in copies)


class StreamBias(nn.Module):
    """An MLP over fixed coordinates added to the tokens: shared by every unit of the stream, which no gate
    protects."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8))
        self.register_buffer("coords", torch.randn(16, 2))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head((t + self.mlp(self.coords)).mean(1))


def test_values_from_parameters_alone_added_to_the_stream_are_refused_naming_the_line() -> None:
    with pytest.raises(hatnorm.ConversionError, match=r"values computed from parameters that every unit shares") as \
            refused:
        hatnorm.convert(StreamBias(), num_tasks=2, example_input=torch.randn(2, 3, 16, 16))
    assert "test_convert_position_bias.py:" in str(refused.value)

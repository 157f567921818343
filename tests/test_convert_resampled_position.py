"""Position embeddings resampled to the token grid (``F.interpolate`` of a parameter, then added to the tokens: SAM 2's
Hiera with its tiled window embedding, NaFlexViT's separate row and column tables, PVT's embedding after its class
token): each resampled value mixes several of the parameter's entries, so every task gets its own copy of the
parameter, and a gate follows where the values join the stream. Small models convert, reproduce the original with
open gates and forget nothing under AdamW; resampled values added to raw input data are refused naming the line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm
from hatnorm._convert.params import ParameterUse, TaskParameter

NORM = {"layer": "masked_ln"}


class Hiera(nn.Module):
    """SAM 2's Hiera stem: a ``[1, C, 3, 3]`` embedding resized bicubically to the ``[H, W]`` grid plus a window
    embedding tiled over it, moved channels-last and added to the patch tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.pos_embed = nn.Parameter(torch.randn(1, 8, 3, 3))
        self.pos_embed_window = nn.Parameter(torch.randn(1, 8, 2, 2))
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).permute(0, 2, 3, 1)
        h, w = t.shape[1:3]
        pos = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")
        pos = pos + self.pos_embed_window.tile((h // 2, w // 2))
        t = self.norm(t + pos.permute(0, 2, 3, 1))
        return self.head(F.gelu(self.fc(t)).mean((1, 2)))


class RowsAndColumns(nn.Module):
    """NaFlexViT's factorised embedding: a row table and a column table ``[1, 6, C]``, each resized linearly along its
    length (moved to ``[1, C, 6]``, cast to float32 and back), summed by broadcasting into ``[1, H, W, C]`` and added to
    the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.pos_y = nn.Parameter(torch.randn(1, 6, 8))
        self.pos_x = nn.Parameter(torch.randn(1, 6, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        h, w = x.shape[2] // 4, x.shape[3] // 4
        y = F.interpolate(self.pos_y.permute(0, 2, 1).float(), size=h, mode="linear").permute(0, 2, 1)
        x_ = F.interpolate(self.pos_x.permute(0, 2, 1).float(), size=w, mode="linear").permute(0, 2, 1).to(t.dtype)
        pos = (y[:, :, None, :] + x_[:, None, :, :]).flatten(1, 2)
        return self.head(self.norm(t + pos).mean(1))


class ClassTokenFirst(nn.Module):
    """PVT's embedding: the class token's entry kept, the patches' entries resized bilinearly from a ``3 × 3`` grid by
    ``nn.Upsample`` and concatenated after it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.position = nn.Parameter(torch.randn(1, 10, 8))
        self.up = nn.Upsample(size=(4, 4), mode="bilinear")
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat((self.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
        grid = self.position[:, 1:].reshape(1, 3, 3, 8).permute(0, 3, 1, 2)
        patches = self.up(grid).flatten(2).transpose(1, 2)
        t = self.norm(t + torch.cat((self.position[:, :1], patches), dim=1))
        return self.head(t[:, 0])


MODELS = {"hiera": Hiera, "rows_and_columns": RowsAndColumns, "class_token_first": ClassTokenFirst}


@pytest.mark.parametrize("name", MODELS)
def test_resampled_position_embedding_converts_and_reproduces(name: str) -> None:
    torch.manual_seed(0)
    assert_open_gates_reproduce(filled(MODELS[name]()), NORM, torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("name", MODELS)
def test_resampled_position_embedding_forgets_nothing(name: str) -> None:
    torch.manual_seed(0)
    assert_a_second_task_forgets_nothing(filled(MODELS[name]()), NORM, torch.randn(2, 3, 16, 16))


def test_a_resampled_embedding_gets_a_copy_per_task_and_a_tiled_one_its_units() -> None:
    torch.manual_seed(0)
    converted = hatnorm.convert(Hiera(), num_tasks=3, norm=NORM, example_input=torch.randn(2, 3, 16, 16))
    copies = [m for m in converted.modules() if isinstance(m, TaskParameter)]
    assert [tuple(m.copies.shape) for m in copies] == [(3, 1, 8, 3, 3)]
    uses = [m for m in converted.modules() if isinstance(m, ParameterUse)]
    assert [tuple(m.parameter.shape) for m in uses] == [(1, 8, 2, 2)]
    assert uses[0].units.tolist() == [[[[c] * 2] * 2 for c in range(8)]]  # each entry meets its own channel


class OnRawData(nn.Module):
    """A resized position embedding added to the input image itself, before any layer: no gate follows raw data."""

    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 3, 4, 4))
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + F.interpolate(self.pos_embed, size=x.shape[-2:], mode="bilinear")
        return self.head(self.embed(x).mean((2, 3)))


def test_resampled_values_added_to_raw_data_are_refused_naming_the_line() -> None:
    with pytest.raises(hatnorm.ConversionError, match=r"test_convert_resampled_position\.py:\d+ .*x \+ F\.interpolate"):
        hatnorm.convert(OnRawData(), num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 16, 16))

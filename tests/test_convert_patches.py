"""Maps cut into patches and put back: ``nn.Unfold``/``F.unfold`` (TNT's pixel embedding, VOLO's outlook attention)
move each channel's unit into the block of channels it becomes (TNT's pixels, a position parameter added, then read
by two paths: one gate follows them before either); ``F.fold`` (VOLO) sums the patch values landing on
each position, which keeps the units where they all belong to one unit; weights made from gated units (a softmax of a
layer's output) times gated units keep those units. Small models convert, reproduce the original with open gates
and forget nothing under AdamW; a fold that sums several units is refused naming the line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm


class PixelPatches(nn.Module):
    """TNT's legacy pixel embedding: a convolution, its map cut into 2×2 patches (with zero padding), the patch
    values (channel c at kernel position j in channel c·4 + j) read by a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.unfold = nn.Unfold(kernel_size=2, stride=2, padding=1)
        self.linear = nn.Linear(24, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.unfold(self.proj(x)).transpose(1, 2)
        return self.head(self.norm(self.linear(patches)).mean(1))


class Outlook(nn.Module):
    """VOLO's outlook attention: values unfolded into 3×3 neighbourhoods, weights a softmax of a Linear of the
    tokens, the weighted neighbourhoods folded back (overlapping windows summed)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.v = nn.Linear(8, 8, bias=False)
        self.attn = nn.Linear(8, 2 * 9 * 9)
        self.proj = nn.Linear(8, 8)
        self.unfold = nn.Unfold(kernel_size=3, padding=1, stride=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(x).permute(0, 2, 3, 1))  # B, H, W, C
        b, height, width, c = h.shape
        v = self.v(h).permute(0, 3, 1, 2)
        v = self.unfold(v).reshape(b, 2, c // 2, 9, height * width).permute(0, 1, 4, 3, 2)
        attn = self.attn(h).reshape(b, height * width, 2, 9, 9).permute(0, 2, 1, 3, 4)
        attn = (attn * 8 ** -0.5).softmax(dim=-1)
        out = (attn @ v).permute(0, 1, 4, 3, 2).reshape(b, c * 9, height * width)
        out = F.fold(out, output_size=(height, width), kernel_size=3, padding=1, stride=1)
        h = h + self.proj(out.permute(0, 2, 3, 1))
        return self.head(h.mean((1, 2)))


class PixelAndPatchPaths(nn.Module):
    """TNT's two paths: pixels of each patch, with a position parameter added, read as they are by the inner
    (pixel) block and reshaped into one vector per patch by the outer (patch) path."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 3, padding=1)
        self.unfold = nn.Unfold(kernel_size=4, stride=4)
        self.pixel_pos = nn.Parameter(torch.randn(1, 4, 4, 4) * 0.1)
        self.norm_in = nn.LayerNorm(4)
        self.inner = nn.Linear(4, 4)
        self.norm_patch = nn.LayerNorm(64)
        self.outer = nn.Linear(64, 8)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        pixels = self.unfold(self.proj(x)).transpose(1, 2).reshape(b * 16, 4, 4, 4) + self.pixel_pos
        pixels = pixels.reshape(b * 16, 4, -1).transpose(1, 2)  # [B·patches, pixels, C]
        patches = self.outer(self.norm_patch(pixels.reshape(b, 16, -1)))
        pixels = pixels + self.inner(self.norm_in(pixels))
        return self.head(torch.cat([pixels.mean(1).view(b, 16, 4).mean(1), patches.mean(1)], dim=-1))


MODELS = {"pixel_patches": PixelPatches, "outlook": Outlook, "pixel_and_patch_paths": PixelAndPatchPaths}
NORM = {"batch": "masked_bn", "layer": "masked_ln"}


@pytest.mark.parametrize("name", list(MODELS))
def test_open_gates_reproduce_the_original(name: str) -> None:
    assert_open_gates_reproduce(filled(MODELS[name]()), NORM, torch.randn(4, 3, 16, 16))


@pytest.mark.parametrize("name", list(MODELS))
def test_training_a_second_task_forgets_nothing(name: str) -> None:
    assert_a_second_task_forgets_nothing(filled(MODELS[name]()), NORM, torch.randn(4, 3, 16, 16))


def test_unfolded_channels_hold_the_unit_of_the_channel_they_come_from() -> None:
    model = hatnorm.convert(filled(PixelPatches()), num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 16, 16))
    linear = next(layer for layer in model.hat_layers() if getattr(layer.module, "in_features", None) == 24)
    gate = next(layer.out for layer in model.hat_layers() if layer.out.num_features == 6)
    # channel c of the convolution becomes the unfolded features 4c..4c+3
    assert isinstance(linear.inp, hatnorm.blocks.Select) and linear.inp.source is gate
    assert linear.inp.index.tolist() == torch.arange(6).repeat_interleave(4).tolist()


class MixingFold(nn.Module):
    """A fold of a convolution's 8 channels as 2 channels × 2×2 patches: an output position sums values of four
    different units."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), nn.BatchNorm2d(8))
        self.head = nn.Linear(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        folded = F.fold(h.flatten(2), output_size=(5, 5), kernel_size=2)  # 4×4 positions of 2×2 patches
        return self.head(folded.mean((2, 3)))


def test_a_fold_that_sums_several_units_is_refused_naming_the_line() -> None:
    with pytest.raises(hatnorm.ConversionError, match=r"operation fold: folds patches so that one output position "
                                                      r"sums values of several units") as refused:
        hatnorm.convert(MixingFold(), num_tasks=2, example_input=torch.randn(2, 3, 8, 8))
    assert "test_convert_patches.py:" in str(refused.value)

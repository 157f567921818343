"""Every model ``convert`` cannot take is refused with a ``ConversionError`` that names the module and the source
line where it stops; nothing fails inside the conversion with another error."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import hatnorm

#: ``file.py:123 `code```: a source line as conversion messages show it
LINE = re.compile(r"\w+\.py:\d+ `[^`]+`")


class Cumulative(nn.Module):
    """Mixes channels along dim 1 (no rule follows units through a cumulative sum)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.cumsum(1)


class RunningSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.mix = Cumulative()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.conv(x)).mean((2, 3)))


class CrossCovariance(nn.Module):
    """XCiT's and EdgeNeXt's cross-covariance attention: q and k transposed, so the scores are channels × channels
    and the product with v mixes the units (a closed unit's row of scores is uniform, so its output is not 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 4, 1)  # [N, heads, channels, tokens]
        scores = (torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(
            -2, -1)).softmax(-1)
        return (scores @ v).permute(0, 3, 1, 2).flatten(2)


class ChannelAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.xca = CrossCovariance()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.xca(x).mean(1))


class SoftplusBlock(nn.Module):
    """A module that no rule covers (softplus(0) ≠ 0), called from the model's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.act = nn.Softplus()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x))
        return self.head(h.mean((2, 3)))


def timm_model(name: str, **options) -> nn.Module:
    return pytest.importorskip("timm").create_model(name, pretrained=False, **options)


#: name → (the model, its input size, the module the message must name)
MODELS = {
    "running_sum": (RunningSum, 16, "mix"),
    "channel_attention": (ChannelAttention, None, "xca"),
    "softplus": (SoftplusBlock, 16, "act"),
    "timm_sequencer": (lambda: timm_model("sequencer2d_s", num_classes=4, img_size=32, layers=(1, 1, 1, 1),
                                          embed_dims=(8, 8, 8, 8), hidden_sizes=(4, 4, 4, 4)), 32, "rnn_v"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_an_unconvertible_model_is_refused_naming_its_module_and_source_line(name: str) -> None:
    build, size, module = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    example = torch.randn(2, 5, 8) if size is None else torch.randn(2, 3, size, size)
    with pytest.raises(hatnorm.ConversionError) as refused:
        hatnorm.convert(model, num_tasks=2, norm={"batch": "masked_bn", "layer": "masked_ln"}, example_input=example)
    message = str(refused.value)
    assert LINE.search(message), f"no source line in: {message}"
    assert re.search(rf"module '[\w.]*{module}'", message), f"module {module!r} not named in: {message}"

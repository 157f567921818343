"""Functional norms over the units written in forms other than on a torch norm module's own parameters: a LayerNorm
subclass without affine calling ``F.layer_norm(x, shape, None, None, eps)`` itself (Qwen3-ViT's classifier norm), an
RMS norm in float32 with its weight cast (DeepSeek-ViT's ``RmsNormFp32``), a group norm on a plain module's γ and β.
Each call is the torch norm it computes, replaced by the task-aware norm: small models convert, reproduce the original
with open gates and forget nothing under AdamW; an affine computed from a parameter (a weight scaled in the forward) or
a norm over two dims is refused naming the line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce
from torch import nn

import hatnorm
from hatnorm._convert.runtime import GatedNorm

NORM = {"layer": "masked_ln", "rms": "masked_rms", "group": "masked_gn"}


class PlainLayerNorm(nn.LayerNorm):
    """timm's ``LayerNorm``: a torch LayerNorm subclass whose forward calls ``F.layer_norm`` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class RmsNormFp32(nn.Module):
    """timm's ``RmsNormFp32``: ``rms_norm`` computed in float32, its weight cast too, the result cast back."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.normalized_shape, self.eps = (features,), 1e-6
        self.weight = nn.Parameter(torch.empty(features).uniform_(0.8, 1.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)


class Affine(nn.Module):
    """A plain module with a per-channel γ and β, normalising by ``F.group_norm`` over 2 groups."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(channels).uniform_(0.8, 1.2))
        self.beta = nn.Parameter(torch.empty(channels).normal_(0, 0.05))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, 2, self.gamma, self.beta, 1e-5)


class Classifier(nn.Module):
    """Patches → a group norm on a plain module's affine → tokens → blocks with float32 RMS norms → mean → a LayerNorm
    without affine (Qwen3-ViT's) → head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.affine = Affine(8)
        self.norm1 = RmsNormFp32(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.norm = PlainLayerNorm(8, eps=1e-6, elementwise_affine=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.affine(self.embed(x)).flatten(2).transpose(1, 2)
        t = t + self.fc2(F.gelu(self.fc1(self.norm1(t))))
        return self.head(self.norm(t.mean(1)))


def test_functional_norms_convert_and_reproduce() -> None:
    torch.manual_seed(0)
    assert_open_gates_reproduce(Classifier().eval(), NORM, torch.randn(2, 3, 16, 16))


def test_functional_norms_forget_nothing() -> None:
    torch.manual_seed(0)
    assert_a_second_task_forgets_nothing(Classifier().eval(), NORM, torch.randn(2, 3, 16, 16))


def test_each_functional_norm_becomes_the_task_aware_norm_of_its_kind_with_its_affine() -> None:
    torch.manual_seed(0)
    original = Classifier().eval()
    converted = hatnorm.convert(original, num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 16, 16))
    norms = [m.norm for m in converted.modules() if isinstance(m, GatedNorm) and type(m.norm).__name__ != "NoNorm"]
    assert {type(n) for n in norms} == {hatnorm.get_norm(name).norm_class for name in NORM.values()}
    assert len(norms) == 3
    affine = [v for n in norms for k, v in n.state_dict().items() if k.endswith(("weight", "bias"))]
    for parameter in (original.norm1.weight, original.affine.gamma, original.affine.beta):
        assert any(torch.equal(v.reshape(-1, 8)[-1], parameter.detach()) for v in affine)  # in every task's slot
    names = {n for n, _ in converted.named_parameters()}
    assert not any(n.endswith(("norm1.weight", "affine.gamma", "affine.beta")) for n in names)


class ComputedWeight(nn.Module):
    """An RMS norm whose weight is computed in the forward, ``2 * weight``: not one parameter entry per unit."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), 2 * self.weight, 1e-6)


class OverTwoDims(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-2:], None, None, 1e-6)


@pytest.mark.parametrize(("norm", "match"), [
    (ComputedWeight, r"functional_norm_forms\.py:\d+ `return F\.rms_norm.*its weight is a parameter of the model"),
    (OverTwoDims, r"functional_norm_forms\.py:\d+ `return F\.layer_norm.*over 2 dims"),
])
def test_other_functional_norms_are_refused_naming_the_line(norm: type[nn.Module], match: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(2), norm(4) if norm is ComputedWeight else norm(),
                          nn.Flatten(1), nn.Linear(32, 4))
    with pytest.raises(hatnorm.ConversionError, match=match):
        hatnorm.convert(model, num_tasks=2, norm=NORM, example_input=torch.randn(2, 3, 8, 8))

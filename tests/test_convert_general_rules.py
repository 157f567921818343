"""General rules of the op table for shapes common in timm's and transformers' families: resampling over the
spatial dims (HRNet's and MobileViT's upsampling), stacking branches and reducing over them (selective kernels),
reducing over a split dim (ResNeSt's split attention), repeating channels, statistics over the units that scale them
(ConvNeXt-V2's global response norm), normalised q and k (Swin v2's cosine attention), a bias made in the forward
(BEiT's and EVA's q/k/v biases), windows cut from a padded map, heads stacked and averaged (CrossViT), weight
standardisation (BiT, NFNet), products of gated tensors (StarNet, FocalNet). Each small model of that shape
converts, reproduces the original with open gates and forgets nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm


class Upsampling(nn.Module):
    """Two resolutions joined HRNet-style: the low one upsampled (by a module and by ``F.interpolate``) and added."""

    def __init__(self) -> None:
        super().__init__()
        self.high = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.low = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        high = self.high(x)
        low = self.low(high)
        h = high + self.up(low) + F.interpolate(low, size=high.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(h.mean((2, 3)))


class SelectiveKernel(nn.Module):
    """Two kernel paths stacked, weighed by a softmax over the paths (SKNet), and summed over the stacked dim."""

    def __init__(self) -> None:
        super().__init__()
        self.paths = nn.ModuleList(nn.Sequential(nn.Conv2d(3, 8, k, padding=k // 2), nn.BatchNorm2d(8), nn.ReLU())
                                   for k in (3, 5))
        self.attend = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = torch.stack([path(x) for path in self.paths], dim=1)  # [N, 2, C, H, W]
        weights = self.attend(paths.sum(1).mean((2, 3), keepdim=True))  # [N, 2C, 1, 1]
        weights = weights.view(x.shape[0], 2, 8, 1, 1).softmax(1)
        return self.head((paths * weights).sum(1).mean((2, 3)))


class SplitAttention(nn.Module):
    """ResNeSt's radix split: one convolution gives two groups of channels, summed over the split dim."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, groups=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        radix = h.view(h.shape[0], 2, 8, *h.shape[2:]).sum(1)
        return self.head(radix.mean((2, 3)))


class RepeatedChannels(nn.Module):
    """Channels repeated (GC-ViT's ``repeat_interleave``) before a convolution that reads all the copies."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).repeat_interleave(2, dim=1)
        return self.head(self.mix(h).mean((2, 3)))


class LearnableAffine(nn.Module):
    """HGNetV2's learnable affine: one scale and one bias shared by every channel (no gate protects them, so every
    task gets copies of its own), then ResMLP's per-channel affine written as ``torch.addcmul(β, α, x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.bias = nn.Parameter(torch.tensor([0.25]))
        self.alpha = nn.Parameter(torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1))
        self.beta = nn.Parameter(torch.linspace(-0.1, 0.1, 8).view(1, 8, 1, 1))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.scale * self.conv(x) + self.bias
        h = torch.addcmul(self.beta, self.alpha, h.relu())
        return self.head(h.mean((2, 3)))


class AveragedHeads(nn.Module):
    """RepViT's and LeViT's classifier: a head and a distillation head, their logits averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)
        self.head_dist = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean((2, 3))
        return (self.head(h) + self.head_dist(h)) / 2


class StackedHeads(nn.Module):
    """CrossViT's classifier: one head per branch, their logits stacked and averaged; the input first goes through
    a fixed transform (CSATv2's DCT stem: ``F.linear`` by a buffer), which leaves it data."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("transform", torch.linalg.qr(torch.randn(16, 16))[0])
        self.small = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.large = nn.Sequential(nn.Conv2d(3, 6, 5, padding=2), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.ModuleList([nn.Linear(8, 4), nn.Linear(6, 4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.transform)
        branches = [self.small(x).mean((2, 3)), self.large(x).mean((2, 3))]
        return torch.mean(torch.stack([head(b) for head, b in zip(self.head, branches, strict=True)], dim=0), dim=0)


class StdConv(nn.Conv2d):
    """BiT's weight-standardised convolution: each output unit's row of weights standardised before the
    convolution (``F.batch_norm`` on the weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                              eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv(nn.Conv2d):
    """NFNet's scaled weight standardisation: a learned gain per output unit."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, self.out_channels).view(-1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=self.gain.view(-1), training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StandardisedWeights(nn.Module):
    """BiT's and NFNet's convolutions, one followed by a GroupNorm, one by nothing (its own gate)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = StdConv(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv2 = ScaledStdConv(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.norm(self.conv1(x)))))
        return self.head(h.mean((2, 3)))


class GatedProducts(nn.Module):
    """Products of two gated tensors of different units: StarNet's star (``relu6(a) * b``, two convolutions) and
    FocalNet's gates (one feature of a projection scaling the others)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
        self.proj = nn.Linear(8, 10)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.a(x)) * self.b(x)
        t = self.proj(h.mean((2, 3)))
        v, gates = t[:, :8], t[:, 8:]
        modulated = 0
        for level in range(2):
            modulated = modulated + v * gates[:, level:level + 1]
        return self.head(modulated)


class PaddedPool(nn.Module):
    """HGNetV2's stem and TF-"same" pooling: zero padding, then a max pool whose windows take padded positions
    (always 0) with a unit's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2, stride=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(F.pad(self.conv(x), (0, 1, 0, 1)))
        return self.head(h.mean((2, 3)))


class ResponseNorm(nn.Module):
    """ConvNeXt-V2's global response norm (channels last, as timm writes it): each channel's spatial norm divided by
    the mean of every channel's (a statistic over the units) scales the channel, then a per-channel affine
    (``addcmul``) and the residual; then a spatial gate from the mean over the channels (a statistic through a
    sigmoid)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.weight = nn.Parameter(torch.linspace(-0.5, 0.5, 8))
        self.bias = nn.Parameter(torch.linspace(-0.1, 0.1, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = h * torch.sigmoid(h.mean(1, keepdim=True))
        h = h.permute(0, 2, 3, 1)
        g = torch.linalg.vector_norm(h, ord=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        h = h + torch.addcmul(self.bias.view(1, 1, 1, -1), self.weight.view(1, 1, 1, -1), h * n)
        return self.head(h.mean((1, 2)))


class CosineAttention(nn.Module):
    """Swin v2's cosine attention: q and k normalised (``F.normalize``) before their product, scaled by a learned
    logit scale per head computed from the parameter (clamped, exponentiated): one copy per task."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.qkv = nn.Linear(16, 48)
        self.logit_scale = nn.Parameter(torch.log(torch.tensor([10.0, 5.0])).view(2, 1, 1))
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        b, n, c = t.shape
        q, k, v = self.qkv(t).view(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        scale = torch.clamp(self.logit_scale, max=4.6).exp()
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.head((t + self.proj(out)).mean(1))


class ConcatenatedBias(nn.Module):
    """BEiT's and EVA's attention input: a bias-free ``Linear`` whose bias is made in the forward,
    ``cat((q_bias, k_bias, v_bias))`` with ``k_bias`` a buffer of zeros, passed to ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 24, bias=False)
        self.q_bias = nn.Parameter(torch.linspace(-0.2, 0.2, 8))
        self.register_buffer("k_bias", torch.zeros(8), persistent=False)
        self.v_bias = nn.Parameter(torch.linspace(0.1, 0.3, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        qkv = F.linear(t, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.view(*t.shape[:2], 3, 8).unbind(2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.head((t + out).mean(1))


class Windows(nn.Module):
    """CPUBone's and HaloNet's windows: zero padding by a module (``nn.ZeroPad2d``), then blocks cut with
    ``Tensor.unfold`` and reduced over each block (a block's padded positions are always 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.pad = nn.ZeroPad2d(1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.pad(self.conv(x)).unfold(2, 4, 4).unfold(3, 4, 4)  # [N, C, 4, 4, 4, 4]
        return self.head(blocks.amax((-1, -2)).mean((2, 3)))


MODELS = {"padded_pool": PaddedPool, "upsampling": Upsampling, "selective_kernel": SelectiveKernel,
          "split_attention": SplitAttention, "repeated_channels": RepeatedChannels,
          "learnable_affine": LearnableAffine, "averaged_heads": AveragedHeads, "response_norm": ResponseNorm,
          "cosine_attention": CosineAttention, "concatenated_bias": ConcatenatedBias,
          "windows": Windows, "stacked_heads": StackedHeads,
          "standardised_weights": StandardisedWeights, "gated_products": GatedProducts}


#: a norm for each kind the models hold
NORM = {"batch": "masked_bn", "layer": "masked_ln", "group": "masked_gn"}


@pytest.mark.parametrize("name", list(MODELS))
def test_open_gates_reproduce_the_original(name: str) -> None:
    assert_open_gates_reproduce(filled(MODELS[name]()), NORM, torch.randn(4, 3, 16, 16))


@pytest.mark.parametrize("name", list(MODELS))
def test_training_a_second_task_forgets_nothing(name: str) -> None:
    assert_a_second_task_forgets_nothing(filled(MODELS[name]()), NORM, torch.randn(4, 3, 16, 16))


def test_a_reduction_over_the_units_own_dim_or_over_too_many_branches_is_refused() -> None:
    class Reduced(nn.Module):
        def __init__(self, branches: int) -> None:
            super().__init__()
            self.branches = branches
            self.conv = nn.Sequential(nn.Conv2d(3, 18, 3), nn.BatchNorm2d(18), nn.ReLU())
            self.head = nn.Linear(18 // branches, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x).mean((2, 3))
            return self.head(h.view(h.shape[0], self.branches, -1).sum(1))

    for branches in (18, 9):  # the channels themselves; more branches than a reduction joins
        with pytest.raises(hatnorm.ConversionError, match=r"only a mean over dims the units do not vary in .* at "
                                                          r"most 8 long\) it joins them"):
            hatnorm.convert(Reduced(branches), num_tasks=2, example_input=torch.randn(2, 3, 8, 8))
    hatnorm.convert(Reduced(3), num_tasks=2, example_input=torch.randn(2, 3, 8, 8))

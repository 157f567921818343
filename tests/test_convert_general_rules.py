"""General rules of the op table for shapes common in timm's and transformers' families: resampling over the
spatial dims (HRNet's and MobileViT's upsampling), stacking branches and reducing over them (selective kernels),
reducing over a split dim (ResNeSt's split attention), repeating channels. Each small model of that shape converts,
reproduces the original with open gates and forgets nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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


MODELS = {"padded_pool": PaddedPool, "upsampling": Upsampling, "selective_kernel": SelectiveKernel,
          "split_attention": SplitAttention, "repeated_channels": RepeatedChannels,
          "learnable_affine": LearnableAffine, "averaged_heads": AveragedHeads}


def filled(model: nn.Module) -> nn.Module:
    """Non-trivial norm statistics, as trained weights have."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_open_gates_reproduce_the_original(name: str) -> None:
    original = filled(MODELS[name]())
    x = torch.randn(4, 3, 16, 16)
    converted = hatnorm.convert(original, num_tasks=2, example_input=x)
    hatnorm.HAT(converted)  # every parameter is covered
    hatnorm.open_gates(converted)
    converted.eval()
    with torch.no_grad():
        for task in range(2):
            torch.testing.assert_close(converted(x, task=task), original(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_training_a_second_task_forgets_nothing(name: str) -> None:
    probe = torch.randn(4, 3, 16, 16)
    model = hatnorm.convert(filled(MODELS[name]()), num_tasks=2, num_classes=[3, 4], example_input=probe)
    hat = hatnorm.HAT(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    outputs = []
    for task, classes in enumerate([3, 4]):
        hat.begin_task(task)
        for b in range(3):
            model.train()
            s = hat.scale(b, 3)
            x, y = torch.randn(8, 3, 16, 16) + task, torch.randint(0, classes, (8,))
            loss = hat.loss(F.cross_entropy(model(x, task=task, s=s), y), s)
            opt.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(opt)
        hat.end_task()
        model.eval()
        with torch.no_grad():
            outputs.append(model(probe, task=0))
    assert torch.equal(outputs[0], outputs[1])


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

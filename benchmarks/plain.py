"""Plain PyTorch twins of hatnorm's reference architectures: the same layers and widths with ``nn.BatchNorm``
/ ``nn.LayerNorm``, no gates and one head. They are the baselines the benchmarks divide by."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class PlainBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class PlainResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3×3 conv, no max-pool), as ``hatnorm.build("resnet18")``."""

    def __init__(self, num_classes: int, *, base_width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, base_width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        blocks, inplanes = [], base_width
        for i in range(4):
            planes = base_width * 2**i
            for j in range(2):
                blocks.append(PlainBlock(inplanes, planes, 2 if i > 0 and j == 0 else 1))
                inplanes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class PlainAlexNet(nn.Module):
    """Serrà's AlexNet with BatchNorm after every hidden layer, as ``hatnorm.build("alexnet")``."""

    def __init__(self, num_classes: int, *, width: float = 1.0, in_channels: int = 3, size: int = 32) -> None:
        super().__init__()
        c1, c2, c3, f1, f2 = (max(1, round(w * width)) for w in (64, 128, 256, 2048, 2048))
        kernels = (size // 8, size // 10, 2)
        side = size
        for k in kernels:
            side = (side - k + 1) // 2
        self.convs = nn.ModuleList([nn.Conv2d(in_channels, c1, kernels[0]), nn.Conv2d(c1, c2, kernels[1]),
                                    nn.Conv2d(c2, c3, kernels[2])])
        self.conv_norms = nn.ModuleList(nn.BatchNorm2d(c) for c in (c1, c2, c3))
        self.fcs = nn.ModuleList([nn.Linear(c3 * side * side, f1), nn.Linear(f1, f2)])
        self.fc_norms = nn.ModuleList(nn.BatchNorm1d(f) for f in (f1, f2))
        self.drops = nn.ModuleList(nn.Dropout(p) for p in (0.2, 0.2, 0.5, 0.5, 0.5))
        self.head = nn.Linear(f2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.conv_norms, strict=True)):
            h = F.max_pool2d(self.drops[i](F.relu(norm(conv(h)))), 2)
        h = h.flatten(1)
        for i, (fc, norm) in enumerate(zip(self.fcs, self.fc_norms, strict=True), start=3):
            h = self.drops[i](F.relu(norm(fc(h))))
        return self.head(h)


class PlainAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dim_head: int) -> None:
        super().__init__()
        inner = num_heads * dim_head
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v = (rearrange(proj(h), "b n (h d) -> b h n d", h=self.num_heads)
                   for proj in (self.to_q, self.to_k, self.to_v))
        return self.to_out(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class PlainViT(nn.Module):
    """The pre-norm ViT of ``hatnorm.build("vit_micro")`` with ``nn.LayerNorm``."""

    def __init__(self, num_classes: int, *, image_size: int = 32, patch_size: int = 4, dim: int = 64, depth: int = 4,
                 num_heads: int = 4, mlp_dim: int = 128, in_channels: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.to_patch_embedding = nn.Linear(patch_size * patch_size * in_channels, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.attentions = nn.ModuleList(PlainAttention(dim, num_heads, dim // num_heads) for _ in range(depth))
        self.feedforwards = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, img: Tensor) -> Tensor:
        patches = rearrange(img, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=self.patch_size, p2=self.patch_size)
        x = self.to_patch_embedding(patches)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        for attention, feedforward in zip(self.attentions, self.feedforwards, strict=True):
            x = x + attention(x)
            x = x + feedforward(x)
        return self.head(self.norm(x)[:, 0])

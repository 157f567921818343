"""Small vision transformers under HAT, written with einops.

The residual stream has one gate for the whole model: the patch embedding, every attention output and
every MLP output are gated by it, so the stream only ever holds its units, and every pre-norm reads
it with that gate (a masked LayerNorm normalises over the stream's selected features). Attention has
one gate each on the q, k and v features; the MLP has a gate on its hidden units (gate, then GELU,
which keeps unselected units at exactly 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from hatnorm import (
    Concat,
    GradientPolicy,
    HATGate,
    HATModule,
    Layer,
    MaskedNorm,
    MaskState,
    NormSpec,
    Protected,
    TaskHeads,
    register_architecture,
)


class TokenEmbedding(nn.Module, Protected):
    """The cls token ``[1, 1, D]`` and position embedding ``[1, n + 1, D]``, protected per stream unit."""

    def __init__(self, num_patches: int, dim: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)

    def forward(self, patches: Tensor) -> Tensor:
        cls = repeat(self.cls_token, "1 1 d -> b 1 d", b=patches.shape[0])
        return torch.cat([cls, patches], dim=1) + self.pos_embedding

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        rate = policy.unit_rate(previous)  # [D], broadcast over tokens
        return {"cls_token": rate, "pos_embedding": rate}


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with gates on the q, k and v features."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, num_tasks: int,
                 norm_layer: Callable[[int], MaskedNorm], s_max: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = norm_layer(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.gate_q, self.gate_k, self.gate_v = (HATGate(inner, num_tasks=num_tasks, s_max=s_max) for _ in range(3))
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, stream: Tensor, task: int, s: float | Tensor | None) -> Tensor:
        gates = torch.cat([self.gate_q(task, s), self.gate_k(task, s), self.gate_v(task, s)])
        qkv = self.to_qkv(self.norm(x, stream, task)) * gates
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")
        return self.to_out(out) * stream

    def wiring(self, stream: HATGate) -> list[Layer]:
        return [Layer(self.norm, out=stream),
                Layer(self.to_qkv, out=Concat(self.gate_q, self.gate_k, self.gate_v), inp=stream),
                Layer(self.to_out, out=stream, inp=self.gate_v)]


class FeedForward(nn.Module):
    """Pre-norm MLP with a gate on its hidden units."""

    def __init__(self, dim: int, hidden: int, *, num_tasks: int, norm_layer: Callable[[int], MaskedNorm],
                 s_max: float) -> None:
        super().__init__()
        self.norm = norm_layer(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.gate = HATGate(hidden, num_tasks=num_tasks, s_max=s_max)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, stream: Tensor, task: int, s: float | Tensor | None) -> Tensor:
        h = F.gelu(self.fc1(self.norm(x, stream, task)) * self.gate(task, s))
        return self.fc2(h) * stream

    def wiring(self, stream: HATGate) -> list[Layer]:
        return [Layer(self.norm, out=stream), Layer(self.fc1, out=self.gate, inp=stream),
                Layer(self.fc2, out=stream, inp=self.gate)]


class ViT(HATModule):
    """A pre-norm ViT classifying from the cls token, gated for HAT.

    Args:
        num_classes: one class count per task.
        num_tasks: number of tasks.
        norm_layer: norm factory over the last dim (``[N, n, D]``).
        image_size: input side.
        patch_size: patch side; must divide ``image_size``.
        dim: width of the residual stream D.
        depth: number of blocks.
        heads: attention heads.
        dim_head: features per head (default ``dim // heads``).
        mlp_dim: MLP hidden units (default ``2 * dim``).
        in_channels: input channels.
        s_max: the gates' largest scale.
    """

    def __init__(
        self,
        num_classes: Sequence[int],
        *,
        num_tasks: int,
        norm_layer: Callable[[int], MaskedNorm],
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        dim_head: int | None = None,
        mlp_dim: int | None = None,
        in_channels: int = 3,
        s_max: float = 400.0,
    ) -> None:
        super().__init__()
        for name, value in (("image_size", image_size), ("patch_size", patch_size), ("dim", dim), ("depth", depth),
                            ("heads", heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
        if image_size % patch_size:
            raise ValueError(f"patch_size must divide image_size {image_size}, got {patch_size}")
        dim_head = dim_head or max(dim // heads, 1)
        mlp_dim = mlp_dim or 2 * dim
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        num_patches = (image_size // patch_size) ** 2
        self.to_patch_embedding = nn.Linear(patch_size * patch_size * in_channels, dim)
        self.tokens = TokenEmbedding(num_patches, dim)
        self.gate_stream = HATGate(dim, num_tasks=num_tasks, s_max=s_max)
        self.attentions = nn.ModuleList(
            Attention(dim, heads=heads, dim_head=dim_head, num_tasks=num_tasks, norm_layer=norm_layer, s_max=s_max)
            for _ in range(depth))
        self.feedforwards = nn.ModuleList(
            FeedForward(dim, mlp_dim, num_tasks=num_tasks, norm_layer=norm_layer, s_max=s_max) for _ in range(depth))
        self.norm = norm_layer(dim)
        self.heads = TaskHeads(dim, num_classes, num_tasks=num_tasks)

    def forward(self, img: Tensor, task: int, s: float | Tensor | None = None) -> Tensor:
        if img.dim() != 4 or img.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"img must have shape [N, {self.in_channels}, {self.image_size}, {self.image_size}], "
                             f"got {list(img.shape)}")
        stream = self.gate_stream(task, s)
        patches = rearrange(img, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=self.patch_size, p2=self.patch_size)
        x = self.tokens(self.to_patch_embedding(patches)) * stream
        for attention, feedforward in zip(self.attentions, self.feedforwards, strict=True):
            x = x + attention(x, stream, task, s)
            x = x + feedforward(x, stream, task, s)
        return self.heads(self.norm(x, stream, task)[:, 0], task)

    def hat_layers(self) -> list[Layer]:
        stream = self.gate_stream
        layers = [Layer(self.to_patch_embedding, out=stream), Layer(self.tokens, out=stream),
                  Layer(self.norm, out=stream)]
        for attention, feedforward in zip(self.attentions, self.feedforwards, strict=True):
            layers += attention.wiring(stream) + feedforward.wiring(stream)
        return layers


def _vit(num_tasks: int, norm: NormSpec, num_classes: list[int], **options: Any) -> ViT:
    return ViT(num_classes, num_tasks=num_tasks, norm_layer=norm.layer(num_tasks=num_tasks, dims=None),
               **options)


@register_architecture("vit", family="layer")
def vit(*, num_tasks: int, norm: NormSpec, num_classes: list[int], **options: Any) -> ViT:
    """A ViT of any size: ``image_size``, ``patch_size``, ``dim``, ``depth``, ``heads``, ``mlp_dim`` (vit_micro's
    sizes by default)."""
    return _vit(num_tasks, norm, num_classes, **options)


@register_architecture("vit_micro", family="layer")
def vit_micro(*, num_tasks: int, norm: NormSpec, num_classes: list[int], **options: Any) -> ViT:
    """32×32 inputs, patch 4, dim 64, depth 4, 4 heads, MLP 128: small enough for CPU tests."""
    return _vit(num_tasks, norm, num_classes, **({"image_size": 32, "patch_size": 4, "dim": 64, "depth": 4,
                                                   "heads": 4, "mlp_dim": 128} | options))


@register_architecture("vit_tiny", family="layer")
def vit_tiny(*, num_tasks: int, norm: NormSpec, num_classes: list[int], **options: Any) -> ViT:
    """ViT-Tiny's body (dim 192, depth 12, 3 heads, MLP 768) on 32×32 inputs with patch 4."""
    return _vit(num_tasks, norm, num_classes, **({"image_size": 32, "patch_size": 4, "dim": 192, "depth": 12,
                                                   "heads": 3, "mlp_dim": 768} | options))

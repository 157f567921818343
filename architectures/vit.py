"""Small vision transformers under HAT, written with einops.

The blocks are hatnorm's gated transformer blocks (``hatnorm.GatedAttention``, ``hatnorm.GatedFeedForward``):
one gate on the residual stream, gates on the q, k, v features and on the MLP hidden units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from einops import rearrange
from torch import Tensor, nn

from hatnorm import (
    GatedAttention,
    GatedFeedForward,
    HATGate,
    HATModule,
    Layer,
    MaskedNorm,
    MaskSource,
    NormSpec,
    TaskHeads,
    TokenEmbedding,
    blocks_wiring,
    gated_linear,
    register_architecture,
    run_blocks,
)
from hatnorm.checks import check_batch, check_task_and_scale


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
                            ("heads", heads), ("in_channels", in_channels), ("dim_head", dim_head or 1),
                            ("mlp_dim", mlp_dim or 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
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
            GatedAttention(dim, heads=heads, dim_head=dim_head, num_tasks=num_tasks, norm_layer=norm_layer, s_max=s_max)
            for _ in range(depth))
        self.feedforwards = nn.ModuleList(
            GatedFeedForward(dim, mlp_dim, num_tasks=num_tasks, norm_layer=norm_layer, s_max=s_max)
            for _ in range(depth))
        self.norm = norm_layer(dim)
        self.heads = TaskHeads(dim, num_classes, num_tasks=num_tasks)
        self.num_tasks = self.heads.num_tasks

    def forward(self, img: Tensor, task: int, s: float | Tensor | None = None) -> Tensor:
        """The logits of task ``task`` for images ``img`` ``[N, in_channels, image_size, image_size]`` (N ≥ 1)."""
        size = self.image_size
        check_batch(img, (self.in_channels, size, size), like=self.to_patch_embedding.weight, name="img")
        task, s = check_task_and_scale(task, s, num_tasks=self.num_tasks, training=self.training)
        stream = self.gate_stream(task, s)
        patches = rearrange(img, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=self.patch_size, p2=self.patch_size)
        x = self.tokens(gated_linear(patches, self.to_patch_embedding, stream), stream)
        x = run_blocks(x, stream, self.attentions, self.feedforwards, task, s)
        return self.heads(self.norm(x, stream, task)[:, 0], task)

    def hat_layers(self) -> list[Layer]:
        stream = self.gate_stream
        layers = [Layer(self.to_patch_embedding, out=stream), Layer(self.tokens, out=stream),
                  Layer(self.norm, out=stream)]
        return layers + blocks_wiring(stream, self.attentions, self.feedforwards)

    def head_units(self) -> MaskSource:
        return self.gate_stream


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

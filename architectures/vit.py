"""Small vision transformers under HAT, written with einops.

The blocks are hatnorm's gated transformer blocks (``hatnorm.blocks.GatedAttention``,
``hatnorm.blocks.GatedFeedForward``): one gate on the residual stream, gates on the q, k, v features and on the MLP
hidden units.

Two placements of the LayerNorms. Pre-norm (the default, ``vit_micro``): every norm reads the gated residual
stream, whose unselected units are 0 for every task, so no norm's statistics can change with later tasks.
Post-norm (``norm_position="post"``, ``vit_post``; the original Transformer's and BERT's): each block adds its
*ungated* update to the stream and the norm reads that sum, x ← a ⊙ LN(x + f(x)); the sum's units a task does
not select come from weights later tasks train, so a norm whose statistics read every unit (shared or
per-task LN) drifts, while masked LN reads only the task's units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from hatnorm import HATGate, HATModule, MaskedNorm, NormSpec, TaskHeads, register_architecture
from hatnorm.blocks import (
    GatedAttention,
    GatedFeedForward,
    Layer,
    MaskSource,
    TokenEmbedding,
    blocks_wiring,
    run_blocks,
)
from hatnorm.checks import check_batch, check_task_and_scale
from hatnorm.functional import gated_linear
from hatnorm.norms import NoNorm


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
        num_heads: attention heads.
        dim_head: features per head (default ``dim // num_heads``).
        mlp_dim: MLP hidden units (default ``2 * dim``).
        in_channels: input channels.
        s_max: the gates' largest scale.
        stem: ``"patch"`` (a linear map of each patch, ViT's patchify) or ``"conv"``: a stack of stride-2 3×3
            convolutions, each but the last gated (no norm) with a ReLU, down to the same tokens
            (``patch_size`` a power of 2), the small-image practice of Xiao et al. 2021 ("Early convolutions
            help transformers see better") [``"patch"``].
        norm_position: ``"pre"``: ``x ← x + f(LN(x))`` with a final LN before the head, every norm reading the
            gated stream; ``"post"``: ``x ← a ⊙ LN(x + f(x))`` with f's update not gated before the norm (the
            blocks' own pre-norms are the identity) and no final LN [``"pre"``].
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
        num_heads: int = 4,
        dim_head: int | None = None,
        mlp_dim: int | None = None,
        in_channels: int = 3,
        s_max: float = 400.0,
        stem: Literal["patch", "conv"] = "patch",
        norm_position: Literal["pre", "post"] = "pre",
    ) -> None:
        super().__init__()
        for name, value in (("image_size", image_size), ("patch_size", patch_size), ("dim", dim), ("depth", depth),
                            ("num_heads", num_heads), ("in_channels", in_channels), ("dim_head", dim_head or 1),
                            ("mlp_dim", mlp_dim or 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
        if image_size % patch_size:
            raise ValueError(f"patch_size must divide image_size {image_size}, got {patch_size}")
        if stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        if norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position must be 'pre' or 'post', got {norm_position!r}")
        if stem == "conv" and (patch_size < 2 or patch_size & (patch_size - 1)):
            raise ValueError(f"stem='conv' halves the image once per convolution: patch_size must be a power of 2 "
                             f"≥ 2, got {patch_size}")
        dim_head = dim_head or max(dim // num_heads, 1)
        mlp_dim = mlp_dim or 2 * dim
        self.image_size, self.patch_size, self.in_channels, self.stem = image_size, patch_size, in_channels, stem
        num_patches = (image_size // patch_size) ** 2
        if stem == "patch":
            self.to_patch_embedding = nn.Linear(patch_size * patch_size * in_channels, dim)
        else:
            # widths double up to dim: patch 4 and dim 64 give in → 32 → 64, each conv halving the side
            steps = patch_size.bit_length() - 1
            widths = [max(dim >> (steps - 1 - i), 1) for i in range(steps)]
            self.stem_convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
                                            for c_in, c_out in zip([in_channels, *widths], widths, strict=False))
            self.stem_gates = nn.ModuleList(HATGate(w, num_tasks=num_tasks, s_max=s_max) for w in widths[:-1])
            self.stem_norms = nn.ModuleList(NoNorm(w, num_tasks=num_tasks) for w in widths[:-1])
        self.tokens = TokenEmbedding(num_patches, dim)
        self.gate_stream = HATGate(dim, num_tasks=num_tasks, s_max=s_max)
        self.norm_position = norm_position
        # post-norm: the blocks read the stream as it is (their pre-norm is the pure gate), the norms follow
        block_norm = norm_layer if norm_position == "pre" else _identity_norm(num_tasks)
        self.attentions = nn.ModuleList(
            GatedAttention(dim, num_heads=num_heads, dim_head=dim_head, num_tasks=num_tasks, norm_layer=block_norm,
                           s_max=s_max)
            for _ in range(depth))
        self.feedforwards = nn.ModuleList(
            GatedFeedForward(dim, mlp_dim, num_tasks=num_tasks, norm_layer=block_norm, s_max=s_max)
            for _ in range(depth))
        if norm_position == "pre":
            self.norm = norm_layer(dim)
        else:  # after each block's attention and MLP
            self.post_norms = nn.ModuleList(norm_layer(dim) for _ in range(2 * depth))
        self.task_heads = TaskHeads(dim, num_classes, num_tasks=num_tasks)
        self.num_tasks = self.task_heads.num_tasks

    def forward(self, img: Tensor, task: int, s: float | Tensor | None = None) -> Tensor:
        """The logits of task ``task`` for images ``img`` ``[N, in_channels, image_size, image_size]`` (N ≥ 1)."""
        size = self.image_size
        first = self.to_patch_embedding if self.stem == "patch" else self.stem_convs[0]
        check_batch(img, (self.in_channels, size, size), like=first.weight, name="img")
        task, s = check_task_and_scale(task, s, num_tasks=self.num_tasks, training=self.training)
        # checked once here: the gates, norms and heads below take the trusted path
        stream_gate = self.gate_stream(task, s, trusted=True)
        x = self.tokens(self._embed(img, stream_gate, task, s), stream_gate, trusted=True)
        if self.norm_position == "pre":
            x = run_blocks(x, stream_gate, self.attentions, self.feedforwards, task, s, trusted=True)
            return self.task_heads(self.norm(x, stream_gate, task, trusted=True)[:, 0], task, trusted=True)
        # every block's update ungated (an all-ones gate for its output), then the norm gates the sum
        ungated = torch.ones_like(stream_gate)
        blocks = [block for pair in zip(self.attentions, self.feedforwards, strict=True) for block in pair]
        for block, norm in zip(blocks, self.post_norms, strict=True):
            x = norm(x + block(x, ungated, task, s, trusted=True), stream_gate, task, trusted=True)
        return self.task_heads(x[:, 0], task, trusted=True)

    def _embed(self, img: Tensor, stream_gate: Tensor, task: int, s: float | Tensor | None) -> Tensor:
        """The gated patch embeddings ``[N, n, D]`` (``task`` and ``s`` checked by :meth:`forward`)."""
        if self.stem == "patch":
            patches = rearrange(img, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=self.patch_size,
                                p2=self.patch_size)
            return gated_linear(patches, self.to_patch_embedding, stream_gate)
        h = img
        for conv, norm, gate in zip(self.stem_convs, self.stem_norms, self.stem_gates, strict=False):
            h = F.relu(norm(conv(h), gate(task, s, trusted=True), task, trusted=True))
        return rearrange(self.stem_convs[-1](h), "b d h w -> b (h w) d") * stream_gate

    def hat_layers(self) -> list[Layer]:
        stream = self.gate_stream
        if self.stem == "patch":
            layers = [Layer(self.to_patch_embedding, out=stream)]
        else:
            gates = list(self.stem_gates)
            layers = [Layer(conv, out=gate, inp=previous)
                      for conv, gate, previous in zip(self.stem_convs, [*gates, stream], [None, *gates], strict=True)]
            layers += [Layer(norm, out=gate) for norm, gate in zip(self.stem_norms, gates, strict=True)]
        layers.append(Layer(self.tokens, out=stream))
        norms = [self.norm] if self.norm_position == "pre" else list(self.post_norms)
        layers += [Layer(norm, out=stream) for norm in norms]
        return layers + blocks_wiring(stream, self.attentions, self.feedforwards)

    def head_units(self) -> MaskSource:
        return self.gate_stream


def _identity_norm(num_tasks: int) -> Callable[[int], MaskedNorm]:
    """The pure gate over the last dim: a post-norm block's input is the stream as it is (already gated)."""

    def norm_layer(num_features: int) -> MaskedNorm:
        return NoNorm(num_features, num_tasks=num_tasks, dims=None)

    return norm_layer


def _vit(num_tasks: int, norm: NormSpec, num_classes: list[int], **options: Any) -> ViT:
    return ViT(num_classes, num_tasks=num_tasks, norm_layer=norm.layer(num_tasks=num_tasks, dims=None),
               **options)


@register_architecture("vit", family="layer")
def vit(*, num_tasks: int, norm: NormSpec, num_classes: list[int], **options: Any) -> ViT:
    """A ViT of any size: ``image_size``, ``patch_size``, ``dim``, ``depth``, ``num_heads``, ``mlp_dim``, ``stem``
    (vit_micro's sizes by default)."""
    return _vit(num_tasks, norm, num_classes, **options)


@register_architecture("vit_micro", family="layer")
def vit_micro(*, num_tasks: int, norm: NormSpec, num_classes: list[int], **options: Any) -> ViT:
    """32×32 inputs, patch 4, dim 64, depth 4, 4 heads, MLP 128: small enough for CPU tests."""
    return _vit(num_tasks, norm, num_classes, **({"image_size": 32, "patch_size": 4, "dim": 64, "depth": 4,
                                                   "num_heads": 4, "mlp_dim": 128} | options))


@register_architecture("vit_post", family="layer")
def vit_post(*, num_tasks: int, norm: NormSpec, num_classes: list[int], **options: Any) -> ViT:
    """``vit_micro`` with post-norm blocks (``norm_position="post"``): each norm reads the ungated residual sum,
    where a norm whose statistics read every unit can drift."""
    return _vit(num_tasks, norm, num_classes, **({"image_size": 32, "patch_size": 4, "dim": 64, "depth": 4,
                                                   "num_heads": 4, "mlp_dim": 128, "norm_position": "post"} | options))


@register_architecture("vit_tiny", family="layer")
def vit_tiny(*, num_tasks: int, norm: NormSpec, num_classes: list[int], **options: Any) -> ViT:
    """ViT-Tiny's body (dim 192, depth 12, 3 heads, MLP 768) on 32×32 inputs with patch 4."""
    return _vit(num_tasks, norm, num_classes, **({"image_size": 32, "patch_size": 4, "dim": 192, "depth": 12,
                                                   "num_heads": 3, "mlp_dim": 768} | options))

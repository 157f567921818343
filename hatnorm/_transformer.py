"""Gated transformer blocks shared by the reference ViTs and by converted transformers models.

The residual stream has one gate for the whole model: the token embedding and every block's output
are gated by it, so the stream only holds its units, and each pre-norm reads the stream with that gate
(a masked LayerNorm normalises over the stream's selected features). Attention has a gate on each of
the q, k and v features; the MLP gates its hidden units before the activation, which must map 0 to 0
so unselected units stay exactly 0.

Gates on linear outputs are folded into the weights: a ⊙ (Wx + b) = (a ⊙ W)x + a ⊙ b costs one multiply
per weight instead of one per token and feature (65× fewer for ``vit_micro`` at batch 32), and the
gate's gradient comes from the weight gradient autograd forms anyway.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from hatnorm._checks import check_batch, check_positive_int
from hatnorm._gate import HATGate
from hatnorm._hat import Layer
from hatnorm._masks import Concat, MaskState
from hatnorm._norm_protocol import MaskedNorm
from hatnorm._policies import GradientPolicy
from hatnorm._protected import Protected

# einops registers its backend per tensor type on first use; registering tensors and parameters now keeps a
# first call under torch.compile from guarding on a registry it then grows, and recompiling on the next batch
for _example in (torch.zeros(1), nn.Parameter(torch.zeros(1))):
    rearrange(_example, "a -> a")


def gated_linear(x: Tensor, linear: nn.Linear, gate: Tensor) -> Tensor:
    """``linear(x) * gate`` computed as ``F.linear(x, gate ⊙ W, gate ⊙ b)``: the gate ``[out]`` scales the
    weight's rows, not the output's tokens."""
    bias = None if linear.bias is None else linear.bias * gate
    return F.linear(x, linear.weight * gate[:, None], bias)


class TokenEmbedding(nn.Module, Protected):
    """The cls token ``[1, 1, D]`` and the position embedding ``[1, n + 1, D]``, protected per stream unit.

    Args:
        num_patches: number of patch tokens n.
        dim: width of the residual stream D.
    """

    def __init__(self, num_patches: int, dim: int) -> None:
        super().__init__()
        num_patches, dim = check_positive_int(num_patches, "num_patches"), check_positive_int(dim, "dim")
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)

    def forward(self, patches: Tensor, gate: Tensor | None = None, *, trusted: bool = False) -> Tensor:
        """``[N, n, D]`` patch embeddings → ``[N, n + 1, D]`` tokens with the cls token first.

        With ``gate`` (the stream's ``[D]``), the cls token and the position embedding are gated, for
        patches already gated: the result is the gated tokens, with the gate applied to ``[n + 1, D]``
        parameters rather than to every token of the batch. ``trusted``: the caller made ``patches`` (a
        model that checked its input), so their shape is not checked again.
        """
        if not trusted:
            # read from the parameters, which a per-task export may have pruned to fewer stream units
            num_tokens, dim = self.pos_embedding.shape[1:]
            check_batch(patches, (num_tokens - 1, dim), like=self.cls_token, name="patches")
        cls_token, pos_embedding = self.cls_token, self.pos_embedding
        if gate is not None:
            cls_token, pos_embedding = cls_token * gate, pos_embedding * gate
        cls = repeat(cls_token, "1 1 d -> b 1 d", b=patches.shape[0])
        return torch.cat([cls, patches], dim=1) + pos_embedding

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        rate = policy.unit_rate(previous)  # [D], broadcast over tokens
        return {"cls_token": rate, "pos_embedding": rate}


class StreamEmbedding(nn.Module, Protected):
    """Token embeddings ``[V, D]`` (and, optionally, learned position ``[L, D]`` and token-type ``[types, D]``
    embeddings) added into the residual stream, protected per stream unit: the stream's gate scales the tables,
    not every token of the batch, so a closed unit's row entries stay exactly 0 in the stream.

    Args:
        vocab_size: tokens V.
        dim: width of the residual stream D.
        max_length: positions L of a learned position embedding, or ``None`` for none (rotary models).
        type_vocab_size: token types of a token-type embedding (BERT's segments), or ``None`` for none.
    """

    def __init__(self, vocab_size: int, dim: int, *, max_length: int | None = None,
                 type_vocab_size: int | None = None) -> None:
        super().__init__()
        vocab_size, dim = check_positive_int(vocab_size, "vocab_size"), check_positive_int(dim, "dim")
        self.token = nn.Parameter(torch.randn(vocab_size, dim) * 0.02)
        self.position = (None if max_length is None
                         else nn.Parameter(torch.randn(check_positive_int(max_length, "max_length"), dim) * 0.02))
        self.token_type = (None if type_vocab_size is None else
                           nn.Parameter(torch.zeros(check_positive_int(type_vocab_size, "type_vocab_size"), dim)))

    def forward(self, input_ids: Tensor, gate: Tensor, *, position_ids: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """The gated stream ``[N, L, D]`` for ``input_ids`` ``[N, L]``: token, plus position (``position_ids``, by
        default 0..L−1) and token type (``token_type_ids``, by default 0) where the embedding has them."""
        x = F.embedding(input_ids, self.token * gate)
        if self.position is not None:
            table = self.position * gate
            x = x + (table[: input_ids.shape[1]] if position_ids is None else F.embedding(position_ids, table))
        if self.token_type is not None:
            table = self.token_type * gate
            x = x + (table[0] if token_type_ids is None else F.embedding(token_type_ids, table))
        return x

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        rate = policy.unit_rate(previous)  # [D], broadcast over the rows of every table
        return {name: rate for name, p in self._parameters.items() if p is not None}


class SharedLMHead(nn.Module, Protected):
    """Logits over a vocabulary every task shares, ``h @ Wᵀ`` with ``W`` ``[V, D]`` and no bias: its columns of the
    stream units earlier tasks use are protected; its rows (the vocabulary) have no gate.

    Args:
        dim: width of the residual stream D.
        vocab_size: tokens V.
    """

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        dim, vocab_size = check_positive_int(dim, "dim"), check_positive_int(vocab_size, "vocab_size")
        self.weight = nn.Parameter(torch.randn(vocab_size, dim) * dim**-0.5)

    def forward(self, h: Tensor) -> Tensor:
        """Logits ``[..., V]`` for the stream ``h`` ``[..., D]``."""
        return F.linear(h, self.weight)

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        return {"weight": policy.unit_rate(previous)[None, :]}


class GatedAttention(nn.Module):
    """Pre-norm multi-head self-attention with gates on the q, k and v features.

    Args:
        dim: width of the residual stream.
        num_heads: attention heads.
        dim_head: features per head.
        num_tasks: number of tasks.
        norm_layer: the pre-norm factory (over the last dim).
        s_max: the gates' largest scale.
        qkv_bias: whether q, k, v have biases.
    """

    def __init__(self, dim: int, *, num_heads: int, dim_head: int, num_tasks: int,
                 norm_layer: Callable[[int], MaskedNorm], s_max: float, qkv_bias: bool = False) -> None:
        super().__init__()
        dim, num_heads, dim_head = (check_positive_int(v, n) for v, n in ((dim, "dim"), (num_heads, "num_heads"),
                                                                     (dim_head, "dim_head")))
        inner = num_heads * dim_head
        self.num_heads = num_heads
        self.norm = norm_layer(dim)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner, bias=qkv_bias) for _ in range(3))
        self.gate_q, self.gate_k, self.gate_v = (HATGate(inner, num_tasks=num_tasks, s_max=s_max) for _ in range(3))
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, stream_gate: Tensor, task: int, s: float | Tensor | None, *,
                trusted: bool = False, attn_mask: Tensor | None = None) -> Tensor:
        """The gated update ``[N, n, D]`` for the stream ``x``, given the stream's gate values ``stream_gate``;
        ``trusted``: ``task`` and ``s`` were checked by the caller (see :meth:`hatnorm.HATGate.forward`).
        ``attn_mask``: which keys each query attends to, ``F.scaled_dot_product_attention``'s (a bool
        ``[N, 1, n, n]`` for padding and causal masks; every query must attend to some key)."""
        h = self.norm(x, stream_gate, task, trusted=trusted)
        q, k, v = (rearrange(gated_linear(h, proj, gate(task, s, trusted=trusted)), "b n (h d) -> b h n d",
                             h=self.num_heads)
                   for proj, gate in ((self.to_q, self.gate_q), (self.to_k, self.gate_k), (self.to_v, self.gate_v)))
        out = rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask), "b h n d -> b n (h d)")
        return gated_linear(out, self.to_out, stream_gate)

    def wiring(self, stream: HATGate) -> list[Layer]:
        return [Layer(self.norm, out=stream),
                Layer(self.to_q, out=self.gate_q, inp=stream), Layer(self.to_k, out=self.gate_k, inp=stream),
                Layer(self.to_v, out=self.gate_v, inp=stream), Layer(self.to_out, out=stream, inp=self.gate_v)]

    def gate_units(self) -> Concat:
        """The units of q, k and v together, in that order."""
        return Concat(self.gate_q, self.gate_k, self.gate_v)


class GatedFeedForward(nn.Module):
    """Pre-norm MLP ``fc1 → gate → activation → fc2`` with its output gated by the stream.

    Args:
        dim: width of the residual stream.
        hidden: hidden units.
        num_tasks: number of tasks.
        norm_layer: the pre-norm factory (over the last dim).
        s_max: the gates' largest scale.
        activation: a unit-wise module with f(0) = 0 [GELU].
    """

    def __init__(self, dim: int, hidden: int, *, num_tasks: int, norm_layer: Callable[[int], MaskedNorm],
                 s_max: float, activation: nn.Module | None = None) -> None:
        super().__init__()
        dim, hidden = check_positive_int(dim, "dim"), check_positive_int(hidden, "hidden")
        self.norm = norm_layer(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.gate = HATGate(hidden, num_tasks=num_tasks, s_max=s_max)
        self.activation = activation if activation is not None else nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, stream_gate: Tensor, task: int, s: float | Tensor | None, *,
                trusted: bool = False) -> Tensor:
        """The gated update ``[N, n, D]`` for the stream ``x`` (see :meth:`GatedAttention.forward`)."""
        h = self.norm(x, stream_gate, task, trusted=trusted)
        h = self.activation(gated_linear(h, self.fc1, self.gate(task, s, trusted=trusted)))
        return gated_linear(h, self.fc2, stream_gate)

    def wiring(self, stream: HATGate) -> list[Layer]:
        return [Layer(self.norm, out=stream), Layer(self.fc1, out=self.gate, inp=stream),
                Layer(self.fc2, out=stream, inp=self.gate)]


def run_blocks(x: Tensor, stream_gate: Tensor, attentions: nn.ModuleList, feedforwards: nn.ModuleList, task: int,
               s: float | Tensor | None, *, trusted: bool = False, attn_mask: Tensor | None = None) -> Tensor:
    """The pre-norm residual blocks: ``x += attention(x)`` then ``x += feedforward(x)``, block by block
    (``trusted``: ``task`` and ``s`` were checked by the caller; ``attn_mask``: see :meth:`GatedAttention.forward`)."""
    for attention, feedforward in zip(attentions, feedforwards, strict=True):
        x = x + attention(x, stream_gate, task, s, trusted=trusted, attn_mask=attn_mask)
        x = x + feedforward(x, stream_gate, task, s, trusted=trusted)
    return x


def blocks_wiring(stream: HATGate, attentions: nn.ModuleList, feedforwards: nn.ModuleList) -> list[Layer]:
    """The wiring of every block's norms, projections and MLP."""
    layers: list[Layer] = []
    for attention, feedforward in zip(attentions, feedforwards, strict=True):
        layers += attention.wiring(stream) + feedforward.wiring(stream)
    return layers

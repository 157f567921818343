"""General rules for layers that timm and transformers write out by hand: a BatchNorm over flattened tokens put back
with ``reshape_as`` (LeViT), attention over channels-first maps (``v @ attnᵀ``: EfficientViT-MSRA, SHViT), keys and
values zero-padded along the tokens and relative position logits ``q @ rel_kᵀ`` (HaloNet), RMSNorm written out
(``x * rsqrt(mean(x²) + ε) * γ``: MobileNetV5), a blur pool (reflect padding, then a fixed depthwise kernel:
TResNet), LayerNorm and GroupNorm without β (MetaFormer), rotary position embeddings (EVA's ``cat([-x₂, x₁])``), a
maximum over groups of tokens (Hiera's ``max(dim=1).values``), HGNetV2's concatenation of branches with a learnable
affine shared by every channel and position embeddings looked up by fixed ids (CLIP, SigLIP). Each small model of
that shape converts, reproduces the original with open gates and forgets nothing under AdamW; the uses these rules do
not cover are refused naming the module and line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from convert_checks import assert_a_second_task_forgets_nothing, assert_open_gates_reproduce, filled
from torch import nn

import hatnorm


class FlattenedTokenNorm(nn.Module):
    """LeViT's ``LinearNorm``: a bias-free Linear over tokens, a BatchNorm1d over the tokens of every sample flattened
    into one batch, and back to ``[N, T, C]`` with ``reshape_as``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.linear = nn.Linear(8, 12, bias=False)
        self.bn = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.linear(self.embed(x).flatten(2).transpose(1, 2))
        t = self.bn(t.flatten(0, 1)).reshape_as(t)
        return self.head(t.mean(1))


class ChannelsFirstAttention(nn.Module):
    """EfficientViT-MSRA's and SHViT's attention on a ``[N, C, H, W]`` map: q, k and v as ``[N, C, HW]``, scores
    ``qᵀ @ k`` and the output ``v @ attnᵀ`` (channels × tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.qkv = nn.Sequential(nn.Conv2d(8, 24, 1), nn.BatchNorm2d(24))
        self.proj = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        b, _, height, width = h.shape
        q, k, v = self.qkv(h).flatten(2).split([8, 8, 8], dim=1)
        attn = ((q.transpose(-2, -1) @ k) * 8 ** -0.5).softmax(dim=-1)
        out = (v @ attn.transpose(-2, -1)).view(b, 8, height, width)
        return self.head((h + self.proj(out)).mean((2, 3)))


class PaddedKeysAttention(nn.Module):
    """HaloNet's attention: each query attends to keys and values with zero padding around them along the tokens
    (positions that are always 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.q = nn.Linear(8, 8)
        self.kv = nn.Linear(8, 16)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        k, v = F.pad(self.kv(t), (0, 0, 2, 2)).split(8, dim=-1)
        attn = (self.q(t) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.head((t + attn @ v).mean(1))


class RelativePositionLogits(nn.Module):
    """HaloNet's and BoTNet's relative position logits: q times a parameter of position keys (``q @ rel_kᵀ``),
    shifted by padding and slicing, added to the scores."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 24)
        self.rel_k = nn.Parameter(torch.randn(17, 8) * 0.1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        q, k, v = self.qkv(t).split(8, dim=-1)
        logits = F.pad(q @ self.rel_k.transpose(-1, -2), [0, 1])[..., 1:17]
        attn = (q @ k.transpose(-2, -1) * 8 ** -0.5 + logits).softmax(dim=-1)
        return self.head((t + attn @ v).mean(1))


class WrittenOutRMSNorm(nn.Module):
    """MobileNetV5's ``RmsNorm2d`` as timm writes it: ``x * rsqrt(mean(x², channels) + ε) * γ``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        v = torch.mean(h.pow(2), dim=1, keepdim=True)
        h = h * torch.rsqrt(v + 1e-5) * self.weight.reshape(1, -1, 1, 1)
        return self.head(F.gelu(h).mean((2, 3)))


class BlurPool(nn.Module):
    """TResNet's anti-aliased downsampling: reflect padding (functional, and a ``ReflectionPad2d``), then a fixed
    binomial kernel (a buffer) applied to each channel alone with stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.register_buffer("filt", (torch.tensor([1.0, 2.0, 1.0]).outer(torch.tensor([1.0, 2.0, 1.0])) / 16)
                             .expand(8, 1, 3, 3).contiguous(), persistent=False)
        self.pad = nn.ReflectionPad2d(1)
        self.mix = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(F.pad(self.conv(x), [1, 1, 1, 1], mode="reflect"), self.filt, stride=2, groups=8)
        h = F.conv2d(self.pad(self.mix(h)), self.filt, stride=2, groups=h.shape[1])
        return self.head(h.mean((2, 3)))


class GroupNormNoBias(nn.GroupNorm):
    """MetaFormer's ``GroupNorm1NoBias``: one group, γ only."""

    def __init__(self, num_channels: int) -> None:
        super().__init__(1, num_channels)
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class NoBiasNorms(nn.Module):
    """MetaFormer's ``GroupNorm1NoBias`` and ``LayerNorm2dNoBias`` (γ only, over the channels of a map put last) and
    a LayerNorm with neither γ nor β."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.group = GroupNormNoBias(8)
        self.norm = nn.LayerNorm(8, bias=False)
        self.proj = nn.Linear(8, 8)
        self.plain = nn.LayerNorm(8, elementwise_affine=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.group(self.conv(x)).permute(0, 2, 3, 1)
        h = F.layer_norm(h, self.norm.normalized_shape, self.norm.weight, None, self.norm.eps)
        return self.head(self.plain(self.proj(h)).mean((1, 2)))


class RotaryAttention(nn.Module):
    """EVA's rotary position embedding: q and k rotated by fixed angles per token, ``x * cos + rotate_half(x) * sin``
    with ``rotate_half(x) = cat([-x₂, x₁])``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 24)
        angles = torch.arange(16.0)[:, None] * torch.linspace(0.1, 1.0, 4).repeat(2)[None]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.head = nn.Linear(8, 4)

    def rotated(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * self.cos + torch.cat([-x2, x1], dim=-1) * self.sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        q, k, v = self.qkv(t).split(8, dim=-1)
        return self.head((t + F.scaled_dot_product_attention(self.rotated(q), self.rotated(k), v)).mean(1))


class MaxPooledTokens(nn.Module):
    """Hiera's query pooling: the tokens in groups of 4, the maximum over each group by ``max(dim=1).values``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        pooled = self.proj(t).view(t.shape[0], 4, -1, 8).max(dim=1).values
        return self.head(torch.max(pooled, 1)[0])


class ConcatenatedAffine(nn.Module):
    """HGNetV2's stem: branches each with a learnable affine of one scale and one bias for every channel
    (``scale * x + bias``), concatenated along the channels before their gates."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.bias = nn.Parameter(torch.tensor([0.25]))
        self.mix = nn.Sequential(nn.Conv2d(14, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.scale * self.a(x) + self.bias, self.b(x)], dim=1)
        return self.head(self.mix(h).mean((2, 3)))


class PositionLookup(nn.Module):
    """CLIP's and SigLIP's position embedding: a table looked up by fixed ids (a buffer), added to the patch
    embeddings; a second table looked up functionally (``F.embedding``) by a slice of the ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.position_embedding = nn.Embedding(16, 8)
        self.extra = nn.Parameter(torch.randn(20, 8) * 0.1)
        self.register_buffer("position_ids", torch.arange(16).unsqueeze(0), persistent=False)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        ids = self.position_ids[:, : t.shape[1]]
        t = self.norm(t + self.position_embedding(ids) + F.embedding(ids + 2, self.extra))
        return self.head(t.mean(1))


class UnreadBranch(nn.Module):
    """MetaCLIP 2's vision model: a pooled output through its own LayerNorm that the classifier does not read (it
    reads the mean of the tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.post_layernorm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        self.pooled = self.post_layernorm(t[:, 0])
        return self.head(t.mean(1))


MODELS = {"flattened_token_norm": FlattenedTokenNorm, "channels_first_attention": ChannelsFirstAttention,
          "padded_keys_attention": PaddedKeysAttention,
          "relative_position_logits": RelativePositionLogits, "written_out_rms_norm": WrittenOutRMSNorm,
          "blur_pool": BlurPool, "no_bias_norms": NoBiasNorms, "rotary_attention": RotaryAttention,
          "max_pooled_tokens": MaxPooledTokens, "concatenated_affine": ConcatenatedAffine,
          "position_lookup": PositionLookup, "unread_branch": UnreadBranch}
#: a norm for each kind the models hold
NORM = {"batch": "masked_bn", "layer": "masked_ln", "group": "masked_gn"}


@pytest.mark.parametrize("name", list(MODELS))
def test_open_gates_reproduce_the_original(name: str) -> None:
    assert_open_gates_reproduce(filled(MODELS[name]()), NORM, torch.randn(4, 3, 16, 16))


@pytest.mark.parametrize("name", list(MODELS))
def test_training_a_second_task_forgets_nothing(name: str) -> None:
    assert_a_second_task_forgets_nothing(filled(MODELS[name]()), NORM, torch.randn(4, 3, 16, 16))


class Refused(nn.Module):
    """One use the rules above do not cover, chosen by ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.register_buffer("mixing", torch.randn(8, 8, 1, 1))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.kind == "square root":
            h = h.pow(0.5)  # an infinite gradient at a closed unit's 0
        elif self.kind == "rsqrt":
            h = h * torch.rsqrt(h)  # infinite at a closed unit's 0
        else:
            h = F.conv2d(h, self.mixing)  # a fixed kernel across the channels mixes units
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize(("kind", "message"), [
    ("square root", r"a power of a gated tensor keeps its units for a number exponent ≥ 1 .* got 0\.5"),
    ("rsqrt", r"a function infinite at 0 \(rsqrt, reciprocal\) is supported on a scale or a statistic"),
    ("fixed mixing", r"a functional layer is converted when it reads the weight of a Conv2d"),
])
def test_uses_outside_the_rules_are_refused_naming_the_line(kind: str, message: str) -> None:
    with pytest.raises(hatnorm.ConversionError, match=message) as refused:
        hatnorm.convert(Refused(kind), num_tasks=2, example_input=torch.randn(2, 3, 8, 8))
    assert "test_convert_written_out_layers.py:" in str(refused.value)


def test_a_lookup_by_the_input_ids_is_refused_naming_the_line() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(10, 8)
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.proj(self.embedding(ids)).mean(1))

    with pytest.raises(hatnorm.ConversionError, match=r"module 'embedding' \(Embedding\): a lookup by ids that "
                                                      r"depend on the input .* test_convert_written_out_layers\.py:"):
        hatnorm.convert(Tokens(), num_tasks=2, example_input=torch.randint(0, 10, (2, 5)))

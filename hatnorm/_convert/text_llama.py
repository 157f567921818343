"""Structural conversion of transformers' LLaMA-family language models: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``MistralForCausalLM`` and their ``…ForSequenceClassification`` twins.

The model is rebuilt from gated blocks around its own weights, and with every gate open it computes what the
original computes (``model(input_ids=, attention_mask=, task=, s=)`` → logits ``[N, L, V]`` for a causal LM,
``[N, C_task]`` for a classifier). The rules:

- **Residual stream**: one gate for the whole stream. The token embedding is gated by it (the table, not the
  tokens: :class:`~hatnorm.blocks.StreamEmbedding` without a position table), every block's output projection
  (o_proj, down_proj) has the stream as its output units, and each RMSNorm becomes the chosen rms-family norm (masked
  RMSNorm: statistics over the stream's selected features), γ and eps copied, computed in float32 at least, as
  transformers computes it.
- **Rotary position embedding** rotates feature i of a head with feature i + d/2 (transformers' ``rotate_half``). q
  and k are gated **per pair**: a gate of ``num_heads · d/2`` units whose value is expanded to both features of its
  pair, so a gate closes or opens a rotated pair whole; scaling both features of a pair by one value commutes with the
  rotation. v is not rotated and is gated per feature.
- **Grouped-query attention**: k and v have ``num_kv_heads`` heads, each read by a group of
  ``num_heads / num_kv_heads`` query heads; their gates are per kv head, and o_proj's input feature j of query
  head h has the unit of v's feature j of kv head ``h // group``.
- **SwiGLU** ``down(act(gate_proj x) ⊙ up_proj x)``: the product of two tensors of the same hidden units gets one
  gate, applied once (folded into up_proj's rows); gate_proj's and up_proj's rows are both protected by it and
  down_proj's input units are the same gate. A closed unit's product is 0 whatever the activation gives, so the
  activation need only act on every value alone, with no parameters of its own.
- q/k/v (and o_proj, MLP) biases (Qwen2's q/k/v, Llama's ``attention_bias``/``mlp_bias``) are gated with their rows.
- **Masks**: causal, the padding of ``attention_mask`` on the keys, and a sliding window where the model has one
  (Mistral's ``sliding_window`` on every layer; Qwen2's on the layers ``layer_types`` names ``sliding_attention``):
  key j is seen from query i when i − window < j ≤ i. Attention dropout (``attention_dropout``) in training.
- **Heads**: a causal LM keeps one :class:`~hatnorm.blocks.SharedLMHead` over the shared vocabulary, its columns
  (stream units) protected; with ``tie_word_embeddings`` it *is* the embedding table, one parameter wired once, as
  the embedding, whose per-column multipliers are the head's. A classifier gets one head per task (copies of
  ``score`` when ``num_classes`` is ``None``) read at the last token that is not ``config.pad_token_id``, as
  transformers pools.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hatnorm._checks import check_task, check_training_scale
from hatnorm._convert.error import ConversionError
from hatnorm._convert.norms import Norms, make_norm
from hatnorm._convert.probes import unitwise_failure
from hatnorm._gate import HATGate
from hatnorm._hat import HATModule, Layer
from hatnorm._heads import TaskHeads
from hatnorm._masks import MaskSource, Select
from hatnorm._norm_protocol import MaskedNorm
from hatnorm._norm_registry import NormSpec
from hatnorm._transformer import SharedLMHead, StreamEmbedding, gated_linear


def _rms(norm: MaskedNorm, x: Tensor, stream: Tensor, task: int) -> Tensor:
    """The stream's RMSNorm computed in float32 for a half-precision model, as transformers' LLaMA-family RMSNorm
    computes it (a float64 model keeps float64)."""
    return norm(x.to(torch.promote_types(x.dtype, torch.float32)), stream, task, trusted=True).to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _pairs(gate: Tensor, num_heads: int) -> Tensor:
    """A per-pair gate ``[num_heads · d/2]`` expanded to the features ``[num_heads · d]``: feature j of a head has pair
    j mod d/2 (transformers rotates feature j with j + d/2)."""
    return gate.view(num_heads, -1).repeat(1, 2).reshape(-1)


def _pair_index(num_heads: int, dim_head: int) -> Tensor:
    """The pair unit of every q/k feature, as :func:`_pairs` expands the gate."""
    half = dim_head // 2
    return (torch.arange(num_heads)[:, None] * half + torch.arange(dim_head)[None, :] % half).reshape(-1)


def _linear(source: nn.Module, where: str) -> nn.Linear:
    if type(source) is not nn.Linear:
        raise ConversionError(f"module: {where} must be an nn.Linear, got {type(source).__name__}")
    return nn.Linear(source.in_features, source.out_features, bias=source.bias is not None)


class RotaryAttention(nn.Module):
    """Pre-norm grouped-query attention with rotary position embedding, q/k gated per rotated pair, v per feature.

    Args:
        attention: the transformers attention module whose projections this mirrors (weights copied later).
        norm: the pre-norm.
        num_tasks: number of tasks.
        s_max: the gates' largest scale.
        window: the sliding window of its keys, or ``None``.
        where: the attention's path in the original, for messages.
    """

    def __init__(self, attention: nn.Module, norm: MaskedNorm, *, num_tasks: int, s_max: float,
                 window: int | None, where: str) -> None:
        super().__init__()
        self.dim_head = int(attention.head_dim)
        self.to_q, self.to_k, self.to_v, self.to_out = (
            _linear(getattr(attention, name), f"{where}.{name}") for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.num_heads = self.to_q.out_features // self.dim_head
        self.num_kv_heads = self.to_k.out_features // self.dim_head
        self.group = self.num_heads // self.num_kv_heads
        self.scaling = float(attention.scaling)
        self.dropout = float(attention.attention_dropout)
        self.window = window
        self.norm = norm
        half = self.dim_head // 2
        self.gate_q = HATGate(self.num_heads * half, num_tasks=num_tasks, s_max=s_max)
        self.gate_k = HATGate(self.num_kv_heads * half, num_tasks=num_tasks, s_max=s_max)
        self.gate_v = HATGate(self.num_kv_heads * self.dim_head, num_tasks=num_tasks, s_max=s_max)

    def forward(self, x: Tensor, stream: Tensor, task: int, s: float | Tensor | None, rotary: tuple[Tensor, Tensor],
                mask: Tensor) -> Tensor:
        """The gated update ``[N, L, D]`` of the stream ``x`` (task and scale checked by the model); ``rotary``: cos
        and sin ``[1, L, d]``; ``mask``: which keys each query sees, bool ``[N or 1, 1, L, L]``."""
        h = _rms(self.norm, x, stream, task)
        cos, sin = (t[:, None] for t in rotary)

        def split(proj: nn.Linear, gate: Tensor, count: int) -> Tensor:
            return gated_linear(h, proj, gate).unflatten(-1, (count, self.dim_head)).transpose(1, 2)

        q = split(self.to_q, _pairs(self.gate_q(task, s, trusted=True), self.num_heads), self.num_heads)
        k = split(self.to_k, _pairs(self.gate_k(task, s, trusted=True), self.num_kv_heads), self.num_kv_heads)
        v = split(self.to_v, self.gate_v(task, s, trusted=True), self.num_kv_heads)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        # query head h reads kv head h // group
        k, v = k.repeat_interleave(self.group, dim=1), v.repeat_interleave(self.group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling,
                                             dropout_p=self.dropout if self.training else 0.0)
        return gated_linear(out.transpose(1, 2).flatten(2), self.to_out, stream)

    def wiring(self, stream: HATGate) -> list[Layer]:
        q_units = Select(self.gate_q, _pair_index(self.num_heads, self.dim_head))
        k_units = Select(self.gate_k, _pair_index(self.num_kv_heads, self.dim_head))
        # o_proj's input feature j of query head h: v's feature j of kv head h // group
        head = torch.arange(self.num_heads)[:, None] // self.group
        o_units = Select(self.gate_v, (head * self.dim_head + torch.arange(self.dim_head)[None, :]).reshape(-1))
        return [Layer(self.norm, out=stream), Layer(self.to_q, out=q_units, inp=stream),
                Layer(self.to_k, out=k_units, inp=stream), Layer(self.to_v, out=self.gate_v, inp=stream),
                Layer(self.to_out, out=stream, inp=o_units)]

    def load_from(self, attention: nn.Module) -> None:
        for mine, name in zip((self.to_q, self.to_k, self.to_v, self.to_out), ("q_proj", "k_proj", "v_proj", "o_proj"),
                              strict=True):
            mine.load_state_dict(getattr(attention, name).state_dict())


class SwiGLU(nn.Module):
    """Pre-norm gated MLP ``down(act(gate_proj h) ⊙ up_proj h)`` with one gate on the product's hidden units.

    Args:
        mlp: the transformers MLP whose projections this mirrors (weights copied later).
        norm: the pre-norm.
        num_tasks: number of tasks.
        s_max: the gates' largest scale.
        where: the MLP's path in the original, for messages.
    """

    def __init__(self, mlp: nn.Module, norm: MaskedNorm, *, num_tasks: int, s_max: float, where: str) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (
            _linear(getattr(mlp, name), f"{where}.{name}") for name in ("gate_proj", "up_proj", "down_proj"))
        self.activation = copy.deepcopy(mlp.act_fn)
        self.norm = norm
        self.gate = HATGate(self.up_proj.out_features, num_tasks=num_tasks, s_max=s_max)

    def forward(self, x: Tensor, stream: Tensor, task: int, s: float | Tensor | None) -> Tensor:
        """The gated update ``[N, L, D]`` of the stream ``x`` (task and scale checked by the model)."""
        h = _rms(self.norm, x, stream, task)
        product = self.activation(F.linear(h, self.gate_proj.weight, self.gate_proj.bias)) * gated_linear(
            h, self.up_proj, self.gate(task, s, trusted=True))
        return gated_linear(product, self.down_proj, stream)

    def wiring(self, stream: HATGate) -> list[Layer]:
        return [Layer(self.norm, out=stream), Layer(self.gate_proj, out=self.gate, inp=stream),
                Layer(self.up_proj, out=self.gate, inp=stream), Layer(self.down_proj, out=stream, inp=self.gate)]

    def load_from(self, mlp: nn.Module) -> None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(self, name).load_state_dict(getattr(mlp, name).state_dict())


class ConvertedLlama(HATModule):
    """A LLaMA-family causal LM or sequence classifier rebuilt with gates (see the module docstring):
    ``model(input_ids=, attention_mask=, task=t, s=s)`` → logits."""

    def __init__(self, module: nn.Module, *, num_tasks: int, spec: NormSpec, num_classes: list[int] | None,
                 s_max: float) -> None:
        super().__init__()
        base, config = module.model, module.config
        self.causal = hasattr(module, "lm_head")
        self.pad_token_id = None if self.causal else config.pad_token_id
        embed = base.embed_tokens
        vocab_size, dim = embed.weight.shape
        self.num_tasks = num_tasks
        self.embedding = StreamEmbedding(vocab_size, dim)
        self.gate_stream = HATGate(dim, num_tasks=num_tasks, s_max=s_max)
        self.rotary = copy.deepcopy(base.rotary_emb)
        windows = _windows(config, len(base.layers))
        self.attentions, self.feedforwards = nn.ModuleList(), nn.ModuleList()
        for i, (layer, window) in enumerate(zip(base.layers, windows, strict=True)):
            where = f"model.layers.{i}"
            _check_activation(layer.mlp.act_fn, config.hidden_act)
            self.attentions.append(RotaryAttention(layer.self_attn, _norm(layer.input_layernorm, spec, num_tasks,
                                                                          f"{where}.input_layernorm"),
                                                   num_tasks=num_tasks, s_max=s_max, window=window,
                                                   where=f"{where}.self_attn"))
            self.feedforwards.append(SwiGLU(layer.mlp, _norm(layer.post_attention_layernorm, spec, num_tasks,
                                                             f"{where}.post_attention_layernorm"),
                                            num_tasks=num_tasks, s_max=s_max, where=f"{where}.mlp"))
        self.norm = _norm(base.norm, spec, num_tasks, "model.norm")
        if self.causal:
            self.head: nn.Module = SharedLMHead(dim, vocab_size)
        else:
            score = module.score
            self.head = TaskHeads(dim, num_classes or [score.out_features] * num_tasks, num_tasks=num_tasks,
                                  bias=score.bias is not None)
        weight = embed.weight
        self.to(device=weight.device, dtype=weight.dtype)
        self._load(module, num_classes is None)

    @torch.no_grad()
    def _load(self, module: nn.Module, copy_head: bool) -> None:
        base = module.model
        self.embedding.token.copy_(base.embed_tokens.weight)
        # the norms again: make_norm loaded γ before the model took the original's dtype
        self.norm.load_state_dict(base.norm.state_dict())
        for attention, feedforward, layer in zip(self.attentions, self.feedforwards, base.layers, strict=True):
            attention.load_from(layer.self_attn)
            feedforward.load_from(layer.mlp)
            attention.norm.load_state_dict(layer.input_layernorm.state_dict())
            feedforward.norm.load_state_dict(layer.post_attention_layernorm.state_dict())
        if self.causal:
            if module.lm_head.weight is base.embed_tokens.weight:  # tie_word_embeddings: one parameter, two uses
                self.head.weight = self.embedding.token
            else:
                self.head.weight.copy_(module.lm_head.weight)
        elif copy_head:
            for head in self.head.heads:
                head.load_state_dict(module.score.state_dict())

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, task: int,
                s: float | Tensor | None = None) -> Tensor:
        """The logits of task ``task`` for token ids ``input_ids`` ``[N, L]`` (``attention_mask`` ``[N, L]``: 1 on the
        tokens, 0 on the padding): ``[N, L, V]`` for a causal LM, ``[N, C_task]`` for a classifier."""
        keep = _check_ids(input_ids, attention_mask, self.embedding.token)
        task = check_task(task, self.num_tasks)
        s = check_training_scale(s, self.training)
        stream = self.gate_stream(task, s, trusted=True)
        x = self.embedding(input_ids, stream)
        length = input_ids.shape[1]
        rotary = self.rotary(x, torch.arange(length, device=x.device)[None])
        masks = {w: _keys(keep, length, w, x.device) for w in {a.window for a in self.attentions}}
        for attention, feedforward in zip(self.attentions, self.feedforwards, strict=True):
            x = x + attention(x, stream, task, s, rotary, masks[attention.window])
            x = x + feedforward(x, stream, task, s)
        h = _rms(self.norm, x, stream, task)
        if self.causal:
            return self.head(h)
        return self.head(h[torch.arange(h.shape[0], device=h.device), self._last_token(input_ids)], task, trusted=True)

    def _last_token(self, input_ids: Tensor) -> Tensor | int:
        """transformers' pooling: the last token that is not ``pad_token_id`` (the last token when none is set)."""
        if self.pad_token_id is None:
            if input_ids.shape[0] != 1:
                raise ValueError(f"input_ids: a classifier without config.pad_token_id takes one sequence at a time, "
                                 f"as transformers' does, got a batch of {input_ids.shape[0]}")
            return -1
        tokens = (input_ids != self.pad_token_id).to(torch.int32)
        return (torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.int32) * tokens).argmax(-1)

    def hat_layers(self) -> list[Layer]:
        stream = self.gate_stream
        layers = [Layer(self.embedding, out=stream), Layer(self.norm, out=stream)]
        if self.causal and self.head.weight is not self.embedding.token:  # a tied head is listed once, as the table
            layers.append(Layer(self.head, out=stream))
        for attention, feedforward in zip(self.attentions, self.feedforwards, strict=True):
            layers += attention.wiring(stream) + feedforward.wiring(stream)
        return layers

    def head_units(self) -> MaskSource:
        return self.gate_stream


def _norm(source: nn.Module, spec: NormSpec, num_tasks: int, where: str) -> MaskedNorm:
    """The rms-family norm standing for a transformers RMSNorm (γ ``weight``, ``variance_epsilon``)."""
    weight, eps = getattr(source, "weight", None), getattr(source, "variance_epsilon", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        raise ConversionError(f"module: {where} must be an RMSNorm with a weight [D] and a float variance_epsilon, "
                              f"got {type(source).__name__}")
    rms = nn.RMSNorm(weight.shape[0], eps=eps, dtype=weight.dtype)
    with torch.no_grad():
        rms.weight.copy_(weight)
    return make_norm(rms, spec, num_tasks, where)


def _windows(config: object, depth: int) -> list[int | None]:
    """Every layer's sliding window of keys (``None``: all earlier keys), as the model's own masks give them."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral":
        return [window] * depth
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * depth
    unknown = sorted(set(kinds) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ConversionError(f"module: config.layer_types may hold 'full_attention' and 'sliding_attention', got "
                              f"{unknown}")
    return [window if kind == "sliding_attention" else None for kind in kinds]


def _keys(keep: Tensor | None, length: int, window: int | None, device: torch.device) -> Tensor:
    """Which keys each query sees, bool ``[N or 1, 1, L, L]``: causal, within ``window``, and not padding."""
    query, key = torch.arange(length, device=device)[:, None], torch.arange(length, device=device)[None, :]
    seen = key <= query
    if window is not None:
        seen = seen & (key > query - window)
    return seen[None, None] if keep is None else seen & keep[:, None, None, :]


def _check_ids(input_ids: object, attention_mask: object, table: Tensor) -> Tensor | None:
    """Check the token ids ``[N, L]`` and the optional 0/1 ``attention_mask`` of their shape; the mask as bool."""
    vocab_size = table.shape[0]
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point or \
            input_ids.dtype == torch.bool or 0 in input_ids.shape:
        given = (f"shape {list(input_ids.shape)} and dtype {input_ids.dtype}" if isinstance(input_ids, Tensor)
                 else repr(input_ids))
        raise TypeError(f"input_ids must be a tensor of token ids [N, L] (an integer dtype, N, L ≥ 1), got {given}")
    if input_ids.device != table.device:
        raise ValueError(f"input_ids must be on the model's device {table.device}, got {input_ids.device}")
    if not torch.compiler.is_compiling() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"input_ids must be token ids in [0, {vocab_size}), got values in [{int(input_ids.min())}, "
                         f"{int(input_ids.max())}]")
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape or \
            attention_mask.device != input_ids.device:
        given = (f"shape {list(attention_mask.shape)} on {attention_mask.device}" if isinstance(attention_mask, Tensor)
                 else repr(attention_mask))
        raise ValueError(f"attention_mask must be None or a 0/1 tensor of input_ids' shape {list(input_ids.shape)} on "
                         f"its device, got {given}")
    keep = attention_mask.bool()
    if not torch.compiler.is_compiling() and not bool((attention_mask == keep).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    return keep


def _check_activation(activation: nn.Module, name: object) -> None:
    """Refuse an activation with parameters (every unit would share them) or one that mixes values; f(0) may be
    anything: the SwiGLU gate closes the product."""
    parameters = sum(p.numel() for p in activation.parameters())
    failure = unitwise_failure(activation, (2, 5, 8), zero=False)
    if parameters:
        failure = f"has {parameters} parameter(s) shared by every unit, which no gate can protect"
    if failure is not None:
        raise ConversionError(f"module: config.hidden_act={name!r} ({type(activation).__name__}) {failure}; the MLP's "
                              "activation must act on every value alone")


def convert_llama(module: nn.Module, *, num_tasks: int, norms: Norms, num_classes: list[int] | None,
                  s_max: float) -> ConvertedLlama:
    """Convert a transformers ``LlamaFor…``, ``Qwen2For…`` or ``MistralFor…`` causal LM or sequence classifier (see
    the module docstring)."""
    if not hasattr(module, "lm_head") and not isinstance(getattr(module, "score", None), nn.Linear):
        raise ConversionError(f"module: a {type(module).__name__} needs an nn.Linear lm_head or score, found neither")
    if hasattr(module, "lm_head") and num_classes is not None and set(num_classes) != {module.config.vocab_size}:
        raise ConversionError(f"num_classes: a causal LM predicts its vocabulary over one shared head: None or "
                              f"{module.config.vocab_size} for every task, got {num_classes}")
    if hasattr(module, "lm_head") and (type(module.lm_head) is not nn.Linear or module.lm_head.bias is not None):
        raise ConversionError(f"module: lm_head must be an nn.Linear without a bias, got {module.lm_head}")
    converted = ConvertedLlama(module, num_tasks=num_tasks, spec=norms.for_kind("rms"), num_classes=num_classes,
                               s_max=s_max)
    return converted.train(module.training)

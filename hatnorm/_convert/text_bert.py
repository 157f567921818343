"""Structural conversion of transformers' BERT-family classifiers (``BertForSequenceClassification``,
``RobertaForSequenceClassification``, ``DistilBertForSequenceClassification``), and the text-model parts GPT-2's
converter (:mod:`.text_gpt2`) shares.

A text model is rebuilt from hatnorm's gated blocks around its own weights: the token, position and token-type
tables become a :class:`~hatnorm.blocks.StreamEmbedding` protected per unit of the residual stream, each layer a
:class:`TextBlock` (hatnorm's :class:`~hatnorm.blocks.GatedAttention` and :class:`~hatnorm.blocks.GatedFeedForward`,
run with the original's norm placement, dropouts and attention scale), every LayerNorm the chosen layer-family norm
with γ, β and eps copied.

BERT, RoBERTa and DistilBERT are post-norm: x ← a ⊙ LN(x + f(x)), where a is the stream's gate and the norm reads
the *ungated* sum, as the embeddings' LayerNorm reads the ungated sum of the tables; a masked LayerNorm takes its
statistics over the task's units only, so what later tasks write into the other units never reaches an earlier
task. The pooler (dense and tanh on the first token; RoBERTa's classification head's dense and tanh; DistilBERT's
pre-classifier and ReLU) is a gated layer (tanh(0) = relu(0) = 0 keeps a closed unit at 0) and the final projection
one head per task. The padding mask masks keys as the original does; RoBERTa's position ids count the non-padding
tokens from ``padding_idx + 1``, as transformers computes them from ``input_ids``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from hatnorm._checks import check_task_and_scale
from hatnorm._convert.error import ConversionError
from hatnorm._convert.norms import Norms
from hatnorm._convert.probes import unitwise_failure
from hatnorm._gate import HATGate
from hatnorm._hat import HATModule, Layer
from hatnorm._heads import TaskHeads
from hatnorm._masks import MaskSource
from hatnorm._norm_protocol import MaskedNorm
from hatnorm._norm_registry import NormSpec, get_norm, list_norms
from hatnorm._transformer import GatedAttention, GatedFeedForward, StreamEmbedding, gated_linear

#: a layer's weight ``[out, in]`` (nn.Linear's layout) and bias ``[out]``
Affine = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class LayerSource:
    """One transformer layer of the original, its projections in nn.Linear's layout.

    Attributes:
        q, k, v, out: the attention's projections.
        fc1, fc2: the MLP's projections.
        attention_norm, feedforward_norm: the LayerNorms of the attention and of the MLP.
        activation: the MLP's activation.
        option: the config option that chose it, as ``config.hidden_act='gelu'``, for messages.
        where: the layer's path in the original, for messages.
    """

    q: Affine
    k: Affine
    v: Affine
    out: Affine
    fc1: Affine
    fc2: Affine
    attention_norm: nn.LayerNorm
    feedforward_norm: nn.LayerNorm
    activation: nn.Module
    option: str
    where: str


@dataclass(frozen=True)
class TextSource:
    """What a converted text model's body takes from the original.

    Attributes:
        token, position, token_type: the embedding tables (``None`` for a model without one).
        embedding_norm: the LayerNorm of the embeddings' sum (post-norm models), or ``None``.
        layers: the transformer layers.
        num_heads: attention heads.
        post: whether the norms follow the residual sums (BERT) rather than precede the blocks (GPT-2).
        dropout: the dropout of the embeddings.
        attention_output_dropout, feedforward_dropout, attention_dropout: the dropouts of the attention's update, the
            MLP's update and the attention probabilities.
        scales: each layer's attention scale (``None``: 1/√head_dim).
        where: the path of the original's body (``module.bert``), for messages.
    """

    token: Tensor
    position: Tensor | None
    token_type: Tensor | None
    embedding_norm: nn.LayerNorm | None
    layers: list[LayerSource]
    num_heads: int
    post: bool
    dropout: float
    attention_output_dropout: float
    feedforward_dropout: float
    attention_dropout: float
    scales: list[float | None]
    where: str


def text_norm(module: nn.LayerNorm, spec: NormSpec, num_tasks: int, where: str) -> MaskedNorm:
    """The layer-family norm standing for ``module``: its γ, β and eps, in its dtype and on its device."""
    try:
        options = spec.options_from(module)
    except ValueError as error:
        fitting = [n for n in list_norms() if isinstance(module, get_norm(n).replaces)]
        raise ConversionError(f"norm: {where}: {error}; norms that replace {type(module).__name__}: "
                              f"{fitting}") from None
    norm = spec.layer(num_tasks=num_tasks, **options)(module.normalized_shape[-1]).to(module.weight)
    if any(True for _ in norm.parameters()):
        norm.load_state_dict(module.state_dict())
    return norm


def check_activation(activation: nn.Module, option: str) -> None:
    """Refuse an MLP activation that would open a closed unit: judged by what it does on a probe (f(0) = 0, on every
    value alone), and one with parameters, which every unit would share."""
    parameters = sum(p.numel() for p in activation.parameters())
    failure = (f"has {parameters} parameter(s) shared by every unit, which no gate can protect" if parameters
               else unitwise_failure(activation, (2, 5, 8)))
    if failure is not None:
        raise ConversionError(f"module: {option} ({type(activation).__name__}) {failure}; the MLP's activation must "
                              "act on every value alone and map 0 to 0 (relu, gelu, gelu_new, silu, tanh…)")


def copy_affine(linear: nn.Linear, source: Affine) -> None:
    """Copy ``source``'s weight and bias into ``linear`` (already in their dtype)."""
    weight, bias = source
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)


def _project(h: Tensor, linear: nn.Linear, gate: Tensor | None) -> Tensor:
    return F.linear(h, linear.weight, linear.bias) if gate is None else gated_linear(h, linear, gate)


class TextBlock(nn.Module):
    """One transformer layer of a converted text model: hatnorm's gated attention and MLP, pre- or post-norm.

    Pre-norm (GPT-2): x ← x + a ⊙ f(LN(x)), the stream read by each norm already gated. Post-norm (BERT):
    x ← a ⊙ LN(x + f(x)), f's update not gated before the norm; there the attention's and the MLP's ``norm`` is the
    LayerNorm after them, and this forward (not theirs) runs them. Dropouts and the attention scale are the original's.

    Args:
        source: the original layer.
        num_heads: attention heads.
        num_tasks: number of tasks.
        spec: the norm replacing the layer's LayerNorms.
        s_max: the gates' largest scale.
        post: post-norm rather than pre-norm.
        dropouts: the dropouts of the attention's update, of the MLP's update and of the attention probabilities.
        scale: the attention scale (``None``: 1/√head_dim).
    """

    def __init__(self, source: LayerSource, *, num_heads: int, num_tasks: int, spec: NormSpec, s_max: float, post: bool,
                 dropouts: tuple[float, float, float], scale: float | None) -> None:
        super().__init__()
        check_activation(source.activation, source.option)
        dim, hidden = source.q[0].shape[1], source.fc1[0].shape[0]
        norms = (text_norm(source.attention_norm, spec, num_tasks, f"{source.where}'s attention LayerNorm"),
                 text_norm(source.feedforward_norm, spec, num_tasks, f"{source.where}'s MLP LayerNorm"))
        self.attention = GatedAttention(dim, num_heads=num_heads, dim_head=dim // num_heads, num_tasks=num_tasks,
                                        norm_layer=lambda _: norms[0], s_max=s_max, qkv_bias=True)
        self.feedforward = GatedFeedForward(dim, hidden, num_tasks=num_tasks, norm_layer=lambda _: norms[1],
                                            s_max=s_max, activation=copy.deepcopy(source.activation))
        self.to(source.q[0])
        attention, feedforward = self.attention, self.feedforward
        for linear, affine in ((attention.to_q, source.q), (attention.to_k, source.k), (attention.to_v, source.v),
                               (attention.to_out, source.out), (feedforward.fc1, source.fc1),
                               (feedforward.fc2, source.fc2)):
            copy_affine(linear, affine)
        self.post, self.scale, self.attention_dropout = post, scale, dropouts[2]
        self.attention_output_dropout = nn.Dropout(dropouts[0])
        self.feedforward_dropout = nn.Dropout(dropouts[1])

    def forward(self, x: Tensor, stream_gate: Tensor, task: int, s: float | Tensor | None, mask: Tensor) -> Tensor:
        """The stream ``[N, L, D]`` after this layer (``task`` and ``s`` checked by the model; ``mask``: which keys
        each query attends to, a bool ``[N, 1, L, L]``)."""
        attention, feedforward = self.attention, self.feedforward
        out_gate = None if self.post else stream_gate
        h = x if self.post else attention.norm(x, stream_gate, task, trusted=True)
        q, k, v = (rearrange(gated_linear(h, proj, gate(task, s, trusted=True)), "b n (h d) -> b h n d",
                             h=attention.num_heads)
                   for proj, gate in ((attention.to_q, attention.gate_q), (attention.to_k, attention.gate_k),
                                      (attention.to_v, attention.gate_v)))
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        x = x + self.attention_output_dropout(_project(rearrange(h, "b h n d -> b n (h d)"), attention.to_out,
                                                       out_gate))
        if self.post:
            x = attention.norm(x, stream_gate, task, trusted=True)
        h = x if self.post else feedforward.norm(x, stream_gate, task, trusted=True)
        h = feedforward.activation(gated_linear(h, feedforward.fc1, feedforward.gate(task, s, trusted=True)))
        x = x + self.feedforward_dropout(_project(h, feedforward.fc2, out_gate))
        return feedforward.norm(x, stream_gate, task, trusted=True) if self.post else x

    def wiring(self, stream: HATGate) -> list[Layer]:
        return self.attention.wiring(stream) + self.feedforward.wiring(stream)


class TextBody(nn.Module):
    """The embeddings and layers of a converted text model, with the residual stream's gate.

    Args:
        source: what the original holds.
        num_tasks: number of tasks.
        spec: the norm replacing the LayerNorms.
        s_max: the gates' largest scale.
    """

    def __init__(self, source: TextSource, *, num_tasks: int, spec: NormSpec, s_max: float) -> None:
        super().__init__()
        vocab_size, dim = source.token.shape
        self.gate_stream = HATGate(dim, num_tasks=num_tasks, s_max=s_max)
        self.embedding = StreamEmbedding(
            vocab_size, dim, max_length=None if source.position is None else source.position.shape[0],
            type_vocab_size=None if source.token_type is None else source.token_type.shape[0]).to(source.token)
        with torch.no_grad():
            for name, table in (("token", source.token), ("position", source.position),
                                ("token_type", source.token_type)):
                if table is not None:
                    getattr(self.embedding, name).copy_(table)
        self.embedding_norm = (None if source.embedding_norm is None else text_norm(
            source.embedding_norm, spec, num_tasks, f"{source.where}.embeddings.LayerNorm"))
        self.dropout = nn.Dropout(source.dropout)
        dropouts = (source.attention_output_dropout, source.feedforward_dropout, source.attention_dropout)
        self.blocks = nn.ModuleList(
            TextBlock(layer, num_heads=source.num_heads, num_tasks=num_tasks, spec=spec, s_max=s_max, post=source.post,
                      dropouts=dropouts, scale=scale)
            for layer, scale in zip(source.layers, source.scales, strict=True))

    @property
    def max_length(self) -> int | None:
        """The positions of the learned position table, or ``None`` without one."""
        return None if self.embedding.position is None else self.embedding.position.shape[0]

    def forward(self, input_ids: Tensor, mask: Tensor, task: int, s: float | Tensor | None, *,
                position_ids: Tensor | None = None, token_type_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The stream ``[N, L, D]`` after the last layer, and the stream's gate values (``task`` and ``s`` checked by
        the model)."""
        stream_gate = self.gate_stream(task, s, trusted=True)
        if self.embedding_norm is None:  # pre-norm: the stream starts as the gated tables' sum
            x = self.embedding(input_ids, stream_gate, position_ids=position_ids, token_type_ids=token_type_ids)
        else:  # post-norm: the norm reads the ungated sum, the tables protected per stream unit all the same
            x = self.embedding(input_ids, torch.ones_like(stream_gate), position_ids=position_ids,
                               token_type_ids=token_type_ids)
            x = self.embedding_norm(x, stream_gate, task, trusted=True)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, stream_gate, task, s, mask)
        return x, stream_gate

    def wiring(self) -> list[Layer]:
        stream = self.gate_stream
        layers = [Layer(self.embedding, out=stream)]
        if self.embedding_norm is not None:
            layers.append(Layer(self.embedding_norm, out=stream))
        return layers + [layer for block in self.blocks for layer in block.wiring(stream)]


def check_text_inputs(input_ids: object, attention_mask: object, token_type_ids: object, *, max_length: int | None,
                      device: torch.device) -> None:
    """Check a text model's inputs: ``input_ids`` an integer ``[N, L]`` (N, L ≥ 1, L ≤ ``max_length``), and the
    optional ``attention_mask`` and ``token_type_ids`` of its shape, all on ``device``."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        given = f"shape {list(input_ids.shape)}" if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a tensor [N, L] of token ids with N, L ≥ 1, got {given}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if max_length is not None and input_ids.shape[1] > max_length:
        raise ValueError(f"input_ids must have at most {max_length} tokens (the position embedding's), got "
                         f"{input_ids.shape[1]}")
    for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask),
                        ("token_type_ids", token_type_ids)):
        if value is None:
            continue
        if not isinstance(value, Tensor) or value.shape != input_ids.shape:
            given = f"shape {list(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a tensor of input_ids' shape {list(input_ids.shape)}, got {given}")
        if value.device != device:
            raise ValueError(f"{name} must be on the model's device {device}, got {value.device}")


def attention_mask_for(input_ids: Tensor, attention_mask: Tensor | None, *, causal: bool) -> Tensor:
    """Which keys each query attends to, a bool ``[N, 1, L, L]``: the tokens ``attention_mask`` keeps (every token
    without one), the earlier ones only when ``causal``. A query left with no key (a padding token before every real
    one) attends to itself alone, so no row is empty; its output reaches no other token."""
    n, length = input_ids.shape
    device = input_ids.device
    keys = (torch.ones(n, length, dtype=torch.bool, device=device) if attention_mask is None
            else attention_mask.bool())
    allowed = keys[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed = allowed.expand(n, 1, length, length)
    empty = ~allowed.any(-1, keepdim=True)
    return allowed | (empty & torch.eye(length, dtype=torch.bool, device=device))


class ConvertedTextEncoder(HATModule):
    """A converted BERT-family classifier: ``model(input_ids=, attention_mask=, token_type_ids=, task=, s=)`` →
    logits ``[N, C_task]`` of the first token's pooled state.

    Args:
        source: the body's parts.
        pooler: the dense layer on the first token.
        pool_activation: ``"tanh"`` or ``"relu"``, after it.
        pool_dropouts: the dropouts before the pooler and after its activation.
        classifier: the original's final projection.
        num_tasks: number of tasks.
        spec: the norm replacing the LayerNorms.
        num_classes: the class count of each task, or ``None`` for copies of ``classifier``.
        s_max: the gates' largest scale.
        padding_idx: RoBERTa's: position ids count the non-padding tokens from ``padding_idx + 1``; ``None``:
            positions 0..L−1.
    """

    def __init__(self, source: TextSource, *, pooler: nn.Linear, pool_activation: str,
                 pool_dropouts: tuple[float, float], classifier: nn.Linear, num_tasks: int, spec: NormSpec,
                 num_classes: list[int] | None, s_max: float, padding_idx: int | None) -> None:
        super().__init__()
        self.body = TextBody(source, num_tasks=num_tasks, spec=spec, s_max=s_max)
        dim = source.token.shape[1]
        self.pooler = nn.Linear(dim, pooler.out_features).to(pooler.weight)
        copy_affine(self.pooler, (pooler.weight, pooler.bias))
        self.gate_pool = HATGate(pooler.out_features, num_tasks=num_tasks, s_max=s_max)
        self.pool_activation = {"tanh": torch.tanh, "relu": F.relu}[pool_activation]
        self.pool_dropout_before, self.pool_dropout_after = (nn.Dropout(p) for p in pool_dropouts)
        self.task_heads = TaskHeads(pooler.out_features, num_classes or [classifier.out_features] * num_tasks,
                               num_tasks=num_tasks, bias=classifier.bias is not None)
        self.num_tasks = self.task_heads.num_tasks
        self.padding_idx = padding_idx
        self.to(pooler.weight)
        if num_classes is None:
            for head in self.task_heads.heads:
                head.load_state_dict(classifier.state_dict())

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                *, task: int, s: float | Tensor | None = None) -> Tensor:
        """The logits ``[N, C_task]`` of task ``task`` for ``input_ids`` ``[N, L]``, with the padding
        ``attention_mask`` (1 for a token, 0 for padding) and the segments ``token_type_ids`` (0 without) where the
        original takes them."""
        embedding = self.body.embedding
        offset = 0 if self.padding_idx is None else self.padding_idx + 1
        max_length = None if self.body.max_length is None else self.body.max_length - offset
        check_text_inputs(input_ids, attention_mask, token_type_ids, max_length=max_length,
                          device=embedding.token.device)
        if token_type_ids is not None and embedding.token_type is None:
            raise ValueError("token_type_ids: this model has no token-type embedding (DistilBERT takes none); "
                             "pass None")
        task, s = check_task_and_scale(task, s, num_tasks=self.num_tasks, training=self.training)
        position_ids = None
        if self.padding_idx is not None:  # RoBERTa: the non-padding tokens count from padding_idx + 1
            tokens = input_ids.ne(self.padding_idx).long()
            position_ids = tokens.cumsum(1) * tokens + self.padding_idx
        mask = attention_mask_for(input_ids, attention_mask, causal=False)
        x, _ = self.body(input_ids, mask, task, s, position_ids=position_ids, token_type_ids=token_type_ids)
        pool_gate = self.gate_pool(task, s, trusted=True)
        pooled = self.pool_activation(gated_linear(self.pool_dropout_before(x[:, 0]), self.pooler, pool_gate))
        return self.task_heads(self.pool_dropout_after(pooled), task, trusted=True)

    def hat_layers(self) -> list[Layer]:
        return [*self.body.wiring(), Layer(self.pooler, out=self.gate_pool, inp=self.body.gate_stream)]

    def head_units(self) -> MaskSource:
        return self.gate_pool


def _linear(linear: nn.Linear) -> Affine:
    return linear.weight, linear.bias


def _refuse_decoder(config: object) -> None:
    for option in ("is_decoder", "add_cross_attention"):
        if getattr(config, option, False):
            raise ConversionError(f"module: config.{option}=True is not supported: a BERT-family classifier converts "
                                  "as an encoder (bidirectional self-attention, no cross-attention)")


def _bert_source(module: nn.Module, encoder: nn.Module, name: str) -> TextSource:
    """The parts of a BERT or RoBERTa encoder (``module.bert`` or ``module.roberta``)."""
    config = module.config
    _refuse_decoder(config)
    embeddings = encoder.embeddings
    layers = [LayerSource(q=_linear(layer.attention.self.query), k=_linear(layer.attention.self.key),
                          v=_linear(layer.attention.self.value), out=_linear(layer.attention.output.dense),
                          fc1=_linear(layer.intermediate.dense), fc2=_linear(layer.output.dense),
                          attention_norm=layer.attention.output.LayerNorm, feedforward_norm=layer.output.LayerNorm,
                          activation=layer.intermediate.intermediate_act_fn,
                          option=f"config.hidden_act={config.hidden_act!r}", where=f"module.{name}.encoder.layer[{i}]")
              for i, layer in enumerate(encoder.encoder.layer)]
    hidden = config.hidden_dropout_prob
    return TextSource(token=embeddings.word_embeddings.weight, position=embeddings.position_embeddings.weight,
                      token_type=embeddings.token_type_embeddings.weight, embedding_norm=embeddings.LayerNorm,
                      layers=layers, num_heads=config.num_attention_heads, post=True, dropout=hidden,
                      attention_output_dropout=hidden, feedforward_dropout=hidden,
                      attention_dropout=config.attention_probs_dropout_prob, scales=[None] * len(layers),
                      where=f"module.{name}")


def _check_classifier(classifier: object, where: str) -> nn.Linear:
    if not isinstance(classifier, nn.Linear):
        raise ConversionError(f"{where} must be an nn.Linear, got {type(classifier).__name__}")
    return classifier


def convert_bert(module: nn.Module, *, num_tasks: int, norms: Norms, num_classes: list[int] | None,
                 s_max: float) -> ConvertedTextEncoder:
    """Convert a transformers ``BertForSequenceClassification`` (see the module docstring)."""
    source = _bert_source(module, module.bert, "bert")
    if module.bert.pooler is None:
        raise ConversionError("module.bert.pooler is None: BertForSequenceClassification classifies the pooled "
                              "first token; build it with its pooling layer")
    classifier = _check_classifier(module.classifier, "module.classifier")
    config = module.config
    dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
    converted = ConvertedTextEncoder(
        source, pooler=module.bert.pooler.dense, pool_activation="tanh", pool_dropouts=(0.0, dropout),
        classifier=classifier, num_tasks=num_tasks, spec=norms.for_kind("layer"), num_classes=num_classes,
        s_max=s_max, padding_idx=None)
    return converted.train(module.training)


def convert_roberta(module: nn.Module, *, num_tasks: int, norms: Norms, num_classes: list[int] | None,
                    s_max: float) -> ConvertedTextEncoder:
    """Convert a transformers ``RobertaForSequenceClassification`` (see the module docstring)."""
    source = _bert_source(module, module.roberta, "roberta")
    head = module.classifier
    out_proj = _check_classifier(head.out_proj, "module.classifier.out_proj")
    converted = ConvertedTextEncoder(
        source, pooler=_check_classifier(head.dense, "module.classifier.dense"), pool_activation="tanh",
        pool_dropouts=(head.dropout.p, head.dropout.p), classifier=out_proj, num_tasks=num_tasks,
        spec=norms.for_kind("layer"), num_classes=num_classes, s_max=s_max,
        padding_idx=module.roberta.embeddings.padding_idx)
    return converted.train(module.training)


def convert_distilbert(module: nn.Module, *, num_tasks: int, norms: Norms, num_classes: list[int] | None,
                       s_max: float) -> ConvertedTextEncoder:
    """Convert a transformers ``DistilBertForSequenceClassification`` (see the module docstring)."""
    config = module.config
    model = module.distilbert
    embeddings = model.embeddings
    layers = [LayerSource(q=_linear(layer.attention.q_lin), k=_linear(layer.attention.k_lin),
                          v=_linear(layer.attention.v_lin), out=_linear(layer.attention.out_lin),
                          fc1=_linear(layer.ffn.lin1), fc2=_linear(layer.ffn.lin2),
                          attention_norm=layer.sa_layer_norm, feedforward_norm=layer.output_layer_norm,
                          activation=layer.ffn.activation, option=f"config.activation={config.activation!r}",
                          where=f"module.distilbert.transformer.layer[{i}]")
              for i, layer in enumerate(model.transformer.layer)]
    # DistilBERT drops out the MLP's update but not the attention's
    source = TextSource(token=embeddings.word_embeddings.weight, position=embeddings.position_embeddings.weight,
                        token_type=None, embedding_norm=embeddings.LayerNorm, layers=layers, num_heads=config.n_heads,
                        post=True, dropout=config.dropout, attention_output_dropout=0.0,
                        feedforward_dropout=config.dropout, attention_dropout=config.attention_dropout,
                        scales=[None] * len(layers), where="module.distilbert")
    converted = ConvertedTextEncoder(
        source, pooler=_check_classifier(module.pre_classifier, "module.pre_classifier"), pool_activation="relu",
        pool_dropouts=(0.0, config.seq_classif_dropout),
        classifier=_check_classifier(module.classifier, "module.classifier"), num_tasks=num_tasks,
        spec=norms.for_kind("layer"), num_classes=num_classes, s_max=s_max, padding_idx=None)
    return converted.train(module.training)

"""Structural conversion of transformers' GPT-2 (``GPT2LMHeadModel``, ``GPT2ForSequenceClassification``).

GPT-2 is pre-norm, x ← x + a ⊙ f(LN(x)), with causal attention and learned position embeddings; its ``Conv1D``
layers hold weights ``[in, out]``, which are transposed into nn.Linear's ``[out, in]`` (the rows a gate's output
units select), and ``c_attn`` computes q | k | v with one matrix, split into the three projections. The parts are
those of :mod:`.text_bert`: the token and position tables in a :class:`~hatnorm.blocks.StreamEmbedding` gated by
the stream, :class:`~.text_bert.TextBlock` layers, the final LayerNorm as the chosen layer-family norm.

``GPT2LMHeadModel``'s head is a :class:`~hatnorm.blocks.SharedLMHead` over the vocabulary every task shares. When the
original ties it to the token embedding, the converted head holds the embedding's very tensor, listed once in the
wiring: the embedding protects its columns of the stream units earlier tasks use, the one rule for both uses (a
tensor listed by two layers would get the stricter of their multipliers, and a per-step policy would adjust its
gradient twice). ``GPT2ForSequenceClassification`` has one head per task on the last token that is not
``config.pad_token_id``, as transformers pools.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hatnorm._checks import check_task_and_scale
from hatnorm._convert.error import ConversionError
from hatnorm._convert.norms import Norms
from hatnorm._convert.text_bert import (
    Affine,
    LayerSource,
    TextBody,
    TextSource,
    attention_mask_for,
    check_text_inputs,
    text_norm,
)
from hatnorm._hat import HATModule, Layer
from hatnorm._heads import TaskHeads
from hatnorm._masks import MaskSource
from hatnorm._norm_registry import NormSpec
from hatnorm._transformer import SharedLMHead


def _conv1d(conv: nn.Module) -> Affine:
    """A ``Conv1D``'s weight ``[in, out]`` and bias in nn.Linear's layout."""
    return conv.weight.t(), conv.bias


def _gpt2_source(model: nn.Module) -> TextSource:
    """The parts of a ``GPT2Model`` (``module.transformer``)."""
    config = model.config
    if config.add_cross_attention:
        raise ConversionError("module: config.add_cross_attention=True is not supported: GPT-2 converts as a "
                              "decoder-only model (causal self-attention, no cross-attention)")
    dim = config.hidden_size
    layers = []
    for i, block in enumerate(model.h):
        attention = block.attn
        weight, bias = _conv1d(attention.c_attn)  # [3·dim, dim]: the rows of q, then k, then v
        q, k, v = zip(weight.split(dim), bias.split(dim), strict=True)
        layers.append(LayerSource(q=q, k=k, v=v, out=_conv1d(attention.c_proj), fc1=_conv1d(block.mlp.c_fc),
                                  fc2=_conv1d(block.mlp.c_proj), attention_norm=block.ln_1, feedforward_norm=block.ln_2,
                                  activation=block.mlp.act,
                                  option=f"config.activation_function={config.activation_function!r}",
                                  where=f"module.transformer.h[{i}]"))
    head_dim = dim // config.num_attention_heads
    scales: list[float | None] = []
    for i in range(len(layers)):
        scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
        scales.append(scale / (i + 1) if config.scale_attn_by_inverse_layer_idx else scale)
    return TextSource(token=model.wte.weight, position=model.wpe.weight, token_type=None, embedding_norm=None,
                      layers=layers, num_heads=config.num_attention_heads, post=False, dropout=config.embd_pdrop,
                      attention_output_dropout=config.resid_pdrop, feedforward_dropout=config.resid_pdrop,
                      attention_dropout=config.attn_pdrop, scales=scales, where="module.transformer")


class ConvertedGPT2(HATModule):
    """A converted GPT-2: ``model(input_ids=, attention_mask=, task=, s=)`` → logits, ``[N, L, V]`` for the language
    model, ``[N, C_task]`` for the classifier.

    Args:
        module: the original ``GPT2LMHeadModel`` or ``GPT2ForSequenceClassification``.
        num_tasks: number of tasks.
        spec: the norm replacing the LayerNorms.
        num_classes: the classifier's class count of each task, or ``None`` for copies of its head.
        s_max: the gates' largest scale.
    """

    def __init__(self, module: nn.Module, *, num_tasks: int, spec: NormSpec, num_classes: list[int] | None,
                 s_max: float) -> None:
        super().__init__()
        model = module.transformer
        self.body = TextBody(_gpt2_source(model), num_tasks=num_tasks, spec=spec, s_max=s_max)
        self.norm = text_norm(model.ln_f, spec, num_tasks, "module.transformer.ln_f")
        self.num_tasks = num_tasks
        vocab_size, dim = model.wte.weight.shape
        self.causal_lm = hasattr(module, "lm_head")
        self.tied = self.causal_lm and module.lm_head.weight is model.wte.weight
        if self.causal_lm:
            self.head = SharedLMHead(dim, vocab_size).to(module.lm_head.weight)
            if self.tied:
                self.head.weight = self.body.embedding.token
            else:
                with torch.no_grad():
                    self.head.weight.copy_(module.lm_head.weight)
        else:
            score = module.score
            self.head = TaskHeads(dim, num_classes or [score.out_features] * num_tasks, num_tasks=num_tasks,
                                  bias=score.bias is not None).to(score.weight)
            if num_classes is None:
                for head in self.head.heads:
                    head.load_state_dict(score.state_dict())
            self.pad_token_id = module.config.pad_token_id
        self.to(model.wte.weight)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, task: int,
                s: float | Tensor | None = None) -> Tensor:
        """The logits of task ``task`` for ``input_ids`` ``[N, L]`` with the padding ``attention_mask`` (1 for a token,
        0 for padding): the next-token logits ``[N, L, V]`` of the language model, or the classifier's ``[N, C_task]``
        at each row's last token that is not ``config.pad_token_id``."""
        check_text_inputs(input_ids, attention_mask, None, max_length=self.body.max_length,
                          device=self.body.embedding.token.device)
        task, s = check_task_and_scale(task, s, num_tasks=self.num_tasks, training=self.training)
        mask = attention_mask_for(input_ids, attention_mask, causal=True)
        x, stream_gate = self.body(input_ids, mask, task, s)
        if self.causal_lm:
            return self.head(self.norm(x, stream_gate, task, trusted=True))
        n, length = input_ids.shape
        if self.pad_token_id is None:
            if n != 1:
                raise ValueError(f"input_ids: a batch of {n} rows needs config.pad_token_id to find each row's last "
                                 "token (transformers' rule); the model has none, so give one row at a time")
            last = torch.full((1,), length - 1, device=input_ids.device)
        else:  # the rightmost token that is not padding, for left and right padding alike
            tokens = input_ids.ne(self.pad_token_id).long()
            last = (torch.arange(length, device=input_ids.device) * tokens).argmax(-1)
        pooled = x[torch.arange(n, device=input_ids.device), last]
        return self.head(self.norm(pooled, stream_gate, task, trusted=True), task, trusted=True)

    def hat_layers(self) -> list[Layer]:
        stream = self.body.gate_stream
        layers = [*self.body.wiring(), Layer(self.norm, out=stream)]
        if self.causal_lm and not self.tied:  # a tied head's tensor is the embedding's, protected with it
            layers.append(Layer(self.head, out=stream))
        return layers

    def head_units(self) -> MaskSource:
        return self.body.gate_stream


def convert_gpt2(module: nn.Module, *, num_tasks: int, norms: Norms, num_classes: list[int] | None,
                 s_max: float) -> ConvertedGPT2:
    """Convert a transformers ``GPT2LMHeadModel`` or ``GPT2ForSequenceClassification`` (see the module docstring)."""
    if hasattr(module, "lm_head"):
        vocab_size = module.lm_head.out_features
        if module.lm_head.bias is not None:
            raise ConversionError("module.lm_head has a bias; a language model's head over the shared vocabulary "
                                  "converts without one (GPT-2's has none)")
        if num_classes is not None and set(num_classes) != {vocab_size}:
            raise ConversionError(f"num_classes: a causal language model predicts its vocabulary with one head every "
                                  f"task shares; give None or {vocab_size} for every task, got {num_classes}")
    elif not isinstance(module.score, nn.Linear):
        raise ConversionError(f"module.score must be an nn.Linear, got {type(module.score).__name__}")
    converted = ConvertedGPT2(module, num_tasks=num_tasks, spec=norms.for_kind("layer"), num_classes=num_classes,
                              s_max=s_max)
    return converted.train(module.training)

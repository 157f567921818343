"""Structural conversion of transformers' ViT classifiers (``ViTForImageClassification``).

Attention splits features into heads and mixes tokens, which a unit-wise graph walk cannot follow, so
a transformers ViT is rebuilt from hatnorm's gated blocks around its own weights: the patch
convolution, cls token and position embedding, and per layer the LayerNorms (as the chosen
layer-family norm, γ/β copied), q/k/v/output projections and the MLP, then the final LayerNorm and
one copy of the classifier per task. With every gate open it computes what the original computes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hatnorm._checks import check_batch, check_task, check_training_scale
from hatnorm._convert.error import ConversionError
from hatnorm._convert.norms import Norms
from hatnorm._convert.probes import unitwise_failure
from hatnorm._gate import HATGate
from hatnorm._hat import HATModule, Layer
from hatnorm._heads import TaskHeads
from hatnorm._masks import MaskSource
from hatnorm._norm_protocol import MaskedNorm
from hatnorm._norm_registry import NormSpec
from hatnorm._transformer import GatedAttention, GatedFeedForward, TokenEmbedding, blocks_wiring, run_blocks


def _load(target: nn.Module, source: nn.Module) -> None:
    target.load_state_dict(source.state_dict())


class ConvertedViT(HATModule):
    """A transformers ViT classifier rebuilt with gates: ``model(pixel_values, task=t, s=s)`` → logits."""

    def __init__(self, vit: nn.Module, classifier: nn.Linear, *, num_tasks: int, spec: NormSpec,
                 num_classes: list[int] | None, s_max: float) -> None:
        super().__init__()
        config = vit.config
        layers = vit.layers if hasattr(vit, "layers") else vit.encoder.layer
        _check_activation(layers[0].mlp.activation_fn, config.hidden_act)
        if not spec.fits("layer"):
            raise ConversionError(f"norm {spec.name!r} cannot replace a transformer's LayerNorm; use a layer-family "
                                 "norm")
        embeddings = vit.embeddings
        dim, eps = config.hidden_size, config.layer_norm_eps
        options = {} if spec.name == "none" else {"eps": eps}

        def norm_layer(features: int) -> MaskedNorm:
            return spec.layer(num_tasks=num_tasks, dims=None, **options)(features)

        self.image_size = config.image_size
        self.patch = nn.Conv2d(config.num_channels, dim, config.patch_size, config.patch_size)
        _load(self.patch, embeddings.patch_embeddings.projection)
        self.tokens = TokenEmbedding(embeddings.position_embeddings.shape[1] - 1, dim)
        with torch.no_grad():
            self.tokens.cls_token.copy_(embeddings.cls_token)
            self.tokens.pos_embedding.copy_(embeddings.position_embeddings)
        self.gate_stream = HATGate(dim, num_tasks=num_tasks, s_max=s_max)
        num_heads = config.num_attention_heads
        dim_head = getattr(config, "head_dim", None) or dim // num_heads
        self.attentions = nn.ModuleList()
        self.feedforwards = nn.ModuleList()
        for layer in layers:
            attention = GatedAttention(dim, num_heads=num_heads, dim_head=dim_head, num_tasks=num_tasks,
                                       norm_layer=norm_layer, s_max=s_max, qkv_bias=config.qkv_bias)
            source = layer.attention
            for mine, theirs in ((attention.to_q, source.q_proj), (attention.to_k, source.k_proj),
                                 (attention.to_v, source.v_proj), (attention.to_out, source.o_proj)):
                _load(mine, theirs)
            feedforward = GatedFeedForward(dim, config.intermediate_size, num_tasks=num_tasks, norm_layer=norm_layer,
                                           s_max=s_max, activation=layer.mlp.activation_fn)
            _load(feedforward.fc1, layer.mlp.fc1)
            _load(feedforward.fc2, layer.mlp.fc2)
            self._load_norm(attention.norm, layer.layernorm_before, spec)
            self._load_norm(feedforward.norm, layer.layernorm_after, spec)
            self.attentions.append(attention)
            self.feedforwards.append(feedforward)
        self.norm = norm_layer(dim)
        self._load_norm(self.norm, vit.layernorm, spec)
        counts = num_classes or [classifier.out_features] * num_tasks
        self.task_heads = TaskHeads(dim, counts, num_tasks=num_tasks)
        self.num_tasks = self.task_heads.num_tasks
        if num_classes is None:
            for head in self.task_heads.heads:
                _load(head, classifier)

    @staticmethod
    def _load_norm(norm: MaskedNorm, layer_norm: nn.LayerNorm, spec: NormSpec) -> None:
        if spec.name != "none":
            norm.load_state_dict(layer_norm.state_dict())

    def forward(self, pixel_values: Tensor, task: int, s: float | Tensor | None = None) -> Tensor:
        """The logits of task ``task`` for images ``[N, C, image_size, image_size]`` (N ≥ 1)."""
        size = self.image_size
        check_batch(pixel_values, (self.patch.in_channels, size, size), like=self.patch.weight, name="pixel_values")
        task = check_task(task, self.num_tasks)
        s = check_training_scale(s, self.training)
        stream = self.gate_stream(task, s)
        x = self.tokens(self.patch(pixel_values).flatten(2).transpose(1, 2)) * stream
        x = run_blocks(x, stream, self.attentions, self.feedforwards, task, s)
        return self.task_heads(self.norm(x, stream, task)[:, 0], task)

    def hat_layers(self) -> list[Layer]:
        stream = self.gate_stream
        layers = [Layer(self.patch, out=stream), Layer(self.tokens, out=stream), Layer(self.norm, out=stream)]
        return layers + blocks_wiring(stream, self.attentions, self.feedforwards)

    def head_units(self) -> MaskSource:
        return self.gate_stream


def _check_activation(activation: nn.Module, name: object) -> None:
    """Refuse an MLP activation that would open a closed unit: judged by what it does on a probe (f(0) = 0, on
    every value alone), and one with parameters, which every unit shares."""
    parameters = sum(p.numel() for p in activation.parameters())
    failure = unitwise_failure(activation, (2, 5, 8))
    if parameters:
        failure = f"has {parameters} parameter(s) shared by every unit, which no gate can protect"
    if failure is not None:
        raise ConversionError(f"module: config.hidden_act={name!r} ({type(activation).__name__}) {failure}; the MLP's "
                              "activation must act on every value alone and map 0 to 0 (relu, gelu, silu, tanh…)")


def convert_vit(module: nn.Module, *, num_tasks: int, norms: Norms, num_classes: list[int] | None,
                s_max: float) -> ConvertedViT:
    """Convert a transformers ``ViTForImageClassification`` (see the module docstring)."""
    spec = norms.for_kind("layer")
    vit, classifier = module.vit, module.classifier
    if not isinstance(classifier, nn.Linear):
        raise ConversionError(f"module.classifier must be an nn.Linear, got {type(classifier).__name__}")
    if getattr(vit.embeddings, "mask_token", None) is not None:
        raise ConversionError("module: ViT models with a mask token (use_mask_token=True) are not supported")
    converted = ConvertedViT(vit, classifier, num_tasks=num_tasks, spec=spec, num_classes=num_classes, s_max=s_max)
    return converted.to(classifier.weight.device).train(module.training)



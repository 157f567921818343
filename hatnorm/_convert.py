"""``convert``: turn a model the user already has into a HAT model, keeping its weights.

The model is traced with ``torch.fx``. Every BatchNorm/LayerNorm becomes the chosen task-aware norm
with its γ, β and running statistics copied into every task slot, followed by a new gate; weighted
layers with no norm after them get a gate of their own; the classifier becomes one head per task.
Walking the traced graph gives every weighted layer's input units: the gate before it, through
activations, dropouts, stochastic depth, pools and means over spatial dims (also after a flatten), the
elementwise max of both paths at a residual add, the gated operand's units at a squeeze-excitation
product (x times a sigmoid of a branch of x), the channel mask repeated over positions at a flatten,
and the concatenation of masks at a ``torch.cat``.

What cannot be converted raises :class:`ConversionError` naming the node: data-dependent control
flow (``torch.fx`` cannot trace it), operations that mix units (attention reshapes, matrix products
other than layers, transposed convolutions), activations with f(0) ≠ 0 (a closed unit would not stay
closed), residual adds of raw input data, and normalization layers other than BatchNorm/LayerNorm.
transformers' ViT models, whose attention mixes units, are converted structurally instead (see
:func:`convert`).
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from hatnorm._checks import (
    check_batch_statistics,
    check_dtype,
    check_num_tasks,
    check_positive,
    check_task,
    check_training_scale,
)
from hatnorm._conversion_error import ConversionError
from hatnorm._convert_vit import convert_vit, is_transformers_vit
from hatnorm._gate import HATGate
from hatnorm._hat import HATModule, Layer
from hatnorm._heads import TaskHeads, class_counts
from hatnorm._masks import Concat, Flatten, MaskSource, Residual
from hatnorm._norm_registry import NormSpec, get_norm, list_norms
from hatnorm._norms import MaskedNorm, NoNorm

#: modules that act on every unit alone and keep a zero unit at zero
_UNITWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Hardswish, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Identity,
)
_UNITWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.hardswish, F.dropout, F.max_pool1d, F.max_pool2d,
    F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
}
_UNITWISE_METHODS = {"relu", "relu_", "contiguous", "clone"}
_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}
_FLATTEN_FUNCTIONS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_MEANS = {torch.mean}
#: a squeeze-excitation branch's last activation: f(0) ≠ 0, so its output may only scale a gated tensor
_SCALE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_SCALE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}


def _is_stochastic_depth(target: object) -> bool:
    """torchvision's ``stochastic_depth`` (drop-path): each sample's units scaled alike, a zero unit stays 0."""
    return getattr(target, "__name__", None) == "stochastic_depth" and \
        str(getattr(target, "__module__", "")).startswith("torchvision.ops")


@dataclass(frozen=True)
class _Flat:
    """Units of a flattened ``[N, C, *spatial]`` tensor, resolved when a Linear reads it."""

    channels: MaskSource


@dataclass(frozen=True)
class _Scale:
    """A per-channel scale computed from gated units by a squeeze-excitation branch: not zero-preserving
    (sigmoid(0) = 0.5), so it may only multiply a gated tensor, whose units the product keeps."""

    source: MaskSource | None


class GatedNorm(nn.Module):
    """A task-aware norm and its gate in one node of a converted graph: ``norm(x, gate(task, s), task)``."""

    def __init__(self, norm: MaskedNorm, gate: HATGate) -> None:
        super().__init__()
        self.norm = norm
        self.gate = gate

    def forward(self, x: Tensor, task: int, s: float | Tensor | None = None) -> Tensor:
        return self.norm(x, self.gate(task, s), task)


class Heads(nn.Module):
    """Per-task heads in a converted graph, reading ``[N, *, in_features]`` like the ``nn.Linear`` they replace."""

    def __init__(self, heads: TaskHeads) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, x: Tensor, task: int) -> Tensor:
        shape = x.shape
        return self.heads(x.reshape(-1, shape[-1]), task).reshape(*shape[:-1], -1)


class ConvertedModel(HATModule):
    """A converted model: ``model(x, task=t, s=s)``; its wiring comes from the traced graph.

    The original model's input shape is not declared anywhere, so the first time an input of a new shape
    (after the batch dim), dtype or device arrives, one sample of it runs through the model in evaluation
    mode without gradients, which moves no statistic: an input the model cannot take is refused before
    the real forward, and the fewest values per channel any batch-statistics norm sees is remembered, so
    a training batch too small for batch statistics is refused up front too.

    Attributes:
        body: the traced and rewritten graph module.
        num_tasks: number of tasks.
    """

    def __init__(self, body: nn.Module, layers: Sequence[Layer], head_units: MaskSource | None = None) -> None:
        super().__init__()
        self.body = body
        self._layers = list(layers)
        self._head_units = head_units
        self.num_tasks = next(m.num_tasks for m in body.modules() if isinstance(m, TaskHeads))
        # per-sample shape, dtype and device of every input the model took → positions per channel (see _probe)
        self._accepted: dict[tuple[tuple[int, ...], torch.dtype, torch.device], int | None] = {}

    def forward(self, x: Tensor, task: int, s: float | Tensor | None = None) -> Tensor:
        """The logits of task ``task`` for ``x``, a batch ``[N, ...]`` (N ≥ 1) the original model takes.

        Args:
            x: the input batch.
            task: the task id, in ``[0, num_tasks)``.
            s: the gates' scale; required while training.

        Raises:
            TypeError: ``x`` is not a tensor or ``task`` not an int.
            ValueError: ``x`` is empty, of a dtype or device other than the model's, of a shape the model
                cannot take, or a training batch too small for batch statistics; ``task`` out of range; ``s``
                missing or not > 0 while training.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor [N, ...], got {type(x).__name__}")
        if x.dim() < 1 or x.numel() == 0:
            raise ValueError(f"x must be a non-empty batch [N, ...] with N ≥ 1 and every size ≥ 1, "
                             f"got shape {list(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        check_dtype(x, next(self.parameters()), name="x", mixed=False)
        task = check_task(task, self.num_tasks)
        s = check_training_scale(s, self.training)
        if not torch.compiler.is_compiling():
            check_batch_statistics(x, self._probe(x, task), training=self.training)
        return self.body(x, task, s)

    def _probe(self, x: Tensor, task: int) -> int | None:
        """The fewest values per sample and channel any batch-statistics norm sees for inputs shaped like ``x``
        (``None``: no such norm), from one evaluation-mode pass of ``x[:1]`` the first time the shape comes."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key in self._accepted:
            return self._accepted[key]
        seen: list[int] = []

        def record(norm: nn.Module, args: tuple[Tensor, ...]) -> None:
            seen.append(args[0].numel() // norm.num_features)

        norms = [m for m in self.body.modules() if isinstance(m, MaskedNorm) and m.batch_statistics]
        handles = [norm.register_forward_pre_hook(record) for norm in norms]
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            with torch.no_grad():
                self.body(x[:1], task)
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError) as error:  # a layer, norm or head that cannot take the shape
            raise ValueError(f"x must have a shape the converted model takes, got {list(x.shape)}: {error}") from None
        finally:
            for handle in handles:
                handle.remove()
            for m, training in modes.items():
                m.training = training
        self._accepted[key] = min(seen, default=None)
        return self._accepted[key]

    def hat_layers(self) -> list[Layer]:
        return list(self._layers)

    def head_units(self) -> MaskSource | None:
        return self._head_units


#: the kinds of torch norm a per-kind ``norm`` mapping of :func:`convert` names
KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "batch": (nn.BatchNorm1d, nn.BatchNorm2d), "layer": (nn.LayerNorm,), "group": (nn.GroupNorm,),
    "rms": (nn.RMSNorm,),
}


class _Norms:
    """The task-aware norm for each torch norm of a model: one norm for all, or one per kind."""

    def __init__(self, norm: object) -> None:
        self.by_kind: dict[str, NormSpec] | None = None
        if isinstance(norm, Mapping):
            unknown = [k for k in norm if k not in KINDS]
            if unknown:
                raise ValueError(f"norm: the keys of a per-kind mapping must be among {list(KINDS)}, got "
                                 f"{unknown[0]!r}")
            self.by_kind = {kind: _spec(name) for kind, name in norm.items()}
            self.single = None
        else:
            self.single = _spec(norm)

    def for_layer_norms(self) -> NormSpec:
        """The norm replacing LayerNorm (transformers' ViT)."""
        if self.by_kind is None:
            return self.single
        if "layer" not in self.by_kind:
            raise ConversionError(f"norm: the model's LayerNorms need a norm, but the mapping gives only "
                                  f"{sorted(self.by_kind)}; add 'layer'")
        return self.by_kind["layer"]

    def for_module(self, module: nn.Module, where: str) -> NormSpec:
        if self.by_kind is None:
            return self.single
        kind = next((k for k, types in KINDS.items() if isinstance(module, types)), None)
        if kind is None or kind not in self.by_kind:
            raise ConversionError(f"norm: no norm for {type(module).__name__} at {where}; the mapping gives "
                                  f"{sorted(self.by_kind)}" + ("" if kind is None else f", add {kind!r}"))
        return self.by_kind[kind]


def _spec(norm: object) -> NormSpec:
    spec = get_norm(norm) if isinstance(norm, str) else norm
    if not isinstance(spec, NormSpec):
        raise TypeError(f"norm must be a registered norm name, a NormSpec, or a mapping from kinds {list(KINDS)} "
                        f"to them, got {norm!r}")
    return spec


def _make_norm(module: nn.Module, spec: NormSpec, num_tasks: int, where: str) -> MaskedNorm:
    """The task-aware norm standing for ``module``, its γ, β and statistics in every task slot."""
    if not isinstance(module, spec.replaces):
        fitting = [n for n in list_norms() if isinstance(module, get_norm(n).replaces)]
        raise ConversionError(f"norm {spec.name!r} cannot replace {type(module).__name__} at {where} (it replaces "
                              f"{', '.join(t.__name__ for t in spec.replaces) or 'none'}); norms that replace "
                              f"{type(module).__name__}: {fitting}; a model with several kinds of norm takes one "
                              "per kind, e.g. norm={'batch': 'masked_bn', 'layer': 'masked_ln'}")
    try:
        options = spec.options_from(module)
    except ValueError as error:
        raise ConversionError(f"{where}: {error}") from None
    norm = spec.layer(num_tasks=num_tasks, **options)(_num_features(module))
    if any(True for _ in norm.parameters()) or any(True for _ in norm.buffers()):
        norm.load_state_dict(module.state_dict())
    return norm.to(next(module.parameters()).device)


def _norm_modules() -> tuple[type[nn.Module], ...]:
    """The torch norms convert recognises: BatchNorm, LayerNorm and whatever a registered norm replaces."""
    return (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, *(t for n in list_norms() for t in get_norm(n).replaces))


def _num_features(module: nn.Module) -> int:
    """The units of a torch norm: its γ's length, or its declared feature count."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor):
        return weight.shape[0]
    return module.num_features if hasattr(module, "num_features") else module.normalized_shape[-1]


class _Converter:
    """One walk over a traced graph: rewrites it in place and collects the wiring."""

    def __init__(self, gm: fx.GraphModule, norms: _Norms, num_tasks: int, num_classes: list[int] | None,
                 s_max: float) -> None:
        self.gm, self.norms, self.num_tasks, self.num_classes, self.s_max = gm, norms, num_tasks, num_classes, s_max
        self.units: dict[fx.Node, Any] = {}
        self.layers: list[Layer] = []
        self.pending: dict[fx.Node, tuple[nn.Module, MaskSource | None]] = {}  # weighted layers awaiting a gate
        self.head_units: MaskSource | None = None

    def new_gate(self, num_features: int) -> HATGate:
        return HATGate(num_features, num_tasks=self.num_tasks, s_max=self.s_max)

    def input_units(self, node: fx.Node, reader: str) -> MaskSource | None:
        units = self.passed_units(node)
        if isinstance(units, _Flat):
            raise ConversionError(f"{reader}: a flattened tensor can only feed a Linear layer")
        if isinstance(units, _Scale):
            raise ConversionError(f"{reader}: the output of a sigmoid-like activation (f(0) ≠ 0) can only scale a "
                                  "gated tensor (squeeze-excitation: x * scale)")
        return units

    def passed_units(self, node: fx.Node) -> Any:
        """The units of ``node`` as they are, a flattened or scale tensor included (unit-wise ops pass those on)."""
        if node in self.pending:
            return self.gate_weighted(node)
        return self.units.get(node)

    def gate_weighted(self, node: fx.Node) -> HATGate:
        """Insert a gate after a weighted layer that no norm follows."""
        module, inp = self.pending.pop(node)
        gate = self.new_gate(module.weight.shape[0])
        gated = GatedNorm(NoNorm(gate.num_features, num_tasks=self.num_tasks), gate)
        name = f"{node.target}_gate".replace(".", "_")
        self.gm.add_submodule(name, gated)
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(name, (node, self.task, self.s))
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        self.layers += [Layer(module, out=gate, inp=inp), Layer(gated.norm, out=gate)]
        self.units[new] = gate
        return gate

    def run(self) -> list[Layer]:
        graph = self.gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ConversionError(f"module: the traced forward must take one input tensor, got "
                                  f"{[p.target for p in placeholders]}")
        with graph.inserting_after(placeholders[0]):
            self.task = graph.placeholder("task")
        with graph.inserting_after(self.task):
            self.s = graph.placeholder("s", default_value=None)
        self.units[placeholders[0]] = None
        for node in list(graph.nodes):
            if node in (self.task, self.s) or node.op == "placeholder":
                continue
            if node.op == "output":
                self.output(node)
            elif node.op == "call_module":
                self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.call(node)
            elif node.op == "get_attr":
                raise ConversionError(f"node {node.name}: a direct use of parameter or buffer {node.target!r} "
                                      "cannot be protected")
        self.gm.recompile()
        return self.layers

    def call_module(self, node: fx.Node) -> None:
        module = self.gm.get_submodule(node.target)
        where = f"module {node.target!r}"
        if isinstance(module, _norm_modules()):
            source = node.args[0]
            gate = self.new_gate(_num_features(module))
            if source in self.pending and len(source.users) == 1:
                weighted, inp = self.pending.pop(source)
                self.layers.append(Layer(weighted, out=gate, inp=inp))
            else:
                self.input_units(source, where)
            gated = GatedNorm(_make_norm(module, self.norms.for_module(module, where), self.num_tasks, where), gate)
            self.gm.delete_submodule(node.target)
            self.gm.add_submodule(node.target, gated)
            node.args = (source, self.task, self.s)
            self.layers.append(Layer(gated.norm, out=gate))
            self.units[node] = gate
        elif isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                raise ConversionError(f"{where}: transposed convolutions are not supported")
            units = self.units.get(node.args[0])
            if node.args[0] in self.pending:
                units = self.gate_weighted(node.args[0])
            if isinstance(units, _Flat) and units.channels is None:  # flattened input data: still no gate
                units = None
            if isinstance(units, _Flat):
                if not isinstance(module, nn.Linear) or module.in_features % units.channels.num_features:
                    raise ConversionError(f"{where}: reads a flattened map of {units.channels.num_features} channels "
                                          "but its input size is not a multiple of it")
                units = Flatten(units.channels, module.in_features // units.channels.num_features)
            if [u.op for u in node.users] == ["output"] and isinstance(module, nn.Linear):
                self.classifier(node, module)
                self.head_units = units
                return
            self.pending[node] = (module, units)
        elif isinstance(module, _UNITWISE_MODULES):
            self.units[node] = self.unitwise(node.args[0], where)
        elif isinstance(module, _SCALE_MODULES):
            self.units[node] = _Scale(self.input_units(node.args[0], where))
        elif isinstance(module, nn.Flatten):
            self.units[node] = _Flat(self.input_units(node.args[0], where))
        else:
            raise ConversionError(f"{where}: {type(module).__name__} is not supported (allowed: BatchNorm1d/2d, "
                                  "LayerNorm, Linear, Conv1d/2d/3d, unit-wise activations, dropout and pooling)")

    def call(self, node: fx.Node) -> None:
        where = _where(node)
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        target = node.target
        if node.op == "call_method" and target in ("size", "dim"):
            return
        if target is getattr or (node.op == "call_function" and target in (operator.getitem,) and not tensors):
            return
        if target in _ADD or target == "add":
            sources = [self.input_units(a, where) for a in tensors]
            if len(sources) != 2 or any(s is None for s in sources):
                raise ConversionError(f"{where}: a residual add must sum two gated paths, got {len(sources)} "
                                      "tensor(s), some of them raw input data")
            self.units[node] = Residual(*sources)
        elif target in _UNITWISE_FUNCTIONS or (node.op == "call_method" and target in _UNITWISE_METHODS) \
                or _is_stochastic_depth(target):
            self.units[node] = self.unitwise(tensors[0], where)
        elif target in _SCALE_FUNCTIONS or (node.op == "call_method" and target in ("sigmoid", "sigmoid_")):
            self.units[node] = _Scale(self.input_units(tensors[0], where))
        elif target in _MUL or (node.op == "call_method" and target in ("mul", "mul_")):
            self.units[node] = self.product(node, tensors, where)
        elif target in _MEANS or (node.op == "call_method" and target == "mean"):
            self.units[node] = self.spatial_mean(node, tensors[0], where)
        elif target in _FLATTEN_FUNCTIONS or (node.op == "call_method" and target in _FLATTEN_METHODS):
            self.units[node] = _Flat(self.input_units(tensors[0], where))
        elif target is torch.cat:
            parts = [self.input_units(a, where) for a in node.args[0]]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if dim != 1 or any(p is None for p in parts):
                raise ConversionError(f"{where}: only a concatenation of gated tensors along dim 1 is supported")
            self.units[node] = Concat(*parts)
        else:
            raise ConversionError(f"{where}: this operation is not supported; see the hatnorm docs for what converts")

    def unitwise(self, source: fx.Node, where: str) -> Any:
        """An op on every value alone that keeps 0 at 0: its output has its input's units (flattened too)."""
        units = self.passed_units(source)
        if isinstance(units, _Scale):
            raise ConversionError(f"{where}: the output of a sigmoid-like activation can only scale a gated tensor")
        return units

    def product(self, node: fx.Node, tensors: list[fx.Node], where: str) -> MaskSource:
        """``x * y``: a gated tensor times a squeeze-excitation scale or a constant keeps the gated units."""
        if len(tensors) == 1:  # times a number
            return self.input_units(tensors[0], where)
        first, second = (self.passed_units(t) for t in tensors[:2])
        scale, gated = (first, second) if isinstance(first, _Scale) else (second, first)
        if len(tensors) != 2 or not isinstance(scale, _Scale) or isinstance(gated, _Scale | _Flat) or gated is None:
            raise ConversionError(f"{where}: a product of tensors is supported as a gated tensor times a "
                                  "squeeze-excitation scale (sigmoid of a branch of it)")
        return gated

    def spatial_mean(self, node: fx.Node, source: fx.Node, where: str) -> MaskSource | None:
        """A mean over spatial dims (≥ 2) keeps the channels in dim 1 and their units."""
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else dims
        if not isinstance(dims, tuple | list) or not dims or not all(isinstance(d, int) and d >= 2 for d in dims):
            raise ConversionError(f"{where}: only a mean over spatial dims (2, 3, ...) keeps the channels' units, "
                                  f"got dim={dims!r}")
        return self.input_units(source, where)

    def classifier(self, node: fx.Node, module: nn.Linear) -> None:
        counts = self.num_classes or [module.out_features] * self.num_tasks
        heads = TaskHeads(module.in_features, counts, num_tasks=self.num_tasks).to(module.weight.device)
        if self.num_classes is None:
            # every task starts from the model's own head, so open gates reproduce the original outputs
            for head in heads.heads:
                head.load_state_dict(module.state_dict())
        self.gm.delete_submodule(node.target)
        self.gm.add_submodule(node.target, Heads(heads))
        source = node.args[0]
        if source in self.pending:
            self.gate_weighted(source)
        node.args = (source, self.task)

    def output(self, node: fx.Node) -> None:
        for source in [a for a in node.all_input_nodes if a in self.pending]:
            self.gate_weighted(source)
        if not any(isinstance(m, Heads) for m in self.gm.modules()):
            raise ConversionError("module: its output must come from a final nn.Linear (the classifier), which "
                                  "becomes one head per task")


def convert(
    module: nn.Module,
    *,
    num_tasks: int,
    norm: str | NormSpec | Mapping[str, str | NormSpec] = "masked_bn",
    num_classes: int | Sequence[int] | None = None,
    s_max: float = 400.0,
) -> ConvertedModel:
    """Turn an existing model into a HAT model, keeping its weights.

    Norm layers become ``norm`` (their γ, β and running statistics copied into every task slot), a
    gate follows every norm (and every weighted layer with no norm after it), each weighted layer's
    input and output units are found from the traced graph, and the final ``nn.Linear`` becomes one
    head per task. ``module`` itself is not changed.

    transformers' ``ViTForImageClassification`` / ``ViTModel``-based classifiers are converted by
    their structure (:func:`hatnorm._convert_vit.convert_vit`), because attention mixes units in
    ways a unit-wise graph walk cannot follow.

    Args:
        module: the model; its forward takes one input tensor and ends in an ``nn.Linear``.
        num_tasks: number of tasks.
        norm: the task-aware norm replacing every torch norm (a registered name; it must replace each of
            the model's norms), or one per kind for models that mix them: a mapping from ``"batch"``
            (BatchNorm1d/2d), ``"layer"`` (LayerNorm), ``"group"`` (GroupNorm), ``"rms"`` (RMSNorm) to a
            norm, e.g. ``{"batch": "masked_bn", "layer": "masked_ln"}``.
        num_classes: ``None`` to start every task's head as a copy of the model's own head (so open
            gates reproduce the original outputs), or the class count of every task / of each task.
        s_max: the gates' largest scale.

    Returns:
        a :class:`ConvertedModel`, called as ``model(x, task=t, s=s)``; ``hatnorm.HAT(model)`` reads its wiring.

    Raises:
        ConversionError: for a part that cannot be converted, naming it.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    num_tasks = check_num_tasks(num_tasks)
    norms = _Norms(norm)
    counts = None if num_classes is None else class_counts(num_classes, num_tasks)
    s_max = check_positive(s_max, "s_max")
    if is_transformers_vit(module):
        return convert_vit(module, num_tasks=num_tasks, spec=norms.for_layer_norms(), num_classes=counts,
                           s_max=s_max)
    try:
        gm = trace(copy.deepcopy(module))
    except Exception as error:  # torch.fx raises many types for untraceable code
        raise ConversionError(f"module: torch.fx cannot trace {type(module).__name__}: {error}") from error
    if not module.training:
        _refuse_training_only_parts(module, gm)
    converter = _Converter(gm, norms, num_tasks, counts, s_max)
    layers = converter.run()
    return ConvertedModel(gm, layers, converter.head_units).train(module.training)


_TORCH = Path(torch.__file__).parent


def _where(node: fx.Node) -> str:
    """Where an operation of the traced forward comes from, for messages: the innermost module whose forward
    holds it, the source line (file name, line number and code) and the operation."""
    target = node.target
    op = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    stack = node.meta.get("nn_module_stack") or {}
    path, owner = next(reversed(stack.items()), ("", None))
    owner_name = owner[1].__name__ if isinstance(owner, tuple) and isinstance(owner[1], type) else None
    module = (f"module {path!r} ({owner_name})" if path and owner_name else f"module {path!r}" if path
              else "the model's own forward")
    frames = [f for f in re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', node.stack_trace or "")
              if not Path(f[0]).is_relative_to(_TORCH)]  # the model's own line, not the tracer's
    source = f", {Path(frames[-1][0]).name}:{frames[-1][1]} `{frames[-1][2].strip()}`" if frames else ""
    return f"{module}{source}: operation {op}"


def trace(module: nn.Module) -> fx.GraphModule:
    """``torch.fx`` symbolic trace of ``module`` that records each operation's source line."""
    tracer = fx.Tracer()
    tracer.record_stack_traces = True
    return fx.GraphModule(module, tracer.trace(module), type(module).__name__)


def _used_modules(gm: fx.GraphModule) -> set[str]:
    """The paths of the modules a traced forward runs (called as leaves, or inlined into its nodes)."""
    used = set()
    for node in gm.graph.nodes:
        used.update(node.meta.get("nn_module_stack") or {})
        if node.op == "call_module":
            used.add(node.target)
    return used


def _refuse_training_only_parts(module: nn.Module, traced: fx.GraphModule) -> None:
    """Refuse to drop what runs only in training: a model traced in evaluation mode loses the branches its
    forward takes only in training (an auxiliary head, drop-path); the training-mode trace shows them."""
    try:
        in_training = _used_modules(trace(copy.deepcopy(module).train()))
    except Exception:  # a model whose training forward does not trace: nothing to compare
        return
    in_evaluation = _used_modules(traced)
    lost = sorted(name for name in in_training - in_evaluation
                  if not any(name.startswith(other + ".") for other in in_training - in_evaluation))
    if lost:
        described = [f"{name!r} ({type(module.get_submodule(name)).__name__}, "
                     f"{sum(p.numel() for p in module.get_submodule(name).parameters()):,} parameters)"
                     for name in lost[:3]]
        raise ConversionError(f"module {', '.join(described)}{' and more' if len(lost) > 3 else ''}: runs only in "
                              "training, so converting in evaluation mode would drop it (an auxiliary head, "
                              "drop-path); remove it from the model (e.g. aux_logits=False, drop_path_rate=0) "
                              "to convert without it")


def open_gates(model: nn.Module, value: float = 6.0) -> None:
    """Set every gate's embedding to ``value`` > 0 for every task, so all gates are open (a = 1 at s_max).

    Used to check that a converted model reproduces the original (SPEC invariant 7).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    value = check_positive(value, "value")
    with torch.no_grad():
        for gate in (m for m in model.modules() if isinstance(m, HATGate)):
            gate.embedding.fill_(value)



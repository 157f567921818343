"""``convert``: turn a model the user already has into a HAT model, keeping its weights.

The model is traced with ``torch.fx``. Every BatchNorm/LayerNorm/GroupNorm/RMSNorm (a module, or a
functional ``F.batch_norm``/``F.layer_norm``/… call on a module's parameters, as in timm's
``BatchNormAct2d`` and torchvision's ``LayerNorm2d``) becomes the chosen task-aware norm with its γ, β
and running statistics copied into every task slot, followed by a new gate; weighted layers with no norm
after them get a gate of their own; the classifier becomes one head per task.

Walking the graph follows where each gate's units sit in every tensor (:mod:`hatnorm._units`), by a
rule per operation: unit-wise ops with f(0) = 0 (activations, dropouts, stochastic depth, pools, means
over dims the units do not vary in) keep them; ops that only move values (permute, transpose, reshape,
flatten, a channel split, shuffle, slice, roll, zero padding) move them the same way, replayed on an
index tensor at the shapes of ``example_input`` when the op reads shapes; a residual add takes the
elementwise max of both paths; a product with a squeeze-excitation scale or a per-unit parameter (a
layer scale) keeps the gated units; a concatenation joins them; shape reads and assertions are
bookkeeping. Adding a parameter (a position embedding, a class token) makes closed units nonzero, so a
new gate follows it. Users declare rules for their own ops with :func:`register_conversion_rule`.

What cannot be converted raises :class:`ConversionError` naming the module, source line and op:
data-dependent control flow (``torch.fx`` cannot trace it), ops that mix units (attention, matrix
products other than layers, transposed convolutions), activations with f(0) ≠ 0 outside a product,
residual adds of raw input data. transformers' ViT models, whose attention mixes units, are converted
structurally instead (see :func:`convert`).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from hatnorm._convert_params import BufferUse, ParameterUse, TaskParameter
from hatnorm._convert_training import (
    EvaluationForward,
    ModeValue,
    evaluation_graph,
    is_structure,
    training_graph,
)
from hatnorm._convert_vit import convert_vit, is_transformers_vit
from hatnorm._convert_windows import GatedShiftedWindowAttention, is_patch_merging_pad, is_window_attention
from hatnorm._gate import HATGate
from hatnorm._hat import HATModule, Layer
from hatnorm._heads import TaskHeads, class_counts
from hatnorm._masks import Concat, Flatten, MaskSource, Residual, Select
from hatnorm._node_source import model_frames, source_line
from hatnorm._node_source import where as _where
from hatnorm._norm_registry import NormSpec, get_norm, list_norms
from hatnorm._norms import MaskedNorm, NoNorm
from hatnorm._tracing import eliminate_dead_code, is_drop_path, is_in_place, is_transformers_activation, trace
from hatnorm._transformer import gated_linear
from hatnorm._units import Recorder, Units, expand, record, rule_failure, unitwise_failure, user_rule

#: modules that act on every value alone and keep 0 at 0
_UNITWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Hardswish,
    nn.Hardtanh, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Identity,
)
_UNITWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.mish, F.leaky_relu, F.elu, F.selu,
    F.celu, F.hardswish, F.hardtanh, torch.tanh, F.tanh, F.softsign, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.clone,
}
_UNITWISE_METHODS = {"relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "float", "double", "half",
                     "bfloat16", "to", "type_as"}
#: operations whose output changes size along the dims they pool over (the units must not vary there)
_POOLS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
          F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
          F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
#: operations that only move, copy or drop values; the ones in _SIZE_FREE need no shapes
_MOVES_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.movedim,
                    torch.squeeze, torch.unsqueeze, torch.roll, torch.narrow, torch.chunk, torch.split,
                    torch.unbind, torch.select, torch.tensor_split, operator.getitem}
_MOVES_METHODS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "movedim",
                  "squeeze", "unsqueeze", "chunk", "split", "unbind", "narrow", "roll", "expand", "repeat",
                  "select", "tensor_split"}
_SIZE_FREE = {torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.unsqueeze, "permute",
              "transpose", "swapaxes", "movedim", "unsqueeze"}
_FLATTENS = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}
_MOVES_MODULES = (nn.Flatten, nn.Unflatten)
_ADD = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub, "add", "add_", "sub",
        "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_REDUCE = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}
#: a squeeze-excitation branch's last activation: f(0) ≠ 0, so its output may only scale a gated tensor
_SCALE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_SCALE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, "sigmoid", "sigmoid_"}
#: functional norms on a module's parameters → the torch norm kind they compute, and their channel dim
_FUNCTIONAL_NORMS = {F.batch_norm: 1, F.layer_norm: -1, F.group_norm: 1, F.rms_norm: -1}
#: functions that make a new tensor from numbers (data, for the walk)
_FACTORIES = {torch.zeros, torch.ones, torch.full, torch.arange, torch.empty, torch.tensor, torch.rand, torch.randn,
              torch.linspace, torch.eye}
_MATMUL = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
_SCORE_OPS = {F.softmax, torch.softmax, F.dropout, torch.masked_fill}
#: functional layers on a module's own weight → the torch layer they compute
_FUNCTIONAL_LAYERS = {F.linear: nn.Linear, F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
#: reads of a tensor that give a shape, a rank or a type, not data
_SHAPE_METHODS = {"size", "dim", "ndimension", "numel", "get_device", "nelement"}
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad"}


def _is_stochastic_depth(target: object) -> bool:
    """torchvision's ``stochastic_depth`` (drop-path): each sample's units scaled alike, a zero unit stays 0."""
    return getattr(target, "__name__", None) == "stochastic_depth" and \
        str(getattr(target, "__module__", "")).startswith("torchvision.ops")


@dataclass(frozen=True)
class _Flat:
    """Units of a flattened ``[N, C, *spatial]`` tensor, resolved when a Linear reads it (no example input)."""

    channels: Units | None


@dataclass(frozen=True)
class _Scale:
    """Computed from gated units with f(0) ≠ 0 (a squeeze-excitation sigmoid, ``x + 3`` in a hard-swish):
    it may only multiply a gated tensor, whose units the product keeps."""

    units: Units | None
    origin: str = ""  # the module that made it, when it is named in errors (a transformers activation)


@dataclass(frozen=True)
class _Ungated:
    """A tensor holding a parameter's values (a class token, a position embedding added to a gated stream):
    closed units may be nonzero, so a gate must follow before anything reads it. ``params`` maps each
    parameter's graph target to the index of its element at every position (−1: not there)."""

    units: Units | None
    params: tuple[tuple[str, Tensor], ...]


@dataclass(frozen=True)
class _Scores:
    """Attention scores ``q @ kᵀ`` (and their softmax): they mix tokens, not features, so they may only weigh the
    values (``scores @ v``), whose units the result keeps. ``params``: parameters biasing them (see
    :class:`_Derived`)."""

    params: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Derived:
    """Computed from parameters in a way whose entries meet no single unit (a relative position bias table
    gathered by an index buffer): shared by every unit of a head, so no gate can protect them. They may only
    bias attention scores, and then become one copy per task (:class:`TaskParameter`)."""

    params: tuple[str, ...]


class GatedNorm(nn.Module):
    """A task-aware norm and its gate in one node of a converted graph: ``norm(x, gate(task, s), task)``."""

    def __init__(self, norm: MaskedNorm, gate: HATGate) -> None:
        super().__init__()
        self.norm = norm
        self.gate = gate

    def forward(self, x: Tensor, task: int, s: float | Tensor | None = None) -> Tensor:
        return self.norm(x, self.gate(task, s), task)


class GatedLinear(nn.Module):
    """A ``Linear`` and the gate on its output in one node of a converted graph, the gate folded into the
    weights: ``(a ⊙ W)x + a ⊙ b``, one multiply per weight instead of one per output value."""

    def __init__(self, linear: nn.Linear, gate: HATGate) -> None:
        super().__init__()
        self.linear = linear
        self.gate = gate

    def forward(self, x: Tensor, task: int, s: float | Tensor | None = None) -> Tensor:
        return gated_linear(x, self.linear, self.gate(task, s))


class Heads(nn.Module):
    """Per-task heads in a converted graph, reading ``[N, *, in_features]`` like the ``nn.Linear`` they replace (or
``[N, in_features, *spatial]`` like the convolution)."""

    def __init__(self, heads: TaskHeads) -> None:
        super().__init__()
        self.heads = heads
        self.convolutional = heads.convolutional  # export swaps ``heads`` for the task's head alone

    def forward(self, x: Tensor, task: int) -> Tensor:
        if self.convolutional:
            return self.heads(x, task)
        shape = x.shape
        return self.heads(x.reshape(-1, shape[-1]), task).reshape(*shape[:-1], -1)


class ConvertedModel(HATModule):
    """A converted model: ``model(x, task=t, s=s)``; its wiring comes from the traced graph.

    The original model's input shape is not declared anywhere, so the first time an input of a new shape
    (after the batch dim), dtype or device arrives, one sample of it runs through the model in evaluation
    mode without gradients, which moves no statistic: an input the model cannot take is refused before
    the real forward, and the fewest values per channel any batch-statistics norm sees is remembered, so
    a training batch too small for batch statistics is refused up front too.

    A model whose forward runs more in training than in evaluation (auxiliary classifiers) keeps it: in training
    the converted model returns what the original returns there (GoogLeNet's ``GoogLeNetOutputs``, every logits
    tensor from heads of the task), in evaluation the logits alone, computing nothing else.

    Attributes:
        body: the traced and rewritten graph module.
        num_tasks: number of tasks.
    """

    def __init__(self, body: nn.Module, layers: Sequence[Layer], head_units: MaskSource | None = None,
                 evaluation: EvaluationForward | None = None) -> None:
        super().__init__()
        self.body = body
        self._layers = list(layers)
        self._head_units = head_units
        self._evaluation = evaluation
        self.num_tasks = next(m.num_tasks for m in body.modules() if isinstance(m, TaskHeads))
        # per-sample shape, dtype and device of every input the model took → positions per channel (see _probe)
        self._accepted: dict[tuple[tuple[int, ...], torch.dtype, torch.device], int | None] = {}

    def forward(self, x: Tensor, task: int, s: float | Tensor | None = None) -> Any:
        """The logits of task ``task`` for ``x``, a batch ``[N, ...]`` (N ≥ 1) the original model takes (in
        training, for a model with auxiliary classifiers, what the original returns: its logits and theirs).

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
        return self._run(x, task, s)

    def _run(self, x: Tensor, task: int, s: float | Tensor | None) -> Any:
        if self.training or self._evaluation is None:
            return self.body(x, task, s)
        return self._evaluation(self.body, x, task, s)

    def only_in_training(self) -> list[str]:
        """The paths of the modules only the training forward runs: auxiliary classifiers, their norms and gates."""
        if self._evaluation is None:
            return []
        used = {n.target for n in self._evaluation.graph.nodes if n.op == "call_module"}
        called = {n.target for n in self.body.graph.nodes if n.op == "call_module"}
        return [f"body.{path}" for path in sorted(called - used)]

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
        buffers = {name: value.clone() for name, value in self.named_buffers()}  # a forward may count its calls
        self.eval()
        try:
            with torch.no_grad():
                self._run(x[:1].clone(), task, None)  # a copy: the forward may write into its input
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError) as error:  # a layer, norm or head that cannot take the shape
            raise ValueError(f"x must have a shape the converted model takes, got {list(x.shape)}: {error}") from None
        finally:
            for handle in handles:
                handle.remove()
            for m, training in modes.items():
                m.training = training
            with torch.no_grad():
                for name, value in self.named_buffers():
                    value.copy_(buffers[name])
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
            raise ConversionError(f"norm: no norm for {where}; the mapping gives "
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
        raise ConversionError(f"norm {spec.name!r} cannot replace {where}: it replaces "
                              f"{', '.join(t.__name__ for t in spec.replaces) or 'none'}; norms that replace "
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


class GatedMultiheadAttention(nn.Module):
    """An ``nn.MultiheadAttention`` (self-attention) with gates on its q, k and v features and its output,
    built from the original's weights; called like it, ``(x, x, x, task, s)`` → ``(output, None)``.

    Attention mixes tokens, not features: a closed q/k feature is 0 in every dot product and a closed v
    feature in every output, so the gates select features as in the reference ViTs.

    Args:
        attention: the module it replaces (batch-first or not, without extra key/value biases).
        num_tasks: number of tasks.
        s_max: the gates' largest scale.
    """

    def __init__(self, attention: nn.MultiheadAttention, *, num_tasks: int, s_max: float) -> None:
        super().__init__()
        dim = attention.embed_dim
        self.heads, self.batch_first, self.dropout = attention.num_heads, attention.batch_first, attention.dropout
        bias = attention.in_proj_bias is not None
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=bias) for _ in range(3))
        with torch.no_grad():
            for i, projection in enumerate((self.to_q, self.to_k, self.to_v)):
                projection.weight.copy_(attention.in_proj_weight[i * dim:(i + 1) * dim])
                if bias:
                    projection.bias.copy_(attention.in_proj_bias[i * dim:(i + 1) * dim])
        self.to_out = nn.Linear(dim, dim, bias=attention.out_proj.bias is not None)
        self.to_out.load_state_dict(attention.out_proj.state_dict())
        self.gate_q, self.gate_k, self.gate_v, self.gate_out = (HATGate(dim, num_tasks=num_tasks, s_max=s_max)
                                                                for _ in range(4))
        self.to(attention.out_proj.weight.device)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, task: int, s: float | Tensor | None = None,
                **_: Any) -> tuple[Tensor, None]:
        x = query if self.batch_first else query.transpose(0, 1)
        q, k, v = (gated_linear(x, projection, gate(task, s)).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for projection, gate in ((self.to_q, self.gate_q), (self.to_k, self.gate_k),
                                            (self.to_v, self.gate_v)))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = gated_linear(out.transpose(1, 2).flatten(2), self.to_out, self.gate_out(task, s))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def wiring(self, inp: MaskSource | None) -> list[Layer]:
        return [Layer(self.to_q, out=self.gate_q, inp=inp), Layer(self.to_k, out=self.gate_k, inp=inp),
                Layer(self.to_v, out=self.gate_v, inp=inp), Layer(self.to_out, out=self.gate_out, inp=self.gate_v)]


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    """The nodes among ``node``'s arguments (nested in lists and tuples too), in order."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


class _Converter:
    """One walk over a traced graph: rewrites it in place and collects the wiring.

    ``units`` holds, for every tensor-valued node, how its values relate to the gates: ``None`` (raw input
    data or a buffer), :class:`Units`, a flattened map awaiting its reader (:class:`_Flat`), a scale
    (:class:`_Scale`), a tensor with parameter values (:class:`_Ungated`), or a tuple of those (a split).
    Nodes with no entry are not tensors (shape reads).
    """

    def __init__(self, gm: fx.GraphModule, traced: nn.Module, norms: _Norms, num_tasks: int,
                 num_classes: list[int] | None, s_max: float, recorder: Recorder | None,
                 logits: fx.Node | None = None) -> None:
        self.gm, self.norms, self.num_tasks, self.num_classes, self.s_max = gm, norms, num_tasks, num_classes, s_max
        self.logits = logits  # the output node evaluation gives, when the graph also returns auxiliary logits
        self.traced = traced  # the module that was traced: its submodules keep their classes (gm's are plain)
        self.recorder = recorder
        self.units: dict[fx.Node, Any] = {}
        self.layers: list[Layer] = []
        self.pending: dict[fx.Node, tuple[nn.Module, MaskSource | None]] = {}  # weighted layers awaiting a gate
        self.head_units: MaskSource | None = None
        self.consumed: set[str] = set()  # parameters and buffers a functional norm took over
        self.used_parameters: dict[str, fx.Node] = {}
        self.used_buffers: dict[str, BufferUse] = {}  # buffers a gated tensor is multiplied by, entry by unit

    # ----------------------------------------------------------------------------- shapes and values
    def shape(self, node: fx.Node) -> torch.Size | None:
        """The tensor shape of ``node`` for the example input, when there is one."""
        if self.recorder is None:
            return None
        shape = self.recorder.shapes.get(node)
        return shape if isinstance(shape, torch.Size) else None

    def rank(self, node: fx.Node) -> int | None:
        shape = self.shape(node)
        if shape is not None:
            return len(shape)
        if node in self.pending:  # a weighted layer's output: a convolution's rank, or a Linear's input's
            module = self.pending[node][0]
            return module.weight.dim() if not isinstance(module, nn.Linear) else self.rank(node.args[0])
        units = self.units.get(node)
        if isinstance(units, Units):
            return units.rank
        if isinstance(units, _Flat):
            return 2
        return None

    def value(self, node: fx.Node, where: str) -> Any:
        """The value of a non-tensor node (a shape read, a size computed from one) for the example input."""
        if self.recorder is None or node not in self.recorder.values:
            raise ConversionError(f"{where}: its arguments are read from tensor shapes; pass "
                                  "example_input=<a batch the model takes> so convert can follow how it moves units")
        return self.recorder.values[node]

    # ----------------------------------------------------------------------------- gates
    def new_gate(self, num_features: int) -> HATGate:
        return HATGate(num_features, num_tasks=self.num_tasks, s_max=self.s_max)

    def add_gate_after(self, node: fx.Node, num_features: int, channel_dim: int, name: str) -> tuple[fx.Node, HATGate]:
        """Insert ``NoNorm`` with a new gate after ``node`` (over ``channel_dim``); every other user reads it."""
        gate = self.new_gate(num_features)
        gated = GatedNorm(NoNorm(num_features, num_tasks=self.num_tasks, channel_dim=channel_dim), gate)
        name = _free_name(self.gm, name)
        self.gm.add_submodule(name, gated)
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(name, (node, self.task, self.s))
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        self.same_shape(new, node)
        self.layers.append(Layer(gated.norm, out=gate))
        return new, gate

    def same_shape(self, new: fx.Node, old: fx.Node) -> None:
        """A node inserted for ``old`` (its gate, its norm) has ``old``'s shape for the example input."""
        if self.recorder is not None and old in self.recorder.shapes:
            self.recorder.shapes[new] = self.recorder.shapes[old]

    def gate_weighted(self, node: fx.Node) -> Units:
        """Insert a gate after a weighted layer that no norm follows; a ``Linear``'s gate is folded into its
        weights (:class:`GatedLinear`)."""
        rank = self.rank(node)
        module, inp = self.pending.pop(node)
        if node.op == "call_module" and type(module).forward is nn.Linear.forward:
            gate = self.new_gate(module.out_features)
            self.gm.delete_submodule(node.target)
            self.gm.add_submodule(node.target, GatedLinear(module, gate))
            node.args, node.kwargs = (node.args[0], self.task, self.s), {}
            self.layers.append(Layer(module, out=gate, inp=inp))
            self.units[node] = Units.of_gate(gate, rank, -1)
            return self.units[node]
        dim = -1 if isinstance(module, nn.Linear) else 1
        new, gate = self.add_gate_after(node, module.weight.shape[0], dim, f"{node.target}_gate".replace(".", "_"))
        self.layers.insert(len(self.layers) - 1, Layer(module, out=gate, inp=inp))
        units = Units.of_gate(gate, rank, dim)
        self.units[new] = units
        return units

    def regate(self, node: fx.Node, ungated: _Ungated, where: str) -> Units:
        """Gate a tensor that holds parameter values; the parameters are protected by the new gate's units."""
        shape = self.shape(node)
        if shape is None:
            raise ConversionError(f"{where}: reads a tensor that holds a parameter's values; pass example_input so "
                                  "convert can place the gate that must follow it")
        dim = ungated.units.unit_dim() if ungated.units is not None else len(shape) - 1
        if dim is None or dim not in (1, len(shape) - 1):
            raise ConversionError(f"{where}: a parameter is added to a tensor whose units are not in dim 1 or the "
                                  "last dim; a gate cannot follow it")
        new, gate = self.add_gate_after(node, shape[dim], 1 if dim == 1 else -1, f"{node.name}_gate")
        position = torch.arange(shape[dim]).view([-1 if d == dim else 1 for d in range(len(shape))])
        for target, elements in ungated.params:
            self.protect(target, elements, position.expand(shape), gate, where)
        units = Units.of_gate(gate, len(shape), dim)
        self.units[new] = units
        return units

    def protect(self, target: str, elements: Tensor, units: Tensor, source: MaskSource, where: str) -> None:
        """Move parameter ``target`` into a :class:`ParameterUse` protected by the units of ``source`` its
        entries meet (``elements`` and ``units`` index them at every position of the tensor)."""
        if target in self.used_parameters:
            raise ConversionError(f"{where}: parameter {target!r} is used in more than one place; each use would "
                                  "need its own protection")
        parameter = self.gm.get_parameter(target)
        elements, units = torch.broadcast_tensors(elements, units)
        there = (elements >= 0) & (units >= 0)
        high = torch.full((parameter.numel(),), -1).scatter_reduce(0, elements[there], units[there], "amax")
        low = torch.full((parameter.numel(),), parameter.numel() + source.num_features).scatter_reduce(
            0, elements[there], units[there], "amin")
        if bool((high < 0).any()) or bool((high != low).any()):
            raise ConversionError(f"{where}: every entry of parameter {target!r} must meet exactly one unit "
                                  "(it is shared across units, so no gate can protect it)")
        owner, _, name = target.rpartition(".")
        use = ParameterUse(self.gm.get_submodule(owner)._parameters.pop(name), high)
        module_name = _free_name(self.gm, f"{target}_use".replace(".", "_"))
        self.gm.add_submodule(module_name, use)
        node = next(n for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == target)
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(module_name)
        node.replace_all_uses_with(new)
        self.same_shape(new, node)
        self.gm.graph.erase_node(node)
        self.used_parameters[target] = new
        self.layers.append(Layer(use, out=source))

    # ----------------------------------------------------------------------------- reading units
    def resolve(self, node: fx.Node, where: str, *, ungated: bool = False) -> None:
        """Gate the tensor inputs of ``node`` that need it first: a weighted layer's pending output, and (unless
        ``ungated``) a tensor holding parameter values."""
        for arg in _tensor_args(node):
            if arg in self.pending:
                self.gate_weighted(arg)
        if not ungated:
            for arg in _tensor_args(node):
                if isinstance(self.units.get(arg), _Ungated):
                    self.regate(arg, self.units[arg], where)

    def gated(self, node: fx.Node, reader: str) -> Units | None:
        """The units of ``node``, which must be gated units or raw data."""
        units = self.units.get(node)
        if isinstance(units, _Flat):
            raise ConversionError(f"{reader}: a flattened tensor can only feed a Linear layer")
        if isinstance(units, _Scale):
            raise ConversionError(f"{reader}: the output of a sigmoid-like activation (f(0) ≠ 0{units.origin}) can "
                                  "only scale a gated tensor (squeeze-excitation: x * scale)")
        if isinstance(units, tuple):
            raise ConversionError(f"{reader}: reads a tuple of tensors")
        return units

    def read(self, node: fx.Node, dim: int, size: int, reader: str) -> MaskSource | None:
        """The input units a layer reads along ``dim`` (``size`` features)."""
        units = self.units.get(node)
        if isinstance(units, _Flat):
            if dim != -1:
                raise ConversionError(f"{reader}: a flattened tensor can only feed a Linear layer")
            if units.channels is None:
                return None
            try:
                channels = units.channels.read(1, units.channels.index.shape[1], reader)
            except ValueError as error:
                raise ConversionError(str(error)) from None
            if size % channels.num_features:
                raise ConversionError(f"{reader}: reads a flattened map of {channels.num_features} channels but its "
                                      "input size is not a multiple of it")
            return Flatten(channels, size // channels.num_features)
        units = self.gated(node, reader)
        if units is None:
            return None
        try:
            return units.read(dim, size, reader)
        except ValueError as error:
            raise ConversionError(str(error)) from None

    # ----------------------------------------------------------------------------- the walk
    def run(self) -> list[Layer]:
        graph = self.gm.graph
        for extra in [n for n in graph.nodes if n.op == "placeholder"][1:]:
            if _only_checks(extra):  # an argument traced at its default (see trace), checked to be that default
                _erase_with_users(extra)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ConversionError(f"module: the traced forward must take one input tensor, got "
                                  f"{[p.target for p in placeholders]}")
        placeholders[0].args = ()  # the input is required (a forward may give it a default, as transformers' do)
        with graph.inserting_after(placeholders[0]):
            self.task = graph.placeholder("task")
        with graph.inserting_after(self.task):
            self.s = graph.placeholder("s", default_value=None)
        self.units[placeholders[0]] = None
        self.check_single_calls()
        for node in list(graph.nodes):
            if node in (self.task, self.s) or node.op == "placeholder" or node.graph is not graph:
                continue
            if node.op == "output":
                self.output(node)
            elif node.op == "call_module":
                self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.call(node)
            elif node.op == "get_attr":
                self.get_attr(node)
            if node.op in ("call_module", "call_function", "call_method") and is_in_place(node, self.gm):
                self.in_place(node)
        self.finish()
        return self.layers

    def check_single_calls(self) -> None:
        """Refuse a module with parameters that the forward calls more than once (one layer in two places)."""
        calls: dict[str, list[fx.Node]] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                calls.setdefault(node.target, []).append(node)
        for target, nodes in calls.items():
            module = self.gm.get_submodule(target)
            parameters = sum(p.numel() for p in module.parameters())
            if len(nodes) < 2 or not parameters:
                continue
            lines = [source_line(model_frames(n)[-1]).lstrip(", ") for n in nodes if model_frames(n)]
            raise ConversionError(
                f"module {target!r} ({type(module).__name__}, {parameters:,} parameters) is used {len(nodes)} times "
                f"in one forward{' (' + '; '.join(lines) + ')' if lines else ''}: HAT gives each layer its own gate "
                "and protects its weights by the units of that one place, so a module cannot serve two places; give "
                "each call a module of its own (copy.deepcopy(module) for the second, to start from the same "
                "weights)")

    def in_place(self, node: fx.Node) -> None:
        """An in-place operation: its node stands for the tensor from there on (see
        :func:`hatnorm._tracing.follow_in_place`), which is sound unless it changes the units of a tensor that
        shares its memory with another (a view, or one a view reads): that other tensor would change unseen."""
        written = node.args[0]
        before, after = self.units.get(written), self.units.get(node)
        if before is after or (isinstance(before, Units) and isinstance(after, Units) and before.source is after.source
                               and torch.equal(*torch.broadcast_tensors(before.index, after.index))):
            return
        if _is_view(written, self.gm) or any(_is_view(u, self.gm) for u in written.users if u is not node):
            raise ConversionError(f"{_where(node)}: an in-place operation that changes which units a tensor holds "
                                  "(it adds to it, or makes closed units nonzero) on a tensor that shares its memory "
                                  "with a view, which would change unseen; write it out of place (h = h + b)")

    def get_attr(self, node: fx.Node) -> None:
        value = _attribute(self.gm, node.target)
        if isinstance(value, nn.Parameter) and value.requires_grad:
            self.units[node] = _Ungated(None, ((node.target, torch.arange(value.numel()).view(value.shape)),))
        elif isinstance(value, Tensor):
            self.units[node] = None  # a buffer: a constant, like data

    def finish(self) -> None:
        """Drop what functional norms took over, refuse parameters read in ways that cannot be protected."""
        graph = self.gm.graph
        for node in reversed(list(graph.nodes)):
            if node.op == "get_attr" and node.target in self.consumed:
                _erase_with_users(node)
        for node in graph.nodes:
            reads_data = [u for u in node.users if not _reads_metadata(u)]  # a dtype read is not a use
            if node.op == "get_attr" and reads_data and isinstance(_attribute(self.gm, node.target), nn.Parameter) \
                    and _attribute(self.gm, node.target).requires_grad:
                raise ConversionError(f"{_where(next(iter(node.users)))}: a direct use of parameter {node.target!r} "
                                      "that cannot be protected")
        for target in sorted(self.consumed):
            owner, _, name = target.rpartition(".")
            module = self.gm.get_submodule(owner)
            module._parameters.pop(name, None)
            module._buffers.pop(name, None)
        eliminate_dead_code(graph, self.gm)
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()

    def call_module(self, node: fx.Node) -> None:
        module = self.gm.get_submodule(node.target)
        where = f"module {node.target!r} ({type(module).__name__})"
        rule = user_rule(module)
        scores = self.units.get(node.args[0]) if node.args else None
        if isinstance(module, ModeValue):
            return  # a number or flag of the mode, not a tensor
        if isinstance(scores, _Scores) and isinstance(module, nn.Softmax | nn.Dropout | nn.Identity):
            self.units[node] = scores  # attention weights, softmaxed or dropped out
        elif isinstance(module, _norm_modules()) and rule is None:
            dim = -1 if isinstance(module, nn.LayerNorm | nn.RMSNorm) else 1
            self.norm(node, module, dim, where)
        elif isinstance(module, nn.Linear | nn.modules.conv._ConvNd) and rule is None:
            self.weighted(node, module, where)
        elif isinstance(module, nn.MultiheadAttention) and rule is None:
            self.attention(node, module, where)
        elif is_window_attention(module) and rule is None:
            self.window_attention(node, module, where)
        elif rule is not None:
            self.apply_rule(node, rule, where, module=module)
        elif is_transformers_activation(module):
            self.activation(node, module, where)
        elif isinstance(module, _UNITWISE_MODULES) or is_drop_path(module):
            self.resolve(node, where, ungated=isinstance(module, nn.Dropout | nn.Identity))
            self.units[node] = self.unitwise(node, node.args[0], where, pool=isinstance(module, _POOL_MODULES))
        elif isinstance(module, _SCALE_MODULES):
            self.resolve(node, where)
            self.units[node] = _Scale(self.gated(node.args[0], where))
        elif isinstance(module, _MOVES_MODULES):
            self.resolve(node, where, ungated=True)
            self.units[node] = self.moves(node, node.args[0], where, call=module)
        else:
            raise ConversionError(f"{where}: {type(module).__name__} is not supported (allowed: the torch norms, "
                                  "Linear, Conv1d/2d/3d, unit-wise activations, dropout and pooling, or a module "
                                  "with a rule from hatnorm.register_conversion_rule)")

    def activation(self, node: fx.Node, module: nn.Module, where: str) -> None:
        """A transformers activation, judged by what it does on a probe: unit-wise with f(0) = 0 keeps the units;
        unit-wise with f(0) ≠ 0 (a sigmoid-like one) may only scale a gated tensor."""
        self.resolve(node, where)
        parameters = sum(p.numel() for p in module.parameters())
        if parameters:
            raise ConversionError(f"{where}: an activation with parameters ({parameters}) shared by every unit, "
                                  "which no gate can protect")
        shape = self.shape(node.args[0])
        probe = tuple(shape) if shape is not None else (2, 3, 4, 4)
        if unitwise_failure(module, probe) is None:
            self.units[node] = self.unitwise(node, node.args[0], where, pool=False)
            return
        failure = unitwise_failure(module, probe, zero=False)
        if failure is not None:
            raise ConversionError(f"{where}: an activation that {failure}")
        self.units[node] = _Scale(self.gated(node.args[0], where), f": {where} {unitwise_failure(module, probe)}")

    def weighted(self, node: fx.Node, module: nn.Module, where: str) -> None:
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            raise ConversionError(f"{where}: transposed convolutions are not supported")
        self.resolve(node, where)
        source = node.args[0]
        if isinstance(module, nn.Linear):
            units = self.read(source, -1, module.in_features, where)
        else:
            units = self.read(source, 1, module.in_channels, where)
        output = self.output_of(node) if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) else None
        if output is not None:
            self.classifier(node, module, where)
            if self.logits is None or output is self.logits:  # the heads export prunes by these units
                self.head_units = units
            return
        self.pending[node] = (module, units)

    def attention(self, node: fx.Node, module: nn.MultiheadAttention, where: str) -> None:
        """Self-attention becomes :class:`GatedMultiheadAttention`, its output units those of a new gate."""
        self.resolve(node, where)
        inputs = list(node.args[:3]) + [node.kwargs[k] for k in ("query", "key", "value") if k in node.kwargs]
        masks = [k for k in ("key_padding_mask", "attn_mask") if node.kwargs.get(k) is not None]
        if len(inputs) != 3 or len(set(inputs)) != 1 or masks or len(node.args) > 3:
            raise ConversionError(f"{where}: only self-attention without masks (query, key and value one tensor) "
                                  "is supported")
        if module.bias_k is not None or module.add_zero_attn or not module._qkv_same_embed_dim:
            raise ConversionError(f"{where}: attention with extra key/value biases, zero attention or other key and "
                                  "value sizes is not supported")
        x = inputs[0]
        inp = self.read(x, -1, module.embed_dim, where)
        rank = self.rank(x)
        gated = GatedMultiheadAttention(module, num_tasks=self.num_tasks, s_max=self.s_max)
        self.gm.delete_submodule(node.target)
        self.gm.add_submodule(node.target, gated)
        node.args, node.kwargs = (x, x, x, self.task, self.s), {}
        self.layers += gated.wiring(inp)
        self.units[node] = (Units.of_gate(gated.gate_out, rank, -1), None)

    def window_attention(self, node: fx.Node, module: nn.Module, where: str) -> None:
        """torchvision's Swin window attention becomes :class:`GatedShiftedWindowAttention`."""
        self.resolve(node, where)
        x = node.args[0]
        inp = self.read(x, -1, module.qkv.in_features, where)
        rank = self.rank(x)
        gated = GatedShiftedWindowAttention(module, num_tasks=self.num_tasks, s_max=self.s_max)
        self.gm.delete_submodule(node.target)
        self.gm.add_submodule(node.target, gated)
        node.args, node.kwargs = (x, self.task, self.s), {}
        self.layers += gated.wiring(inp)
        self.units[node] = Units.of_gate(gated.gate_out, rank, -1)

    def norm(self, node: fx.Node, module: nn.Module, dim: int, where: str) -> fx.Node:
        """Replace a torch norm (called as a module, or functionally on ``module``'s parameters) by the task-aware
        norm and its gate; a weighted layer that only feeds it takes the gate as its output units."""
        source = node.args[0]
        rank = self.rank(source)
        if rank is None and dim == 1:
            if not isinstance(module, nn.BatchNorm2d):
                raise ConversionError(f"{where}: a channels-first norm reads a tensor of unknown rank; pass "
                                      "example_input")
            rank = 4
        norm = _make_norm(module, self.norms.for_module(module, where), self.num_tasks, where)
        gate = self.new_gate(_num_features(module))
        if source in self.pending and len(source.users) == 1:
            weighted, inp = self.pending.pop(source)
            self.layers.append(Layer(weighted, out=gate, inp=inp))
        else:
            self.resolve(node, where)
            self.gated(node.args[0], where)
        source = node.args[0]
        gated = GatedNorm(norm, gate)
        if node.op == "call_module":
            self.gm.delete_submodule(node.target)
            self.gm.add_submodule(node.target, gated)
            node.args, node.kwargs = (source, self.task, self.s), {}
            new = node
        else:
            name = _free_name(self.gm, f"{node.name}_norm")
            self.gm.add_submodule(name, gated)
            with self.gm.graph.inserting_after(node):
                new = self.gm.graph.call_module(name, (source, self.task, self.s))
            node.replace_all_uses_with(new)
            self.same_shape(new, node)
            self.gm.graph.erase_node(node)
        self.layers.append(Layer(gated.norm, out=gate))
        self.units[new] = Units.of_gate(gate, rank, dim)
        return new

    def functional_layer(self, node: fx.Node, where: str) -> None:
        """``F.linear``/``F.conv*d`` on the parameters of a ``nn.Linear``/``nn.Conv*d`` subclass (timm's ``Linear``):
        the call becomes the layer itself, a torch layer holding the same parameters."""
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        owner = weight.target.rpartition(".")[0] if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
        module = self.traced.get_submodule(owner) if owner is not None else None
        kind = _FUNCTIONAL_LAYERS[node.target]
        if not isinstance(module, kind):
            raise ConversionError(f"{where}: a functional layer is converted when it reads the weight of a "
                                  f"{kind.__name__} (subclass) as it is")
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if (bias is None) != (module.bias is None) or (bias is not None and (
                not isinstance(bias, fx.Node) or bias.op != "get_attr" or bias.target != f"{owner}.bias")):
            raise ConversionError(f"{where}: a functional layer is converted when it reads its module's own bias")
        if kind is nn.Linear:
            layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        else:
            if any(a is not None for a in node.args[3:]) and tuple(node.args[3:]) != (
                    module.stride, module.padding, module.dilation, module.groups)[:len(node.args) - 3]:
                raise ConversionError(f"{where}: a functional convolution is converted when it uses its module's "
                                      "stride, padding, dilation and groups")
            layer = type(module).__mro__[next(i for i, c in enumerate(type(module).__mro__) if c.__module__ ==
                                              "torch.nn.modules.conv")](
                module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                padding=module.padding, dilation=module.dilation, groups=module.groups, bias=module.bias is not None)
        layer.weight, layer.bias = module.weight, module.bias  # the same parameters: nothing is copied
        name = _free_name(self.gm, owner.replace(".", "_") + "_layer")
        self.gm.add_submodule(name, layer)
        del self.gm.get_submodule(owner)._parameters["weight"]
        if module.bias is not None:
            del self.gm.get_submodule(owner)._parameters["bias"]
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        self.same_shape(new, node)
        self.gm.graph.erase_node(node)
        for attribute in [a for a in (weight, bias) if isinstance(a, fx.Node) and not a.users]:
            self.units.pop(attribute, None)
            self.gm.graph.erase_node(attribute)
        self.call_module(new)

    def functional_norm(self, node: fx.Node, where: str) -> None:
        """``F.batch_norm``/``F.layer_norm``/``F.group_norm``/``F.rms_norm`` on a module's parameters (timm's
        ``BatchNormAct2d``, torchvision's ``LayerNorm2d``): the module becomes the task-aware norm."""
        names = {F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias"),
                 F.layer_norm: ("input", "normalized_shape", "weight", "bias"),
                 F.group_norm: ("input", "num_groups", "weight", "bias"),
                 F.rms_norm: ("input", "normalized_shape", "weight")}[node.target]
        bound = dict(zip(names, node.args, strict=False)) | {k: v for k, v in node.kwargs.items() if k in names}
        attributes = [bound[n] for n in names[1:] if isinstance(bound.get(n), fx.Node)]
        if not attributes or any(a.op != "get_attr" for a in attributes):
            raise ConversionError(f"{where}: a functional norm is converted when it reads a module's own parameters")
        owners = {a.target.rpartition(".")[0] for a in attributes}
        module = self.traced.get_submodule(owners.pop()) if len(owners) == 1 else None
        if module is None or not isinstance(module, _norm_modules()):
            raise ConversionError(f"{where}: a functional norm is converted when it reads the parameters of a torch "
                                  "norm module (a BatchNorm, LayerNorm, GroupNorm or RMSNorm subclass)")
        dim = _FUNCTIONAL_NORMS[node.target]
        if node.target is F.layer_norm and len(module.normalized_shape) != 1:
            raise ConversionError(f"{where}: only a LayerNorm over the last dim is supported")
        self.consumed.update(a.target for a in attributes)
        for attribute in attributes:
            self.units.pop(attribute, None)
        node.args, node.kwargs = (bound["input"],), {}
        self.norm(node, module, dim, where)

    def call(self, node: fx.Node) -> None:
        where = _where(node)
        target = node.target  # a function, or a method's name: the rule tables name both
        tensors = [a for a in _tensor_args(node) if a in self.units or a in self.pending]
        if node.op == "call_method" and target in _SHAPE_METHODS:
            return
        if target is getattr and node.args[1] in _SHAPE_ATTRIBUTES:
            return
        if not tensors:  # bookkeeping on shapes and numbers (an assertion, a size from a shape), or a new tensor
            if self.shape(node) is not None or target in _FACTORIES:
                self.units[node] = None
            return
        if target in _FUNCTIONAL_NORMS:
            self.functional_norm(node, where)
            return
        if target in _FUNCTIONAL_LAYERS:
            self.functional_layer(node, where)
            return
        if all(t not in self.pending and self.units[t] is None for t in tensors) and target not in _CAT:
            self.units[node] = None  # an op on raw data or buffers only: still data
            return
        kinds = [self.units.get(t) for t in tensors]
        if any(isinstance(k, _Derived) for k in kinds) and all(
                k is None or isinstance(k, _Derived) or (isinstance(k, _Ungated) and k.units is None) for k in kinds):
            self.units[node] = _Derived(_parameters_of(kinds))  # still computed from parameters (and data)
            return
        rule = user_rule(target)
        if target is operator.getitem and isinstance(self.units.get(node.args[0]), tuple):
            self.units[node] = self.units[node.args[0]][node.args[1]]  # one part of a split
        elif rule is not None:
            self.apply_rule(node, rule, where)
        elif target not in _MATMUL and target is not torch.einsum and any(isinstance(k, _Scores) for k in kinds):
            self.scores(node, tensors, where)
        elif target in _ADD:
            self.add(node, where)
        elif target in _MUL:
            self.product(node, where)
        elif target in _DIV:
            self.divide(node, where)
        elif target in _CAT:
            self.cat(node, where)
        elif target in _SCALE_FUNCTIONS:
            self.resolve(node, where)
            self.units[node] = _Scale(self.gated(node.args[0], where))
        elif target in _REDUCE:
            self.reduce(node, where)
        elif target is F.pad:
            self.pad(node, where)
        elif target is F.scaled_dot_product_attention:
            self.attention_function(node, where)
        elif target in _MATMUL:
            self.matmul(node, where)
        elif target is torch.einsum:
            self.einsum(node, where)
        elif target in _MOVES_FUNCTIONS or (node.op == "call_method" and target in _MOVES_METHODS) or \
                is_patch_merging_pad(target):
            self.resolve(node, where, ungated=True)
            self.units[node] = self.moves(node, node.args[0], where)
        elif target in _UNITWISE_FUNCTIONS or (node.op == "call_method" and target in _UNITWISE_METHODS) \
                or _is_stochastic_depth(target):
            self.resolve(node, where, ungated=target in (F.dropout, "contiguous", "clone", "to"))
            self.units[node] = self.unitwise(node, node.args[0], where, pool=target in _POOLS)
        else:
            raise ConversionError(f"{where}: this operation is not supported; see the hatnorm docs for what converts, "
                                  "or declare it with hatnorm.register_conversion_rule")

    def apply_rule(self, node: fx.Node, rule: str, where: str, module: nn.Module | None = None) -> None:
        self.check_claim(node, rule, where, module)
        if rule == "bookkeeping":
            return
        self.resolve(node, where, ungated=rule == "moves")
        if rule == "unitwise":
            self.units[node] = self.unitwise(node, node.args[0], where, pool=False)
        elif rule == "moves":
            self.units[node] = self.moves(node, node.args[0], where, call=module)
        else:
            self.units[node] = _Scale(self.gated(node.args[0], where))

    def check_claim(self, node: fx.Node, rule: str, where: str, module: nn.Module | None) -> None:
        """Check a registered rule's claim on a probe of the input's shape, called as ``node`` calls the op (a module
        is checked here, a function that takes a tensor alone was at registration)."""
        if not node.args or not isinstance(node.args[0], fx.Node):
            return
        shape = self.shape(node.args[0])
        known = self.recorder.values if self.recorder is not None else {}
        if any(a not in known for a in _tensor_args(node)[1:]):
            return  # another tensor, or a value of unknown size, among its arguments: nothing to probe with
        args, kwargs = fx.node.map_arg((node.args[1:], node.kwargs), lambda a: known[a])
        target = node.target
        if module is not None:
            def op(t: Tensor) -> Any:
                return module(t, *args, **kwargs)
        elif node.op == "call_method":
            def op(t: Tensor) -> Any:
                return getattr(t, target)(*args, **kwargs)
        else:
            def op(t: Tensor) -> Any:
                return target(t, *args, **kwargs)
        failure = rule_failure(op, rule, tuple(shape) if shape is not None else (2, 3, 4, 4), lone=shape is None)
        if failure is not None:
            raise ConversionError(f"{where}: the rule {rule!r} registered for it is false: on a probe tensor it "
                                  f"{failure}")

    # ----------------------------------------------------------------------------- rules
    def unitwise(self, node: fx.Node, source: fx.Node, where: str, *, pool: bool) -> Any:
        """An op on every value alone that keeps 0 at 0 (or a pool): its output has its input's units; a pool
        needs them constant over the dims it pools."""
        units = self.units.get(source)
        if isinstance(units, _Scale | _Flat | _Ungated) or units is None:
            return units
        if isinstance(units, tuple):
            raise ConversionError(f"{where}: reads a tuple of tensors")
        changed = self.changed_dims(source, node) if pool else []
        if pool and units.rank is not None and not changed:
            changed = list(range(2, units.rank))
        if any(units.index.shape[d] != 1 for d in changed if d < units.index.dim()):
            raise ConversionError(f"{where}: pools over dims {changed}, along which the units vary (it would mix "
                                  "units)")
        return units

    def changed_dims(self, before: fx.Node, after: fx.Node) -> list[int]:
        a, b = self.shape(before), self.shape(after)
        if a is None or b is None or len(a) != len(b):
            return []
        return [d for d in range(len(a)) if a[d] != b[d]]

    def moves(self, node: fx.Node, source: fx.Node, where: str, call: nn.Module | None = None) -> Any:
        """An op that only moves values: replay it on the index of the units (and of any parameter's entries)."""
        units = self.units.get(source)
        if units is None:
            return None
        if isinstance(units, _Flat):
            raise ConversionError(f"{where}: moves a flattened map; pass example_input so convert can follow it")
        if isinstance(units, tuple):
            raise ConversionError(f"{where}: reads a tuple of tensors")
        target = node.target
        if self.recorder is None:
            if target in _FLATTENS or isinstance(call, nn.Flatten):
                inner = units.units if isinstance(units, _Scale) else units
                if isinstance(units, _Ungated) or (inner is not None and inner.unit_dim() not in (None, 1)):
                    raise ConversionError(f"{where}: flattens a tensor whose units are not in dim 1; pass "
                                          "example_input")
                return _Flat(inner) if not isinstance(units, _Scale) else units
            if target not in _SIZE_FREE:
                self.value(node, where)  # raises: this op needs the example's shapes
        shape = self.shape(source)

        def replay(index: Tensor) -> Any:
            def argument(a: fx.Node) -> Any:
                if a is source:
                    return index
                if isinstance(units, _Ungated) and units.units is None and self.units.get(a, 0) is None:
                    raise _GatheredByData
                if a in self.units or a in self.pending:
                    raise ConversionError(f"{where}: indexes or shapes a tensor by another tensor, which convert "
                                          "cannot follow")
                return self.value(a, where)

            args, kwargs = fx.node.map_arg((node.args, node.kwargs), argument)
            if call is not None:
                return call(index)
            if node.op == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            return target(*args, **kwargs)

        def wrap(moved: Any, make: Any) -> Any:
            if isinstance(moved, Tensor):
                return make(moved)
            if isinstance(moved, tuple | list) and all(isinstance(m, Tensor) for m in moved):
                return tuple(make(m) for m in moved)
            raise ConversionError(f"{where}: does not give a tensor")

        if isinstance(units, _Scale):
            if units.units is None:
                return units
            inner = units.units
            return wrap(replay(expand(inner.index, shape)), lambda m: _Scale(Units(inner.source, m)))
        if isinstance(units, _Ungated):
            moved_units = None if units.units is None else replay(expand(units.units.index, shape))
            try:
                moved_params = [(t, replay(expand(e, shape))) for t, e in units.params]
            except _GatheredByData:  # a parameter gathered by an index buffer (a relative position bias)
                return _Derived(tuple(t for t, _ in units.params))
            if isinstance(moved_units, tuple) or any(isinstance(e, tuple | list) for _, e in moved_params):
                raise ConversionError(f"{where}: splits a tensor holding a parameter's values")
            return _Ungated(None if moved_units is None else Units(units.units.source, moved_units),
                            tuple(moved_params))
        return wrap(replay(expand(units.index, shape)), lambda m: Units(units.source, m))

    def attention_function(self, node: fx.Node, where: str) -> None:
        """``F.scaled_dot_product_attention(q, k, v)``: mixes tokens only, so the output has v's units (a closed q or
        k feature is 0 in every score, a closed v feature 0 in every output)."""
        self.resolve(node, where)
        q, k, v = (self.gated(a, where) for a in node.args[:3])
        if v is None or q is None or k is None:
            raise ConversionError(f"{where}: attention over raw data")
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        bias = self.units.get(mask) if isinstance(mask, fx.Node) else None
        if isinstance(bias, _Derived):
            self.per_task(bias.params, v.source)
        elif bias is not None:
            raise ConversionError(f"{where}: an attention mask computed from gated units")
        self.units[node] = Units(v.source, v.index)

    def per_task(self, targets: tuple[str, ...], source: MaskSource) -> None:
        """Give every task its own copy of parameters that bias attention (see :class:`TaskParameter`)."""
        for target in targets:
            if target in self.used_parameters:
                continue
            owner, _, name = target.rpartition(".")
            copies = TaskParameter(self.gm.get_submodule(owner)._parameters.pop(name), self.num_tasks)
            module_name = _free_name(self.gm, f"{target}_per_task".replace(".", "_"))
            self.gm.add_submodule(module_name, copies)
            for node in [n for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == target]:
                with self.gm.graph.inserting_after(node):
                    new = self.gm.graph.call_module(module_name, (self.task,))
                node.replace_all_uses_with(new)
                self.gm.graph.erase_node(node)
                self.used_parameters[target] = new
            self.layers.append(Layer(copies, out=source))

    def matmul(self, node: fx.Node, where: str) -> None:
        """``q @ kᵀ`` gives scores (tokens × tokens); ``scores @ v`` has v's units."""
        self.resolve(node, where)
        a, b = (self.units.get(x) for x in node.args[:2])
        if isinstance(a, Units) and isinstance(b, Units):
            self.units[node] = _Scores()
        elif isinstance(a, _Scores) and isinstance(b, Units):
            self.per_task(a.params, b.source)
            self.units[node] = Units(b.source, b.index)
        else:
            raise ConversionError(f"{where}: a matrix product is supported as attention (q @ kᵀ, then scores @ v)")

    def einsum(self, node: fx.Node, where: str) -> None:
        """An einsum that is attention's ``q @ kᵀ`` (``…id,…jd->…ij``: scores) or ``scores @ v`` (``…ij,…jd->…id``:
        v's units), as MaxViT writes them."""
        self.resolve(node, where)
        equation, *operands = node.args
        if len(operands) == 1 and isinstance(operands[0], list | tuple):
            operands = list(operands[0])
        form = _attention_einsum(equation) if isinstance(equation, str) and len(operands) == 2 else None
        a, b = (self.units.get(x) for x in operands) if len(operands) == 2 else (None, None)
        if form == "scores" and isinstance(a, Units) and isinstance(b, Units):
            self.units[node] = _Scores()
        elif form == "values" and isinstance(a, _Scores) and isinstance(b, Units) and (
                b.index.dim() < 2 or b.index.shape[-2] == 1):
            self.per_task(a.params, b.source)
            self.units[node] = Units(b.source, b.index)
        else:
            raise ConversionError(f"{where}: an einsum is supported as attention ('...id,...jd->...ij' on q and k, "
                                  f"then '...ij,...jd->...id' on the scores and v), got {equation!r}")

    def scores(self, node: fx.Node, tensors: list[fx.Node], where: str) -> None:
        """Scaling, softmax, dropout and a mask or bias of raw data keep attention scores scores."""
        self.resolve(node, where)
        others = [self.units.get(t) for t in tensors if not isinstance(self.units.get(t), _Scores)]
        target = node.target
        allowed = target in _ADD | _MUL | _DIV | _SCORE_OPS or target in _UNITWISE_FUNCTIONS or (
            node.op == "call_method" and target in _UNITWISE_METHODS | _MOVES_METHODS | {"softmax", "masked_fill"})
        if not allowed or any(o is not None and not isinstance(o, _Derived) for o in others):
            raise ConversionError(f"{where}: attention scores may only be scaled, masked, biased by data or a "
                                  "position bias, softmaxed or dropped out before they weigh the values")
        params = [p for t in tensors if isinstance(self.units.get(t), _Scores | _Derived) for p in self.units[t].params]
        self.units[node] = _Scores(tuple(dict.fromkeys(params)))

    def pad(self, node: fx.Node, where: str) -> None:
        """Zero padding (constant mode, value 0): padded positions are always 0 (index −1)."""
        self.resolve(node, where)
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        if mode != "constant" or value not in (None, 0, 0.0):
            raise ConversionError(f"{where}: only zero padding keeps a closed unit at 0, got mode={mode!r}, "
                                  f"value={value!r}")
        units = self.gated(node.args[0], where)
        if units is None:
            self.units[node] = None
            return
        pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
        pad = fx.node.map_arg(pad, lambda a: self.value(a, where))
        index = expand(units.index, self.shape(node.args[0]))
        if self.recorder is None:
            self.value(node, where)
        self.units[node] = Units(units.source, F.pad(index, list(pad), value=-1))

    def add(self, node: fx.Node, where: str) -> None:
        """A residual add of two gated paths (max of their masks); adding a parameter needs a gate after it."""
        self.resolve(node, where, ungated=True)
        tensors = [a for a in _tensor_args(node) if a in self.units]
        parts = [self.units[a] for a in tensors]
        if len(parts) == 1 and isinstance(parts[0], Units | _Scale):
            # a number added: closed units become nonzero, so the result may only scale a gated tensor
            self.units[node] = parts[0] if isinstance(parts[0], _Scale) else _Scale(parts[0])
            return
        if len(parts) != 2:
            raise ConversionError(f"{where}: adds {len(parts)} tensors")
        if any(isinstance(p, _Ungated) for p in parts):
            self.units[node] = self.add_parameter(parts, where)
            return
        if any(isinstance(p, _Flat | tuple) for p in parts):
            raise ConversionError(f"{where}: adds a flattened map or a tuple")
        if any(isinstance(p, _Scale) for p in parts):
            raise ConversionError(f"{where}: adds the output of a sigmoid-like activation")
        if any(p is None for p in parts):
            raise ConversionError(f"{where}: a residual add must sum two gated paths, got {len(parts)} "
                                  "tensor(s), some of them raw input data")
        self.units[node] = _residual(*parts)

    def add_parameter(self, parts: list[Any], where: str) -> _Ungated:
        units: list[Units] = []
        params: list[tuple[str, Tensor]] = []
        for part in parts:
            if isinstance(part, Units):
                units.append(part)
            elif isinstance(part, _Ungated):
                units += [part.units] if part.units is not None else []
                params += part.params
            else:
                raise ConversionError(f"{where}: adds a parameter to raw data or a scale")
        return _Ungated(_residual(*units) if len(units) == 2 else units[0] if units else None, tuple(params))

    def product(self, node: fx.Node, where: str) -> None:
        """A gated tensor times a number, raw data, a squeeze-excitation scale or a per-unit parameter."""
        self.resolve(node, where, ungated=True)
        for arg in [a for a in _tensor_args(node) if a in self.units]:
            if isinstance(self.units[arg], _Ungated) and self.units[arg].units is not None:
                self.regate(arg, self.units[arg], where)
        parts = [self.units[a] for a in _tensor_args(node) if a in self.units]
        if len(parts) == 1:  # times a number
            self.units[node] = parts[0]
            return
        gated = [p for p in parts if isinstance(p, Units)]
        others = [p for p in parts if not isinstance(p, Units)]
        if len(parts) != 2 or len(gated) != 1:
            raise ConversionError(f"{where}: a product of tensors is supported as a gated tensor times a "
                                  "squeeze-excitation scale (sigmoid of a branch of it), raw data or a per-unit "
                                  "parameter (a layer scale)")
        other = others[0]
        if isinstance(other, _Ungated):
            if other.units is not None:
                raise ConversionError(f"{where}: multiplies two gated tensors")
            for target, elements in other.params:
                self.protect(target, elements, gated[0].index, gated[0].source, where)
        elif isinstance(other, _Flat | tuple):
            raise ConversionError(f"{where}: multiplies a flattened map or a tuple")
        elif other is None:
            self.buffer_product(node, next(a for a in _tensor_args(node) if self.units.get(a, 0) is None), gated[0])
        self.units[node] = gated[0]

    def buffer_product(self, node: fx.Node, other: fx.Node, gated: Units) -> None:
        """A gated tensor times a tensor of buffers or data: a buffer with an entry per unit (a fixed per-channel
        scale; of unknown shape without an example input) becomes a wired :class:`BufferUse`, so export keeps those
        units whole (its entries stay aligned)."""
        shape = self.shape(other)
        buffers = [n for n in _ancestors(other) if n.op == "get_attr" and isinstance(_attribute(self.gm, n.target),
                                                                                   Tensor)]
        if shape is not None:  # per unit: it varies along a dim the units vary along
            rank = min(len(shape), gated.index.dim())
            buffers = buffers if any(shape[d] > 1 and gated.index.shape[d] > 1 for d in range(-rank, 0)) else []
        for buffer in buffers:
            if buffer.target in self.used_buffers:
                self.layers.append(Layer(self.used_buffers[buffer.target], out=gated.source))
                continue
            owner, _, name = buffer.target.rpartition(".")
            holder = self.gm.get_submodule(owner)
            value = holder._buffers.pop(name) if name in holder._buffers else _attribute(self.gm, buffer.target)
            use = BufferUse(value)
            module_name = _free_name(self.gm, f"{buffer.target}_use".replace(".", "_"))
            self.gm.add_submodule(module_name, use)
            for read in [n for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == buffer.target]:
                with self.gm.graph.inserting_after(read):
                    new = self.gm.graph.call_module(module_name)
                read.replace_all_uses_with(new)
                self.same_shape(new, read)
                self.units[new] = None
                self.gm.graph.erase_node(read)
            self.used_buffers[buffer.target] = use
            self.layers.append(Layer(use, out=gated.source))

    def divide(self, node: fx.Node, where: str) -> None:
        """Division by a number keeps 0 at 0 (and a scale a scale)."""
        self.resolve(node, where)
        tensors = [a for a in _tensor_args(node) if a in self.units]
        if len(tensors) != 1 or node.args[0] is not tensors[0]:
            raise ConversionError(f"{where}: only a division by a number keeps the units")
        self.units[node] = self.units[tensors[0]]

    def cat(self, node: fx.Node, where: str) -> None:
        """A concatenation: joins the parts' units (a Concat of their sources) and parameter entries."""
        self.resolve(node, where, ungated=True)
        inputs = list(node.args[0]) if node.args else list(node.kwargs["tensors"])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = [self.units.get(a) for a in inputs]
        if any(isinstance(p, _Scale | _Flat | tuple) for p in parts):
            raise ConversionError(f"{where}: concatenates a flattened map, a scale or a tuple")
        if all(p is None for p in parts):
            self.units[node] = None
            return
        if any(p is None for p in parts):
            raise ConversionError(f"{where}: concatenates raw data with gated tensors")
        shapes = [self.shape(a) for a in inputs]
        rank = next((len(s) for s in shapes if s is not None), None)
        if rank is None:
            rank = next((p.rank for p in parts if isinstance(p, Units) and p.rank is not None), None)
        if isinstance(dim, fx.Node):
            dim = self.value(dim, where)
        if dim < 0:
            if rank is None:
                raise ConversionError(f"{where}: concatenates along dim {dim} of a tensor of unknown rank; pass "
                                      "example_input")
            dim %= rank
        pieces = [p if isinstance(p, _Ungated) else _Ungated(p, ()) for p in parts]
        with_units = [p.units for p in pieces if p.units is not None]
        offsets: dict[int, int] = {}
        joined: list[MaskSource] = []
        for u in with_units:
            if id(u.source) not in offsets:
                offsets[id(u.source)] = sum(s.num_features for s in joined)
                joined.append(u.source)
        source = joined[0] if len(joined) == 1 else Concat(*joined) if joined else None

        def size(i: int, index: Tensor | None) -> int:
            if shapes[i] is not None:
                return shapes[i][dim]
            if index is not None and index.dim() > dim and index.shape[dim] > 1:
                return index.shape[dim]
            raise ConversionError(f"{where}: concatenates along dim {dim}, where a part's size is known only from "
                                  "shapes; pass example_input")

        def column(i: int, index: Tensor | None, offset: int) -> Tensor:
            n = size(i, index)
            if index is None:
                return torch.full([n if d == dim else 1 for d in range(max(rank or 0, dim + 1))], -1)
            index = torch.where(index >= 0, index + offset, index)
            return index.expand(*index.shape[:dim], n, *index.shape[dim + 1:]) if index.shape[dim] == 1 else index

        def joined_index(parts_index: list[Tensor | None], offsets_of: list[int]) -> Tensor:
            columns = [column(i, ix, off) for i, (ix, off) in enumerate(zip(parts_index, offsets_of, strict=True))]
            ranks = max(c.dim() for c in columns)
            columns = [c.view(*([1] * (ranks - c.dim())), *c.shape) if c.dim() < ranks else c for c in columns]
            sizes = [max(c.shape[d] for c in columns) if d != dim else None for d in range(ranks)]
            columns = [c.expand(*[c.shape[d] if d == dim else sizes[d] for d in range(ranks)]) for c in columns]
            return torch.cat(columns, dim)

        unit_index = None
        if with_units:
            unit_index = Units(source, joined_index(
                [p.units.index if p.units is not None else None for p in pieces],
                [offsets[id(p.units.source)] if p.units is not None else 0 for p in pieces]))
        targets = list(dict.fromkeys(t for p in pieces for t, _ in p.params))
        params = tuple((t, joined_index([dict(p.params).get(t) for p in pieces], [0] * len(pieces))) for t in targets)
        self.units[node] = unit_index if not params else _Ungated(unit_index, params)

    def reduce(self, node: fx.Node, where: str) -> None:
        """A mean, sum or max over dims the units do not vary in keeps them (a global average pool)."""
        self.resolve(node, where)
        units = self.gated(node.args[0], where)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dims = (dims,) if isinstance(dims, int) else dims
        if units is None:
            self.units[node] = None
            return
        rank = units.rank
        if not isinstance(dims, tuple | list) or not dims or not all(isinstance(d, int) for d in dims) or (
                rank is None and any(d >= 0 for d in dims)):
            raise ConversionError(f"{where}: only a mean over dims the units do not vary in (spatial dims, tokens) "
                                  f"keeps the units, got dim={dims!r}")
        dims = sorted(d % rank if rank is not None else d for d in dims)
        if any(units.index.shape[d] != 1 for d in dims):
            raise ConversionError(f"{where}: only a mean over dims the units do not vary in (spatial dims, tokens) "
                                  f"keeps the units, got dim={list(dims)} (it would mix units)")
        index = units.index if keepdim else units.index.squeeze(tuple(dims))
        self.units[node] = Units(units.source, index)

    def output_of(self, node: fx.Node) -> fx.Node | None:
        """The output ``node`` gives (itself, or the last node before the output), when it is one of the model's
        outputs as it is or through ops that keep each class apart only (identities, flattens, unit-wise
        activations, dropout and pooling: a convolutional classifier's ReLU and global pool); else ``None``."""
        while True:
            users = list(node.users)
            if len(users) == 1 and (users[0].op == "output" or (
                    is_structure(users[0]) and [u.op for u in users[0].users] == ["output"])):
                return node
            if len(users) != 1:
                return None
            user = users[0]
            passes = (user.op == "call_module" and isinstance(self.gm.get_submodule(user.target),
                                                              (nn.Flatten, *_UNITWISE_MODULES))) or \
                (user.op == "call_method" and user.target in {"flatten", *_UNITWISE_METHODS}) or \
                (user.op == "call_function" and user.target in {torch.flatten, *_UNITWISE_FUNCTIONS})
            if not passes or user.args[0] is not node:
                return None
            node = user

    def classifier(self, node: fx.Node, module: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d, where: str) -> None:
        if isinstance(module, nn.Linear):
            counts = self.num_classes or [module.out_features] * self.num_tasks
            heads = TaskHeads(module.in_features, counts, num_tasks=self.num_tasks, bias=module.bias is not None)
        else:
            if module.groups != 1:
                raise ConversionError(f"{where}: a convolutional classifier must have groups=1, got "
                                      f"groups={module.groups}")
            counts = self.num_classes or [module.out_channels] * self.num_tasks
            heads = TaskHeads(module.in_channels, counts, num_tasks=self.num_tasks, conv=module)
        heads = heads.to(device=module.weight.device, dtype=module.weight.dtype)
        if self.num_classes is None:
            # every task starts from the model's own head, so open gates reproduce the original outputs
            for head in heads.heads:
                head.load_state_dict(module.state_dict())
        self.gm.delete_submodule(node.target)
        self.gm.add_submodule(node.target, Heads(heads))
        node.args = (node.args[0], self.task)

    def output(self, node: fx.Node) -> None:
        result = node.args[0]
        if isinstance(result, Mapping) and isinstance(result.get("logits"), fx.Node):
            node.args = (result["logits"],)  # a transformers output object: the converted model returns its logits
        for source in [a for a in node.all_input_nodes if a in self.pending]:
            self.gate_weighted(source)
        if not any(isinstance(m, Heads) for m in self.gm.modules()):
            result = node.args[0]
            if isinstance(result, fx.Node) and result.op == "call_module":
                where = f"module {result.target!r} ({type(self.gm.get_submodule(result.target)).__name__})"
            else:
                where = _where(result) if isinstance(result, fx.Node) else "module"
            raise ConversionError(f"{where}: gives the model's output, which must come from a final nn.Linear or "
                                  "convolution (the classifier, which becomes one head per task), followed only by "
                                  "flattens, unit-wise activations, dropout or pooling")


def _attention_einsum(equation: str) -> str | None:
    """``"scores"`` for an einsum equation that is ``q @ kᵀ`` over shared leading dims, ``"values"`` for
    ``scores @ v``, else ``None``."""
    operands, arrow, out = equation.replace(" ", "").partition("->")
    parts = operands.split(",")
    if not arrow or len(parts) != 2 or "." in equation or len({len(parts[0]), len(parts[1]), len(out)}) != 1 or \
            len(out) < 2 or len(set(out)) != len(out):
        return None
    a, b = parts
    if not a[:-2] == b[:-2] == out[:-2]:
        return None
    if a[-1] == b[-1] and a[-2] != b[-2] and out[-2:] == a[-2] + b[-2] and a[-1] not in out:
        return "scores"
    if a[-1] == b[-2] and out[-2] == a[-2] and out[-1] == b[-1] and a[-1] not in out and a[-2] != b[-1]:
        return "values"
    return None


def _residual(a: Units, b: Units) -> Units:
    """The units of ``a + b``: a unit is used where it is used on either path (elementwise max)."""
    ia, ib = torch.broadcast_tensors(a.index, b.index)
    if a.source is b.source and torch.equal(ia, ib):
        return Units(a.source, ia)
    if torch.equal(ia, ib) and a.source.num_features == b.source.num_features:
        return Units(Residual(a.source, b.source), ia)
    pairs, inverse = torch.unique(torch.stack([ia.reshape(-1), ib.reshape(-1)]), dim=1, return_inverse=True)
    return Units(Residual(Select(a.source, pairs[0]), Select(b.source, pairs[1])), inverse.view(ia.shape))


class _GatheredByData(Exception):
    """A parameter indexed or shaped by a tensor: its entries no longer follow positions."""


def _parameters_of(kinds: list[Any]) -> tuple[str, ...]:
    found = [t for k in kinds if isinstance(k, _Derived) for t in k.params]
    found += [t for k in kinds if isinstance(k, _Ungated) for t, _ in k.params]
    return tuple(dict.fromkeys(found))


def _is_view(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` may give a view of its first argument (an op that only moves values)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _MOVES_MODULES)
    return (node.op == "call_method" and node.target in _MOVES_METHODS) or \
        (node.op == "call_function" and node.target in _MOVES_FUNCTIONS)


def _ancestors(node: fx.Node) -> list[fx.Node]:
    """``node`` and every node it is computed from."""
    found, stack = {}, [node]
    while stack:
        current = stack.pop()
        if current not in found:
            found[current] = None
            stack.extend(current.all_input_nodes)
    return list(found)


def _reads_metadata(node: fx.Node) -> bool:
    """Whether ``node`` reads only a tensor's shape, rank, dtype or device."""
    return (node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRIBUTES) or \
        (node.op == "call_method" and node.target in _SHAPE_METHODS)


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def _free_name(gm: fx.GraphModule, name: str) -> str:
    """``name``, or ``name_2``, ``name_3``… if the graph module already has a submodule or attribute so named."""
    candidate, k = name, 2
    while hasattr(gm, candidate):
        candidate, k = f"{name}_{k}", k + 1
    return candidate


def _only_checks(node: fx.Node) -> bool:
    """Whether every use of ``node`` is a comparison or assertion that fx's tracer adds for a concrete argument."""
    return all(user.op == "call_function" and (user.target in (operator.eq, operator.ne, operator.is_,
                                                                operator.not_)
                                               or getattr(user.target, "__name__", "").startswith("_assert"))
               and _only_checks(user) for user in node.users)


def _erase_with_users(node: fx.Node) -> None:
    for user in list(node.users):
        _erase_with_users(user)
    node.graph.erase_node(node)


def convert(
    module: nn.Module,
    *,
    num_tasks: int,
    norm: str | NormSpec | Mapping[str, str | NormSpec] = "masked_bn",
    num_classes: int | Sequence[int] | None = None,
    s_max: float = 400.0,
    example_input: Tensor | None = None,
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
        example_input: a batch the model takes (e.g. ``torch.randn(2, 3, 224, 224)``), run once in
            evaluation mode without gradients (no statistic moves). Needed for models whose forward moves
            units by shapes it reads (``x.view(b, g, c // g, h, w)``, a split, a window partition) or adds
            a parameter to a gated tensor (a position embedding); models of layers, norms, activations,
            pools, residual adds, concatenations and a flatten before the classifier convert without it.

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
    traced = copy.deepcopy(module).eval()
    try:
        gm = trace(traced)
    except Exception as error:  # torch.fx raises many types for untraceable code
        if example_input is None:
            raise ConversionError(f"module: torch.fx cannot trace {type(module).__name__}: {error}; with "
                                  "example_input, convert traces it alongside that batch (shape reads iterated, "
                                  "conditions on shapes taken as they hold for it)") from error
        try:
            gm = trace(traced, example_input)
        except Exception as again:  # still untraceable: data-dependent control flow
            raise ConversionError(f"module: torch.fx cannot trace {type(module).__name__}, even alongside "
                                  f"example_input: {again}") from again
    kept = training_graph(traced, gm, example_input if isinstance(example_input, Tensor) else None)
    logits = None
    if kept is not None:  # auxiliary heads: convert the training graph, whose evaluation part is gm
        gm, logits = kept.graph, kept.logits
    recorder = None
    if example_input is not None:
        if not isinstance(example_input, Tensor) or example_input.dim() < 1 or example_input.numel() == 0:
            raise TypeError(f"example_input must be a non-empty batch tensor [N, ...], got {example_input!r:.80}")
        try:
            recorder = record(gm, example_input)
        except Exception as error:  # whatever the model raises for an input it cannot take
            raise ValueError(f"example_input: the model cannot take a batch of shape {list(example_input.shape)}: "
                             f"{error}") from error
    converter = _Converter(gm, traced, norms, num_tasks, counts, s_max, recorder, logits)
    layers = converter.run()
    evaluation = None if logits is None else EvaluationForward(evaluation_graph(gm, logits))
    return ConvertedModel(gm, layers, converter.head_units, evaluation).train(module.training)


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



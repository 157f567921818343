"""Handler of the functional norms (``F.batch_norm``, ``F.layer_norm``, ``F.group_norm``, ``F.rms_norm``) in the
forms a forward writes them: on a torch norm module's own parameters (:data:`~.ops_layers.FUNCTIONAL_NORM`), and
over the units with an affine read from parameters of any module, through a dtype cast or with none at all (timm's
``LayerNorm(affine=False)`` in Qwen3-ViT's classifier, ``RmsNormFp32``'s ``rms_norm(x.float(), shape,
self.weight.float(), eps)`` in DeepSeek-ViT). A layer, RMS or group norm's statistics are each position's (or each
sample's group's) own and its affine is one entry per unit, so the call is the torch norm it computes, which the
task-aware norm then replaces, its γ and β the parameters the call read."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from hatnorm._convert.error import ConversionError
from hatnorm._convert.norms import norm_modules
from hatnorm._convert.ops_layers import FUNCTIONAL_NORM, FUNCTIONAL_NORMS, _check_rows, replace_norm
from hatnorm._convert.params import ComputedWeightConv, UnitRows
from hatnorm._convert.state import WalkState, ancestors, attribute, free_name
from hatnorm._convert.table import Handler
from hatnorm._convert.values import Ungated

#: each functional norm's arguments, in order
ARGUMENTS = {F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
             F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
             F.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
             F.rms_norm: ("input", "normalized_shape", "weight", "eps")}
#: tensor methods that only change a tensor's dtype (a float32 model: the same values)
CASTS = {"float", "to", "type_as", "half", "bfloat16", "double"}
_CONVS = (F.conv1d, F.conv2d, F.conv3d)
#: a functional convolution's options after its bias, and their defaults
_OPTIONS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _bound(node: fx.Node) -> dict[str, object]:
    names = ARGUMENTS[node.target]
    return dict(zip(names, node.args, strict=False)) | {k: v for k, v in node.kwargs.items() if k in names}


def _on_norm_module(state: WalkState, bound: dict[str, object]) -> bool:
    """Whether the call reads the parameters (and statistics) of one torch norm module as they are: the form
    :data:`~.ops_layers.FUNCTIONAL_NORM` converts."""
    attributes = [v for k, v in bound.items() if k not in ("input",) and isinstance(v, fx.Node)]
    if not attributes or any(a.op != "get_attr" for a in attributes):
        return False
    owners = {a.target.rpartition(".")[0] for a in attributes}
    return len(owners) == 1 and isinstance(state.traced.get_submodule(owners.pop()), norm_modules())


def _parameter(state: WalkState, value: object, name: str, where: str) -> tuple[fx.Node | None, torch.Tensor | None]:
    """The graph read (a ``get_attr``, directly or through a dtype cast that only this call reads) and the value of
    the norm's ``name`` argument, or ``(None, None)`` when the call has none."""
    if value is None:
        return None, None
    read = value
    while isinstance(read, fx.Node) and read.op == "call_method" and read.target in CASTS and len(read.users) == 1:
        read = read.args[0]
    if not isinstance(read, fx.Node) or read.op != "get_attr" or len(read.users) != 1 or not isinstance(
            attribute(state.gm, read.target), nn.Parameter):
        raise ConversionError(f"{where}: a functional norm is converted when its {name} is a parameter of the model "
                              "as it is (or cast to another dtype) that nothing else reads, or none")
    if sum(1 for n in state.gm.graph.nodes if n.op == "get_attr" and n.target == read.target) != 1:
        raise ConversionError(f"{where}: the norm's {name} {read.target!r} is read in more than one place; each "
                              "use would need its own protection")
    return read, attribute(state.gm, read.target)


def _torch_norm(state: WalkState, node: fx.Node, bound: dict[str, object], where: str) -> tuple[nn.Module, int]:
    """The torch norm (with γ and β: 1 and 0 where the call has none) that the call computes, and its units' dim."""
    weight_read, weight = _parameter(state, bound.get("weight"), "weight", where)
    bias_read, bias = _parameter(state, bound.get("bias"), "bias", where)
    eps = bound.get("eps")
    eps = state.value(eps, where) if isinstance(eps, fx.Node) else eps
    if node.target is F.group_norm:
        groups = bound.get("num_groups")
        groups = state.value(groups, where) if isinstance(groups, fx.Node) else groups
        shape = state.shape(bound["input"])
        channels = weight.shape[0] if weight is not None else shape[1] if shape is not None else None
        if channels is None:
            raise ConversionError(f"{where}: a group norm without γ reads a tensor of unknown channels; pass "
                                  "example_input")
        norm: nn.Module = nn.GroupNorm(groups, channels, eps=1e-5 if eps is None else eps)
    else:
        normalized = bound.get("normalized_shape")
        normalized = state.value(normalized, where) if isinstance(normalized, fx.Node) else normalized
        normalized = [normalized] if isinstance(normalized, int) else list(normalized)
        if len(normalized) != 1:
            raise ConversionError(f"{where}: a functional norm over {len(normalized)} dims; only a norm over the "
                                  "last dim (the units) converts")
        if node.target is F.layer_norm:
            norm = nn.LayerNorm(normalized, eps=1e-5 if eps is None else eps)
        else:
            norm = nn.RMSNorm(normalized, eps=eps)
    for value in (weight, bias):
        if value is not None and value.shape != norm.weight.shape:
            raise ConversionError(f"{where}: a functional norm whose γ or β has shape {tuple(value.shape)}, not one "
                                  f"entry per unit {tuple(norm.weight.shape)}")
    with torch.no_grad():
        if weight is not None:
            norm.weight.copy_(weight)
        if bias is not None and getattr(norm, "bias", None) is not None:
            norm.bias.copy_(bias)
    reads = [r for r in (weight_read, bias_read) if r is not None]
    state.consumed.update(r.target for r in reads)
    for read in reads:
        state.units.pop(read, None)
    device = next((v.device for v in (weight, bias) if v is not None), None)
    return (norm.to(device) if device is not None else norm), FUNCTIONAL_NORMS[node.target]


def _conv_reading(node: fx.Node) -> fx.Node | None:
    """The ``F.conv*d`` call that reads ``node``'s value as its weight, through ops that each only it reads."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.target in _CONVS:
            weight = user.args[1] if len(user.args) > 1 else user.kwargs.get("weight")
            return user if weight is node and user.args[0] is not node else None
        if user.op not in ("call_method", "call_function") or not user.args or user.args[0] is not node:
            return None
        node = user
    return None


def _weight_computation(state: WalkState, node: fx.Node, where: str) -> tuple[fx.Node, set[fx.Node], str]:
    """The convolution whose weight ``node`` (a batch norm over a parameter's values) computes, the nodes of that
    computation and the module whose parameters it reads, checked: the module's own parameters alone (its weight among
    them), one row per output unit each, read by nothing else; the convolution's input computed before it."""
    conv = _conv_reading(node)
    if conv is None:
        raise ConversionError(f"{where}: a batch norm over a parameter's values (weight standardisation) is converted "
                              "when it computes the weight of a convolution (F.conv1d/2d/3d)")
    weight = conv.args[1] if len(conv.args) > 1 else conv.kwargs["weight"]
    bias = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
    computed = set(ancestors(weight))
    reads = [n for n in computed if n.op == "get_attr"] + ([bias] if bias is not None else [])
    owners = {n.target.rpartition(".")[0] if isinstance(n, fx.Node) and n.op == "get_attr" else None for n in reads}
    owner = next(iter(owners)) if len(owners) == 1 else None
    module = state.traced.get_submodule(owner) if owner is not None else None
    own = isinstance(module, nn.modules.conv._ConvNd) and f"{owner}.weight" in {n.target for n in reads} and all(
        isinstance(attribute(state.gm, n.target), nn.Parameter) and attribute(state.gm, n.target).shape[0] ==
        module.out_channels for n in reads)
    alone = all(n.op in ("get_attr", "call_function", "call_method") for n in computed) and all(
        u in computed or u is conv for n in [*computed, *reads] for u in n.users)
    if not (own and alone):
        raise ConversionError(f"{where}: a convolution's weight standardised in the forward is converted when it is "
                              "computed from the convolution module's own parameters alone (one row per output unit "
                              "each), which nothing else reads")
    if conv.args[0] not in state.units and conv.args[0] not in state.pending:
        raise ConversionError(f"{where}: a convolution's standardised weight is converted when the convolution's "
                              "input is computed before its weight")
    return conv, computed, owner


def _standardised_weight(state: WalkState, node: fx.Node, where: str) -> None:
    """``F.batch_norm`` over a parameter's values (weight standardisation written in a forward that is traced into:
    timm's ``StdConv2dSame`` pads by the input's size first): each row, one output unit's weights, standardised by its
    own statistics, then a convolution by it. The computation of the weight and the convolution become one
    :class:`~.params.ComputedWeightConv`, which :class:`~.params.UnitRows` protects row by row, as a
    weight-standardised convolution kept as one call; a probe checks that a row moves only its own output unit."""
    conv, computed, owner = _weight_computation(state, node, where)
    holder = state.gm.get_submodule(owner)
    graph, copies, parameters = fx.Graph(), {}, {}
    for n in [n for n in state.gm.graph.nodes if n in computed]:
        if n.op == "get_attr":
            copies[n] = graph.placeholder(n.target.rpartition(".")[2])
            parameters[copies[n].target] = holder._parameters.pop(copies[n].target)
        else:
            copies[n] = graph.node_copy(n, lambda a: copies[a])
    weight = conv.args[1] if len(conv.args) > 1 else conv.kwargs["weight"]
    graph.output(copies[weight])
    bias = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
    options = dict(zip(_OPTIONS, conv.args[3:], strict=False)) | {k: v for k, v in conv.kwargs.items() if k in _OPTIONS}
    extra = fx.node.map_arg(tuple(options.get(k, default) for k, default in _OPTIONS.items()),
                            lambda a: state.value(a, where))
    layer = UnitRows(ComputedWeightConv(
        parameters, fx.GraphModule(nn.Module(), graph),
        holder._parameters.pop(bias.target.rpartition(".")[2]) if bias is not None else None, conv.target, extra))
    name = free_name(state.gm, f"{owner}_conv".replace(".", "_"))
    state.gm.add_submodule(name, layer)
    source = conv.args[0]
    with state.gm.graph.inserting_after(conv):
        new = state.gm.graph.call_module(name, (source,))
    new.meta = dict(conv.meta)
    conv.replace_all_uses_with(new)
    state.same_shape(new, conv)
    state.gm.graph.erase_node(conv)
    for old in [*reversed([n for n in state.gm.graph.nodes if n in computed]), *([bias] if bias is not None else [])]:
        state.units.pop(old, None)
        state.gm.graph.erase_node(old)
    state.resolve(new, where)
    state.gated(source, where)
    _check_rows(state, source, layer.layer, where)
    state.pending[new] = (layer, None)  # every parameter protected by the output units only


def _functional_norm(state: WalkState, node: fx.Node, where: str) -> None:
    """A functional norm: on a torch norm module's own parameters, as :data:`~.ops_layers.FUNCTIONAL_NORM` converts
    it; a layer, RMS or group norm with its affine read from any parameters (through a dtype cast) or with none, as
    the torch norm it computes. A batch norm on anything but a norm module's own statistics is refused: its
    statistics would be the batch's, or of a tensor other than the data (a convolution's weight, standardised)."""
    bound = _bound(node)
    kind = state.units.get(bound["input"])
    if node.target is F.batch_norm and isinstance(kind, Ungated) and kind.units is None:
        _standardised_weight(state, node, where)
        return
    if _on_norm_module(state, bound) or node.target is F.batch_norm:
        FUNCTIONAL_NORM.apply(state, node, where)
        return
    norm, dim = _torch_norm(state, node, bound, where)
    node.args, node.kwargs = (bound["input"],), {}
    replace_norm(state, node, norm, dim, where)


#: every functional norm, in the forms above
FUNCTIONAL_NORM_FORMS = Handler("functional norm", _functional_norm, first=True)

"""Handlers of the layers: torch norms (modules, or functional norms on a module's parameters) become a
task-aware norm and its gate; Linear and convolutions (modules, or functional on a module's own weights) find
their input units and await a norm or a gate of their own; the layer that gives the model's output becomes one
head per task."""

from __future__ import annotations

import operator
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from hatnorm._convert.error import ConversionError
from hatnorm._convert.norms import make_norm, norm_modules, num_features
from hatnorm._convert.ops_elementwise import ADD, DIVIDE, PASSES, POOL, PRODUCT, UNITWISE, rewritten
from hatnorm._convert.ops_shapes import REDUCE, STACK
from hatnorm._convert.params import TransposedConv, UnitRows
from hatnorm._convert.runtime import GatedNorm, Heads
from hatnorm._convert.source import where as where_of
from hatnorm._convert.state import WalkState, ancestors, free_name
from hatnorm._convert.table import OPS, Handler
from hatnorm._convert.tracing import is_reparameterised_conv
from hatnorm._convert.train_graph import is_structure
from hatnorm._convert.units import Units
from hatnorm._convert.values import Derived, Scores, Ungated, tensor_args
from hatnorm._hat import Layer
from hatnorm._heads import TaskHeads
from hatnorm._masks import MaskSource, Residual, Select

#: functional norms on a module's parameters → their channel dim
FUNCTIONAL_NORMS = {F.batch_norm: 1, F.layer_norm: -1, F.group_norm: 1, F.rms_norm: -1}
#: functional layers on a module's own weight → the torch layer they compute
FUNCTIONAL_LAYERS = {F.linear: nn.Linear, F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}


def replace_norm(state: WalkState, node: fx.Node, module: nn.Module, dim: int, where: str) -> fx.Node:
    """Replace a torch norm (called as a module, or functionally on ``module``'s parameters) by the task-aware
    norm and its gate; a weighted layer that only feeds it takes the gate as its output units."""
    source = node.args[0]
    rank = state.rank(source)
    if rank is None and dim == 1:
        if not isinstance(module, nn.BatchNorm2d):
            raise ConversionError(f"{where}: a channels-first norm reads a tensor of unknown rank; pass "
                                  "example_input")
        rank = 4
    norm = make_norm(module, state.norms.for_module(module, where), state.num_tasks, where)
    gate = state.new_gate(num_features(module))
    if source in state.pending and len(source.users) == 1:
        weighted, inp = state.pending.pop(source)
        state.layers.append(Layer(weighted, out=gate, inp=inp))
    else:
        state.resolve(node, where)
        state.gated(node.args[0], where)
    source = node.args[0]
    gated = GatedNorm(norm, gate)
    if node.op == "call_module":
        state.gm.delete_submodule(node.target)
        state.gm.add_submodule(node.target, gated)
        node.args, node.kwargs = (source, state.task, state.s), {}
        new = node
    else:
        name = free_name(state.gm, f"{node.name}_norm")
        state.gm.add_submodule(name, gated)
        with state.gm.graph.inserting_after(node):
            new = state.gm.graph.call_module(name, (source, state.task, state.s))
        node.replace_all_uses_with(new)
        state.same_shape(new, node)
        state.gm.graph.erase_node(node)
    state.layers.append(Layer(gated.norm, out=gate))
    state.units[new] = Units.of_gate(gate, rank, dim)
    return new


def _functional_layer(state: WalkState, node: fx.Node, where: str) -> None:
    """``F.linear``/``F.conv*d`` on the parameters of a ``nn.Linear``/``nn.Conv*d`` subclass (timm's ``Linear``):
    the call becomes the layer itself, a torch layer holding the same parameters."""
    if all(a not in state.pending and state.units.get(a, 0) is None for a in tensor_args(node)):
        state.units[node] = None  # a fixed transform (a DCT by a buffer) of raw data: still data
        return
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if _fixed_depthwise(state, node, weight, where):
        return
    owner = weight.target.rpartition(".")[0] if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
    module = state.traced.get_submodule(owner) if owner is not None else None
    kind = FUNCTIONAL_LAYERS[node.target]
    if not isinstance(module, kind):
        raise ConversionError(f"{where}: a functional layer is converted when it reads the weight of a "
                              f"{kind.__name__} (subclass) as it is")
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    own = isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == f"{owner}.bias"
    # a bias of its own making (BEiT's and EVA's cat((q_bias, k_bias, v_bias)) for a bias-free Linear) is added
    # to the layer's output, an add the walk then follows
    added = bias if bias is not None and not own and module.bias is None and kind is nn.Linear else None
    if added is None and not (own or (bias is None and module.bias is None)):
        raise ConversionError(f"{where}: a functional layer is converted when it reads its module's own bias (or, "
                              "for a Linear without one, any bias)")
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
    name = free_name(state.gm, owner.replace(".", "_") + "_layer")
    state.gm.add_submodule(name, layer)
    del state.gm.get_submodule(owner)._parameters["weight"]
    if module.bias is not None:
        del state.gm.get_submodule(owner)._parameters["bias"]
    with state.gm.graph.inserting_after(node):
        new = state.gm.graph.call_module(name, (node.args[0],))
    node.replace_all_uses_with(new)
    state.same_shape(new, node)
    state.gm.graph.erase_node(node)
    for attribute in [a for a in (weight, bias) if isinstance(a, fx.Node) and a is not added]:
        if attribute.users:  # its shape read too (timm's conv2d_same pads by weight.shape): the layer's own now
            attribute.target = f"{name}.{attribute.target.rpartition('.')[2]}"
            continue
        state.units.pop(attribute, None)
        state.gm.graph.erase_node(attribute)
    layer_where = f"module {name!r} ({type(layer).__name__})"
    handler = OPS.lookup(layer)
    handler.apply(state, new, layer_where)
    if added is not None:
        with state.gm.graph.inserting_after(new):
            total = state.gm.graph.call_function(operator.add, (new, added))
        new.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
        rewritten(state, total, node, [new, added], where, ADD.apply)
        state.regate(total, state.units[total], where)  # a gate after the bias, as after a Linear's own


def _fixed_depthwise(state: WalkState, node: fx.Node, weight: object, where: str) -> bool:
    """A depthwise convolution by a fixed kernel (a buffer: TResNet's and the anti-aliased models' blur pool,
    ``F.conv2d(x, filt, stride=2, groups=channels)``), without bias: each output channel a fixed weighted sum over a
    window of its own input channel, 0 where that channel is 0, so it passes units like a pool. Whether ``node`` is
    one (and then its units are recorded)."""
    if node.target is F.linear or state.units.get(weight, 0) is not None or any(
            isinstance(state.units.get(a), Units) or a in state.pending for a in tensor_args(node) if a is not
            node.args[0]):
        return False
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, node.args, strict=False)) | {k: v for k, v in node.kwargs.items() if k in names}
    groups = bound.get("groups", 1)
    groups = state.value(groups, where) if isinstance(groups, fx.Node) else groups
    shape, kernel = state.shape(node.args[0]), state.shape(weight)
    if bound.get("bias") is not None or shape is None or kernel is None or not (
            groups == shape[1] == kernel[0] and kernel[1] == 1):
        return False
    POOL.apply(state, node, where)
    return True


def _functional_norm(state: WalkState, node: fx.Node, where: str) -> None:
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
    module = state.traced.get_submodule(owners.pop()) if len(owners) == 1 else None
    if module is None or not isinstance(module, norm_modules()):
        raise ConversionError(f"{where}: a functional norm is converted when it reads the parameters of a torch "
                              "norm module (a BatchNorm, LayerNorm, GroupNorm or RMSNorm subclass)")
    dim = FUNCTIONAL_NORMS[node.target]
    if node.target is F.layer_norm and len(module.normalized_shape) != 1:
        raise ConversionError(f"{where}: only a LayerNorm over the last dim is supported")
    state.consumed.update(a.target for a in attributes)
    for attribute in attributes:
        state.units.pop(attribute, None)
    node.args, node.kwargs = (bound["input"],), {}
    replace_norm(state, node, module, dim, where)


def _weighted(state: WalkState, node: fx.Node, where: str) -> None:
    module = state.module(node)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        module = _transposed(state, node, module, where)
    if _on_constants(state, node, module, where) or _on_scores(state, node, module, where):
        return
    state.resolve(node, where)
    source = node.args[0]
    if isinstance(module, nn.Linear) and _over_positions(state, node, module, where):
        return
    if isinstance(module, nn.Linear):
        units = _read(state, source, -1, module.in_features, where)
    elif isinstance(module, TransposedConv):
        state.pending[node] = (module, _read(state, source, 1, module.in_channels, where))
        return
    else:
        units = _read(state, source, 1, module.in_channels, where)
    output = output_of(state, node) if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) else None
    if is_reparameterised_conv(module):
        if output is not None:
            raise ConversionError(f"{where}: a classifier that computes its own weight is not supported")
        _check_rows(state, source, module, where)
        state.gm.delete_submodule(node.target)
        state.gm.add_submodule(node.target, UnitRows(module))
        state.pending[node] = (state.module(node), None)  # every parameter protected by the output units only
        return
    if output is not None:
        _classifier(state, node, module, where)
        if state.logits is None or output is state.logits:  # the heads export prunes by these units
            state.head_units = units
        _weights_per_task(state, node, units)
        return
    state.pending[node] = (module, units)


#: the most layouts of its input units along other dims a layer's weights are protected by the join of
_JOINED = 8


def _read(state: WalkState, source: fx.Node, dim: int, size: int, where: str) -> MaskSource | None:
    """The units a layer reads along ``dim`` (see :meth:`~.state.WalkState.read`); where they also vary along other
    dims, feature by feature (CvT's cls token joined to the tokens of a convolutional projection, ``cat((cls_token,
    query), 1)``, each holding its own gate's units, then read by one Linear), a weight of feature i meets the unit of
    feature i at every position, so it is protected as a residual add's: by the join of those units (used where any is
    used). Only for a few parts (at most :data:`_JOINED` layouts of the units); more, as where the units vary along
    both dims (``t + tᵀ``), is refused: each weight would be protected by nearly every unit."""
    units = state.units.get(source)
    if isinstance(units, Units) and units.index.dim() > 1 and units.index.shape[dim] == size > 1:
        moved = units.index.movedim(dim, -1)
        rows = torch.unique(moved.reshape(-1, size), dim=0)
        rows = rows[(rows >= 0).any(1)]  # positions that are always 0 (padding) meet no unit
        if 1 < len(rows) <= _JOINED:
            return Residual(*(Select(units.source, row) for row in rows))
    return state.read(source, dim, size, where)


#: the functional convolution of each number of spatial dims
_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _on_constants(state: WalkState, node: fx.Node, module: nn.Module, where: str) -> bool:
    """A Linear or convolution on values that do not depend on the input (a buffer of coordinates, or values
    computed from parameters: Swin v2's continuous position bias MLP, ``mlp(relative_coords_log)``) computes values
    from parameters alone, the same for every input: no unit of a gate holds them, so, like a position bias table,
    they may only bias attention scores, and then each task gets its own copy of every parameter they come from. The
    call becomes ``F.linear``/``F.conv*d`` on the layer's parameters, which such a copy can replace. Whether ``node``
    is one."""
    source = node.args[0] if node.args else None
    kind = state.units.get(source) if isinstance(source, fx.Node) else 0
    constant = isinstance(kind, Derived) or (kind is None and source not in state.pending and not any(
        n.op == "placeholder" for n in ancestors(source)))
    if not constant or len(node.args) > 1 or node.kwargs:
        return False
    call, own = _on_own_parameters(state, node, module, f"{where}: a layer on values that do not depend on the input")
    state.units[call] = Derived((kind.params if isinstance(kind, Derived) else ()) + own)
    return True


def _on_scores(state: WalkState, node: fx.Node, module: nn.Module, where: str) -> bool:
    """A Linear or convolution over attention scores (talking heads: CaiT's ``proj_l``/``proj_w``, a Linear over the
    heads of the scores permuted heads-last; EfficientFormerV2's ``talking_head1``/``talking_head2``, 1×1 convolutions
    over the heads dim): it mixes the scores of the heads, which hold no unit, so its weights meet every unit of q, k
    and v; what it gives is scores still, which may only weigh the values (``scores @ v`` keeps v's units, whatever the
    weights: each output value is a weighted sum of one unit of v over the tokens). In a task's forward the scores
    depend only on that task's gated q and k (a head whose q or k units are all closed gives constant scores), so the
    layer's output is fixed once its weights are: each task gets its own copy of them, as of a position bias (the call
    becomes ``F.linear``/``F.conv*d`` on its parameters, copied per task when the scores weigh the values). Whether
    ``node`` is one."""
    scores = state.units.get(node.args[0]) if node.args else None
    if not isinstance(scores, Scores):
        return False
    if len(node.args) > 1 or node.kwargs:
        raise ConversionError(f"{where}: a layer over attention scores is converted when it is called on them alone")
    call, own = _on_own_parameters(state, node, module, f"{where}: a layer over attention scores (talking heads)")
    state.units[call] = Scores(tuple(dict.fromkeys(scores.params + own)))
    return True


def _on_own_parameters(state: WalkState, node: fx.Node, module: nn.Module,
                       what: str) -> tuple[fx.Node, tuple[str, ...]]:
    """The call of ``module``, a torch Linear or convolution with zero padding, as ``F.linear``/``F.conv*d`` on its
    parameters (see :func:`_as_functional`), which per-task copies can replace; ``what`` names it when it is neither."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        function, extra = F.linear, ()
    elif type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and module.padding_mode == "zeros":
        function, extra = _CONVS[module.weight.dim() - 2], (module.stride, module.padding, module.dilation,
                                                           module.groups)
    else:
        raise ConversionError(f"{what} is converted when it is a torch Linear or convolution (zero padding), got "
                              f"{type(module).__name__}")
    return _as_functional(state, node, module, function, extra)


def _over_positions(state: WalkState, node: fx.Node, module: nn.Linear, where: str) -> bool:
    """A Linear over a dim the units do not vary in (MLP-Mixer's and ResMLP's token mixing, gMLP's spatial gating unit:
    ``proj(v.transpose(-1, -2))`` with the channels in dim -2): each output value mixes one unit's values at every
    position, so the units stay where they are, but its weight and bias are shared by every unit: each task gets its own
    copy (the call becomes ``F.linear`` on them). A bias makes a closed unit nonzero, so a gate follows before
    anything but a product reads it. Whether ``node`` is one."""
    units = state.units.get(node.args[0])
    if not isinstance(units, Units) or units.index.dim() < 2 or units.index.shape[-1] != 1 or \
            units.unit_dim() is None or type(module).forward is not nn.Linear.forward:
        return False
    biased = module.bias is not None
    call, trained = _as_functional(state, node, module, F.linear, ())
    state.per_task(trained, units.source)  # the copies take the parameters out of the module
    state.units[call] = Ungated(units, ()) if biased else units
    return True


def _as_functional(state: WalkState, node: fx.Node, module: nn.Module, function: object,
                   extra: tuple[object, ...]) -> tuple[fx.Node, tuple[str, ...]]:
    """Replace the call of ``module`` (a Linear or convolution) by ``function(input, weight, bias, *extra)`` on its
    parameters, read where they are; the new node and the graph targets of its trained parameters."""
    graph = state.gm.graph
    with graph.inserting_before(node):
        weight = graph.get_attr(f"{node.target}.weight")
        bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
        call = graph.call_function(function, (node.args[0], weight, bias, *extra))
    call.meta = dict(node.meta)
    state.same_shape(call, node)
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    return call, tuple(a.target for a in (weight, bias) if a is not None and
                       state.gm.get_parameter(a.target).requires_grad)


def _transposed(state: WalkState, node: fx.Node, module: nn.modules.conv._ConvTransposeNd,
                where: str) -> TransposedConv:
    """A transposed convolution becomes :class:`TransposedConv` (its weight stored as a convolution's), which a norm
    or a gate then follows like any convolution's output."""
    if len(node.args) > 1 or node.kwargs:
        raise ConversionError(f"{where}: a transposed convolution is converted when it is called on its input alone "
                              "(no output_size)")
    if output_of(state, node) is not None:
        raise ConversionError(f"{where}: a transposed convolution gives the model's output; the classifier must be a "
                              "Linear or a convolution")
    layer = TransposedConv(module)
    state.gm.delete_submodule(node.target)
    state.gm.add_submodule(node.target, layer)
    return layer


def _check_rows(state: WalkState, source: fx.Node, module: nn.Module, where: str) -> None:
    """Check on a probe that each output channel of a convolution computing its own weight (weight
    standardisation) depends on its own row of the weight alone, so protecting the rows by the output units is
    enough."""
    shape = state.shape(source)
    weight = module.weight
    x = torch.randn(*(shape if shape is not None else (2, module.in_channels, *[8] * (weight.dim() - 2))),
                    dtype=weight.dtype, device=weight.device)
    row = weight.shape[0] // 2
    saved = weight.detach().clone()
    with torch.no_grad():
        before = module(x)
        weight[row] += torch.randn_like(weight[row])
        after = module(x)
        weight.copy_(saved)
    moved = (after - before).abs().movedim(1, 0).reshape(weight.shape[0], -1).amax(1) > 0
    if bool(moved.sum() != moved[row]):
        raise ConversionError(f"{where}: computes its weight from its parameters (weight standardisation) in a way "
                              "where a change in one output unit's row moves other units' outputs; no gate can "
                              "protect that")


def output_of(state: WalkState, node: fx.Node) -> fx.Node | None:
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
        op = state.module(user) if user.op == "call_module" else user.target
        handler = OPS.lookup(op) if user.op in ("call_module", "call_method", "call_function") else None
        passes = handler is not None and (op in (torch.flatten, "flatten") or isinstance(op, nn.Flatten) or
                                          handler in (UNITWISE, POOL, PASSES)) and user.args[0] is node
        if not passes and not _over_samples(state, user, node, handler) and \
                not _combines_classifiers(state, user, node, handler):
            return None
        node = user


#: reductions that keep each class apart when taken over another dim (VOLO's token-labelling head: the most
#: confident token's logits, ``aux.max(1)[0]``)
_CLASS_REDUCTIONS = (torch.max, "max", torch.amax, "amax", torch.min, "min", torch.amin, "amin", torch.mean, "mean",
                     torch.sum, "sum")


def _over_samples(state: WalkState, user: fx.Node, node: fx.Node, handler: Handler | None) -> bool:
    """Whether ``user`` keeps each class of ``node``'s logits apart: a maximum, minimum, mean or sum over one dim that
    is not the classes' (the last), or the values of such a maximum or minimum."""
    if user.target is operator.getitem and user.args[0] is node and user.args[1] == 0:
        return node.target in (torch.max, "max", torch.min, "min")
    if handler is not REDUCE or user.target not in _CLASS_REDUCTIONS or user.args[0] is not node:
        return False
    dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
    shape = state.shape(node)
    return isinstance(dim, int) and shape is not None and dim % len(shape) != len(shape) - 1


def _from_classifiers(state: WalkState, node: fx.Node) -> bool:
    """Whether ``node`` is a classifier's output (a Linear, convolution or heads, or ``F.linear``/``F.conv*d`` on a
    layer's weight), as it is or through ops that keep each class apart (see :func:`_over_samples`, unit-wise ops,
    scaling by a number)."""
    while node.op != "call_module" or not isinstance(state.module(node), nn.Linear | nn.modules.conv._ConvNd | Heads):
        if node.target in FUNCTIONAL_LAYERS:  # a layer subclass's F.linear (timm's Linear), converted when reached
            return True
        if node.op not in ("call_module", "call_method", "call_function"):
            return False
        inputs = tensor_args(node)
        op = state.module(node) if node.op == "call_module" else node.target
        handler = OPS.lookup(op)
        if handler is PRODUCT:  # a number, or a weight learned for it (EfficientViM's softmax(weights)[i]), times it
            inputs = [a for a in inputs if not _of_parameters(state, a)]
        if len(inputs) != 1 or not (handler in (UNITWISE, POOL, PASSES, PRODUCT) or
                                    _over_samples(state, node, inputs[0], handler)):
            return False
        node = inputs[0]
    return True


def _combines_classifiers(state: WalkState, user: fx.Node, node: fx.Node, handler: Handler | None) -> bool:
    """Whether ``user`` averages classifiers (RepViT's and LeViT's ``(head(x) + head_dist(x)) / 2``, CrossViT's mean of
    its stacked heads, VOLO's ``head(x[:, 0]) + 0.5 * aux_head(x[:, 1:]).max(1)[0]``): a sum or stack of ``node`` and
    other classifiers' outputs (see :func:`_from_classifiers`), ``node`` scaled by a number, or the mean or sum of a
    stack of them over the stacked dim."""
    others = [a for a in tensor_args(user) if a is not node]
    if handler is PRODUCT:  # a number, or a weight computed from parameters alone, times the logits, on either side
        return all(_of_parameters(state, a) for a in others)
    if handler is DIVIDE:
        return not others and user.args[0] is node
    if handler is REDUCE and user.target in (torch.mean, torch.sum, "mean", "sum") and node.target is torch.stack:
        # CrossViT's torch.mean(torch.stack([head(x) for ...]), dim=0): the heads' logits averaged
        reduced = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        stacked = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return user.args[0] is node and reduced in (stacked, [stacked], (stacked,))
    return handler in (ADD, STACK) and bool(others) and all(_from_classifiers(state, a) for a in others)


def _of_parameters(state: WalkState, node: fx.Node) -> bool:
    """Whether ``node`` is computed from parameters alone (and numbers or buffers, or per-task copies of parameters): a
    weight of its own, not of the input."""
    found = ancestors(node)
    return not any(n.op == "placeholder" and n not in (state.task, state.s) for n in found) and \
        any(n.op in ("get_attr", "call_module") for n in found)


def _weights_per_task(state: WalkState, node: fx.Node, source: MaskSource | None) -> None:
    """Give every task its own copy of the parameters of the weights a classifier's logits are multiplied by on their
    way to the output (EfficientViM's ``softmax(weights)[i] * head(x[i])``, its heads' logits summed): the heads are
    per task, so are the weights that combine them. ``source``: the units the classifier reads."""
    while node.op != "output" and len(node.users) == 1:
        user = next(iter(node.users))
        if user.op in ("call_function", "call_method") and OPS.lookup(user.target) is PRODUCT:
            weights = [a for a in tensor_args(user) if a is not node]
            trained = [n.target for w in weights for n in ancestors(w) if n.op == "get_attr" and
                       _trained(state, n.target)]
            if trained and source is None:
                raise ConversionError(f"{where_of(user)}: a classifier on raw data weighed by a parameter")
            state.per_task(tuple(dict.fromkeys(trained)), source)
        node = user


def _trained(state: WalkState, target: str) -> bool:
    owner, _, name = target.rpartition(".")
    parameter = state.gm.get_submodule(owner)._parameters.get(name)
    return parameter is not None and parameter.requires_grad


def _classifier(state: WalkState, node: fx.Node, module: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d,
                where: str) -> None:
    if isinstance(module, nn.Linear):
        counts = state.num_classes or [module.out_features] * state.num_tasks
        task_heads = TaskHeads(module.in_features, counts, num_tasks=state.num_tasks, bias=module.bias is not None)
    else:
        if module.groups != 1:
            raise ConversionError(f"{where}: a convolutional classifier must have groups=1, got "
                                  f"groups={module.groups}")
        counts = state.num_classes or [module.out_channels] * state.num_tasks
        task_heads = TaskHeads(module.in_channels, counts, num_tasks=state.num_tasks, conv=module)
    task_heads = task_heads.to(device=module.weight.device, dtype=module.weight.dtype)
    if state.num_classes is None:
        # every task starts from the model's own head, so open gates reproduce the original outputs
        for head in task_heads.heads:
            head.load_state_dict(module.state_dict())
    state.gm.delete_submodule(node.target)
    state.gm.add_submodule(node.target, Heads(task_heads))
    node.args = (node.args[0], state.task)


def output(state: WalkState, node: fx.Node) -> None:
    """The graph's output: a transformers output object gives its logits; the heads must be there."""
    result = node.args[0]
    if isinstance(result, Mapping) and isinstance(result.get("logits"), fx.Node):
        node.args = (result["logits"],)  # a transformers output object: the converted model returns its logits
    for source in [a for a in node.all_input_nodes if a in state.pending]:
        state.gate_weighted(source)
    if not any(isinstance(m, Heads) for m in state.gm.modules()):
        result = node.args[0]
        if isinstance(result, fx.Node) and result.op == "call_module":
            where = f"module {result.target!r} ({type(state.gm.get_submodule(result.target)).__name__})"
        else:
            where = where_of(result) if isinstance(result, fx.Node) else "module"
        raise ConversionError(f"{where}: gives the model's output, which must come from a final nn.Linear or "
                              "convolution (the classifier, which becomes one head per task), followed only by "
                              "flattens, unit-wise activations, dropout or pooling")


def _norm_module(state: WalkState, node: fx.Node, where: str) -> None:
    module = state.module(node)
    replace_norm(state, node, module, -1 if isinstance(module, nn.LayerNorm | nn.RMSNorm) else 1, where)


def _embedding(state: WalkState, node: fx.Node, where: str) -> None:
    """A lookup in an embedding table by fixed ids (CLIP's and SigLIP's position embedding,
    ``position_embedding(position_ids)`` with the ids a buffer): a tensor holding the table's rows, which a gate must
    follow before anything reads it, like a position embedding parameter. Ids that depend on the input (tokens) are
    refused: which rows a position holds would change with every batch."""
    ids = node.args[0] if node.args else node.kwargs["input"]
    if node.op == "call_module":
        module = state.module(node)
        target, max_norm = f"{node.target}.weight", module.max_norm
    else:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        max_norm = node.args[3] if len(node.args) > 3 else node.kwargs.get("max_norm")
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            raise ConversionError(f"{where}: an embedding is converted when it looks up a parameter of the model")
        target = weight.target
    if max_norm is not None:
        raise ConversionError(f"{where}: an embedding with max_norm rewrites its table in the forward")
    if any(n.op == "placeholder" for n in ancestors(ids)):
        raise ConversionError(f"{where}: a lookup by ids that depend on the input (token ids) cannot be followed by "
                              "the walk (convert a language model by its structure: BERT, GPT-2, LLaMA and their "
                              "kin); a lookup by fixed ids (a position embedding) converts")
    if state.recorder is None or ids not in state.recorder.integers:
        raise ConversionError(f"{where}: a lookup in an embedding table needs the ids' values; pass example_input")
    table = state.gm.get_parameter(target)
    rows = state.recorder.integers[ids].long()
    elements = rows.unsqueeze(-1) * table.shape[1] + torch.arange(table.shape[1])
    if node.op == "call_module":  # F.embedding on the table, read by a get_attr the protection can replace
        with state.gm.graph.inserting_before(node):
            weight = state.gm.graph.get_attr(target)
            lookup = state.gm.graph.call_function(F.embedding, (ids, weight),
                                                  {"padding_idx": module.padding_idx})
        lookup.meta = dict(node.meta)
        state.same_shape(lookup, node)
        node.replace_all_uses_with(lookup)
        state.gm.graph.erase_node(node)
        node = lookup
    state.units[node] = Ungated(None, ((target, elements),))


#: a torch norm module (or one a registered norm replaces)
NORM = Handler("norm", _norm_module)
#: ``F.batch_norm``/``F.layer_norm``/``F.group_norm``/``F.rms_norm`` on a norm module's parameters
FUNCTIONAL_NORM = Handler("functional norm", _functional_norm, first=True)
#: a Linear or convolution module
WEIGHTED = Handler("weighted", _weighted, scores="takes")
#: ``F.linear``/``F.conv*d`` on a Linear's or convolution's own parameters
FUNCTIONAL_LAYER = Handler("functional layer", _functional_layer, first=True)
#: ``nn.Embedding``/``F.embedding`` by fixed ids: the table's rows, a gate to follow
EMBEDDING = Handler("embedding", _embedding, first=True)

"""Handlers of the ops that act on values where they are: unit-wise ops with f(0) = 0 (activations, dropouts,
drop-path, pools), sigmoid-like scales, adds (residuals, a parameter added to the stream), products (a
squeeze-excitation scale, a layer scale, a fixed per-channel buffer) and divisions by a number."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor, fx

from hatnorm._convert.error import ConversionError
from hatnorm._convert.params import BufferUse
from hatnorm._convert.probes import unitwise_failure
from hatnorm._convert.state import WalkState, ancestors, attribute, free_name
from hatnorm._convert.table import Apply, Handler
from hatnorm._convert.units import Units
from hatnorm._convert.values import Derived, Flat, Scale, Statistic, Ungated, residual, tensor_args
from hatnorm._hat import Layer

#: what values computed from parameters alone are (:class:`~.values.Derived`), and where they may go
DERIVED = ("values computed from parameters that every unit shares (a position bias gathered by an index, or a layer "
           "on values that do not depend on the input), which may only bias attention scores")


def unitwise_units(state: WalkState, node: fx.Node, source: fx.Node, where: str, *, pool: bool) -> Any:
    """An op on every value alone that keeps 0 at 0 (or a pool): its output has its input's units; a pool
    needs them constant over the dims it pools."""
    units = state.units.get(source)
    if isinstance(units, Scale | Flat | Ungated | Derived) or units is None:
        return units
    if isinstance(units, tuple):
        raise ConversionError(f"{where}: reads a tuple of tensors")
    changed = _changed_dims(state, source, node) if pool else []
    if pool and units.rank is not None and not changed:
        changed = list(range(2, units.rank))
    index = units.index
    for d in [d for d in changed if d < index.dim() and index.shape[d] != 1]:
        valid = index >= 0  # a position that is always 0 (zero padding) mixes with any unit
        high = index.masked_fill(~valid, -1).amax(d, keepdim=True)
        low = index.masked_fill(~valid, units.source.num_features).amin(d, keepdim=True)
        if bool(((high != low) & valid.any(d, keepdim=True)).any()):
            raise ConversionError(f"{where}: pools over dims {changed}, along which the units vary (it would mix "
                                  "units)")
        index = high
    return units if index is units.index else Units(units.source, index)


def _changed_dims(state: WalkState, before: fx.Node, after: fx.Node) -> list[int]:
    a, b = state.shape(before), state.shape(after)
    if a is None or b is None or len(a) != len(b):
        return []
    return [d for d in range(len(a)) if a[d] != b[d]]


def _activation(state: WalkState, node: fx.Node, where: str) -> None:
    """A transformers activation, judged by what it does on a probe: unit-wise with f(0) = 0 keeps the units;
    unit-wise with f(0) ≠ 0 (a sigmoid-like one) may only scale a gated tensor."""
    module = state.module(node)
    state.resolve(node, where)
    parameters = sum(p.numel() for p in module.parameters())
    if parameters:
        raise ConversionError(f"{where}: an activation with parameters ({parameters}) shared by every unit, "
                              "which no gate can protect")
    shape = state.shape(node.args[0])
    probe = tuple(shape) if shape is not None else (2, 3, 4, 4)
    if unitwise_failure(module, probe) is None:
        state.units[node] = unitwise_units(state, node, node.args[0], where, pool=False)
        return
    failure = unitwise_failure(module, probe, zero=False)
    if failure is not None:
        raise ConversionError(f"{where}: an activation that {failure}")
    state.units[node] = Scale(state.gated(node.args[0], where), f": {where} {unitwise_failure(module, probe)}")


def _add(state: WalkState, node: fx.Node, where: str) -> None:
    """A residual add of two gated paths (max of their masks); adding a parameter needs a gate after it."""
    state.resolve(node, where, ungated=True)
    tensors = [a for a in tensor_args(node) if a in state.units]
    parts = [state.units[a] for a in tensors]
    numbers = [a for a in (node.args[1:] if node.op == "call_method" else node.args) if not isinstance(a, fx.Node)]
    if len(parts) == 1 and isinstance(parts[0], Units) and numbers and all(
            isinstance(n, int | float) and n == 0 for n in numbers):
        state.units[node] = parts[0]  # 0 added (FocalNet's ctx_all = 0, then ctx_all + ...): closed units stay 0
        return
    if len(parts) == 1 and isinstance(parts[0], Units | Scale):
        # a number added: closed units become nonzero, so the result may only scale a gated tensor
        state.units[node] = parts[0] if isinstance(parts[0], Scale) else Scale(parts[0])
        return
    if len(parts) != 2:
        raise ConversionError(f"{where}: adds {len(parts)} tensors")
    if any(isinstance(p, Derived) for p in parts):
        raise ConversionError(f"{where}: adds {DERIVED}")
    if any(isinstance(p, Ungated) for p in parts):
        state.units[node] = _add_parameter(state, parts, where)
        return
    if any(isinstance(p, Flat | tuple) for p in parts):
        raise ConversionError(f"{where}: adds a flattened map or a tuple")
    statistic = next((p for p in parts if isinstance(p, Statistic)), None)
    if statistic is not None:
        raise ConversionError(f"{where}: adds a statistic over several units ({statistic.why}), which may only "
                              "multiply or divide a gated tensor")
    if any(isinstance(p, Scale) for p in parts):
        raise ConversionError(f"{where}: adds the output of a sigmoid-like activation")
    if any(p is None for p in parts):
        raise ConversionError(f"{where}: a residual add must sum two gated paths, got {len(parts)} "
                              "tensor(s), some of them raw input data")
    state.units[node] = residual(*parts)


def _add_parameter(state: WalkState, parts: list[Any], where: str) -> Ungated:
    units: list[Units] = []
    params: list[tuple[str, Tensor]] = []
    for part in parts:
        if isinstance(part, Units):
            units.append(part)
        elif isinstance(part, Ungated):
            units += [part.units] if part.units is not None else []
            params += part.params
        else:
            raise ConversionError(f"{where}: adds a parameter to raw data or a scale")
    return Ungated(residual(*units) if len(units) == 2 else units[0] if units else None, tuple(params))


def _product(state: WalkState, node: fx.Node, where: str) -> None:
    """A gated tensor times a number, raw data, a squeeze-excitation scale, a per-unit parameter or a gated tensor of
    other units (StarNet's star, a gated linear unit, FocalNet's gates: a value is 0 where either factor's unit is
    closed, so the product holds the units of both, joined as in a residual add); two scales give a scale. A tensor
    times itself or a unit-wise function of itself is refused: declare the function a ``"scale"``."""
    state.resolve(node, where, ungated=True)
    for arg in [a for a in tensor_args(node) if a in state.units]:
        if isinstance(state.units[arg], Ungated) and state.units[arg].units is not None:
            state.regate(arg, state.units[arg], where)
    parts = [state.units[a] for a in tensor_args(node) if a in state.units]
    if any(isinstance(p, Derived) for p in parts):
        raise ConversionError(f"{where}: multiplies {DERIVED}")
    if len(parts) == 1:  # times a number
        state.units[node] = parts[0]
        return
    gated = [p for p in parts if isinstance(p, Units)]
    others = [p for p in parts if not isinstance(p, Units)]
    if len(parts) == 2 and len(gated) == 2 and not _same_units(*gated):
        state.units[node] = residual(*gated)
        return
    if len(parts) == 2 and all(isinstance(p, Scale) for p in parts):
        state.units[node] = next((p for p in parts if isinstance(p, Statistic)), Scale(None))
        return
    if len(parts) != 2 or len(gated) != 1:
        raise ConversionError(f"{where}: a product of tensors is supported as a gated tensor times a "
                              "squeeze-excitation scale (sigmoid of a branch of it), raw data or a per-unit "
                              "parameter (a layer scale)")
    other = others[0]
    if isinstance(other, Ungated):
        if other.units is not None:
            raise ConversionError(f"{where}: multiplies two gated tensors")
        for target, elements in other.params:
            state.protect(target, elements, gated[0].index, gated[0].source, where)
    elif isinstance(other, Flat | tuple):
        raise ConversionError(f"{where}: multiplies a flattened map or a tuple")
    elif other is None:
        _buffer_product(state, node, next(a for a in tensor_args(node) if state.units.get(a, 0) is None), gated[0])
    state.units[node] = gated[0]


def _same_units(a: Units, b: Units) -> bool:
    """Whether two gated tensors hold the same unit at every position (one tensor and a function of it)."""
    ia, ib = torch.broadcast_tensors(a.index, b.index)
    return a.source is b.source and torch.equal(ia, ib)


def _buffer_product(state: WalkState, node: fx.Node, other: fx.Node, gated: Units) -> None:
    """A gated tensor times a tensor of buffers or data: a buffer with an entry per unit (a fixed per-channel
    scale; of unknown shape without an example input) becomes a wired :class:`BufferUse`, so export keeps those
    units whole (its entries stay aligned)."""
    shape = state.shape(other)
    buffers = [n for n in ancestors(other) if n.op == "get_attr" and isinstance(attribute(state.gm, n.target),
                                                                               Tensor)]
    if shape is not None:  # per unit: it varies along a dim the units vary along
        rank = min(len(shape), gated.index.dim())
        buffers = buffers if any(shape[d] > 1 and gated.index.shape[d] > 1 for d in range(-rank, 0)) else []
    for buffer in buffers:
        if buffer.target in state.used_buffers:
            state.layers.append(Layer(state.used_buffers[buffer.target], out=gated.source))
            continue
        owner, _, name = buffer.target.rpartition(".")
        holder = state.gm.get_submodule(owner)
        value = holder._buffers.pop(name) if name in holder._buffers else attribute(state.gm, buffer.target)
        use = BufferUse(value)
        module_name = free_name(state.gm, f"{buffer.target}_use".replace(".", "_"))
        state.gm.add_submodule(module_name, use)
        for read in [n for n in state.gm.graph.nodes if n.op == "get_attr" and n.target == buffer.target]:
            with state.gm.graph.inserting_after(read):
                new = state.gm.graph.call_module(module_name)
            read.replace_all_uses_with(new)
            state.same_shape(new, read)
            state.units[new] = None
            state.gm.graph.erase_node(read)
        state.used_buffers[buffer.target] = use
        state.layers.append(Layer(use, out=gated.source))


def _divide(state: WalkState, node: fx.Node, where: str) -> None:
    """Division by a number keeps 0 at 0 (and a scale a scale). A gated tensor divided by a statistic of gated units
    (ConvNeXt-V2's global response norm: each channel's norm over the mean of all channels') is 0 where its unit is
    closed but meets every unit: a scale."""
    state.resolve(node, where)
    tensors = [a for a in tensor_args(node) if a in state.units]
    divisor = [state.units[a] for a in tensors if a is not node.args[0]]
    if not tensors or node.args[0] is not tensors[0] or len(tensors) > 2 or (
            divisor and not (isinstance(divisor[0], Scale) and isinstance(state.units[tensors[0]], Units | Scale))):
        raise ConversionError(f"{where}: only a division by a number, or of a gated tensor by a scale or a statistic "
                              "of gated units, keeps the units")
    units = state.units[tensors[0]]
    state.units[node] = Scale(units) if divisor and isinstance(units, Units) else units


def _normalize(state: WalkState, node: fx.Node, where: str) -> None:
    """``F.normalize``: every value divided by a norm of its gated tensor along a dim (Swin v2's cosine attention),
    so a closed unit stays 0 and the output keeps the input's units; of a scale or a statistic (SwiftFormer's
    weights over the tokens) it is one of the same kind."""
    state.resolve(node, where)
    units = state.units.get(node.args[0])
    state.units[node] = units if isinstance(units, Scale) else state.gated(node.args[0], where)


def _addcmul(state: WalkState, node: fx.Node, where: str) -> None:
    """``torch.addcmul(input, t1, t2, value=v)`` (ResMLP's affine ``β + α ⊙ x``): the graph says it as what it
    computes, ``input + t1 * t2 * v``, a product and an add the walk then follows."""
    names = ("input", "tensor1", "tensor2")
    bound = dict(zip(names, node.args, strict=False)) | {k: v for k, v in node.kwargs.items() if k in names}
    if node.op == "call_method":
        bound = {"input": node.args[0], **dict(zip(names[1:], node.args[1:], strict=False)),
                 **{k: v for k, v in node.kwargs.items() if k in names}}
    value = node.kwargs.get("value", 1)
    graph = state.gm.graph
    with graph.inserting_before(node):
        product = graph.call_function(operator.mul, (bound["tensor1"], bound["tensor2"]))
        rewritten(state, product, node, [bound["tensor1"], bound["tensor2"]], where, _product)
        if value != 1:
            scaled = graph.call_function(operator.mul, (product, value))
            rewritten(state, scaled, node, [product], where, _product)
            product = scaled
        total = graph.call_function(operator.add, (bound["input"], product))
        rewritten(state, total, node, [bound["input"], product], where, _add)
    node.replace_all_uses_with(total)
    graph.erase_node(node)


def rewritten(state: WalkState, new: fx.Node, old: fx.Node, inputs: list[Any], where: str, handle: Apply) -> None:
    """Walk ``new``, a node a handler wrote in place of ``old``: its source line is ``old``'s, its shape broadcast
    from its inputs'."""
    new.meta = dict(old.meta)
    shapes = [state.shape(a) if isinstance(a, fx.Node) else () for a in inputs]
    if state.recorder is not None and all(shape is not None for shape in shapes):
        state.recorder.shapes[new] = torch.broadcast_shapes(*shapes)
    handle(state, new, where)


def _unitwise(state: WalkState, node: fx.Node, where: str) -> None:
    state.resolve(node, where)
    state.units[node] = unitwise_units(state, node, node.args[0], where, pool=False)


def _pool(state: WalkState, node: fx.Node, where: str) -> None:
    """A pool or a resampling (``F.interpolate``, ``nn.Upsample``) over dims the units do not vary in. Of a tensor
    that holds parameter values alone (a position embedding resized to the token grid, as in SAM 2's Hiera,
    NaFlexViT and PVT), each value mixes several of the parameter's entries, so no entry keeps one position that a
    gate's unit could protect: each task gets its own copy of the parameter instead (its entries marked as meeting
    no unit, −1, which :meth:`~.state.WalkState.protect` gives per-task copies), and the gate that must follow where
    the values join the stream masks the closed units."""
    units = state.units.get(node.args[0]) if node.args else None
    if isinstance(units, Ungated) and units.units is None:
        shape = state.shape(node)
        if shape is None:
            raise ConversionError(f"{where}: pools or resamples a tensor that holds a parameter's values; pass "
                                  "example_input so convert can follow its shape")
        state.units[node] = Ungated(None, tuple((target, torch.full(shape, -1)) for target, _ in units.params))
        return
    state.resolve(node, where)
    state.units[node] = unitwise_units(state, node, node.args[0], where, pool=True)


def _passes(state: WalkState, node: fx.Node, where: str) -> None:
    """A dropout or an identity: it also passes a tensor holding parameter values as it is."""
    state.resolve(node, where, ungated=True)
    state.units[node] = unitwise_units(state, node, node.args[0], where, pool=False)


def _scale(state: WalkState, node: fx.Node, where: str) -> None:
    state.resolve(node, where)
    units = state.units.get(node.args[0])
    state.units[node] = units if isinstance(units, Scale | Derived) else Scale(state.gated(node.args[0], where))


def _power(state: WalkState, node: fx.Node, where: str) -> None:
    """``x ** p`` for a number ``p ≥ 1`` (RMSNorm written out: ``x.pow(2)``): f(0) = 0 and a finite gradient at 0, so
    the units stay; ``p = 0`` gives ones, a scale; of a scale, a scale. Other exponents (0 < p < 1: an infinite
    gradient at a closed unit's 0; p < 0: infinite at 0; a tensor) are refused."""
    state.resolve(node, where)
    exponent = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
    units = state.units.get(node.args[0])
    if isinstance(units, Scale):
        if isinstance(exponent, fx.Node):
            raise ConversionError(f"{where}: a power of a scale by a tensor")
        state.units[node] = units
        return
    units = state.gated(node.args[0], where)
    if not isinstance(exponent, int | float) or isinstance(exponent, bool) or 0 < exponent < 1 or exponent < 0:
        raise ConversionError(f"{where}: a power of a gated tensor keeps its units for a number exponent ≥ 1 (0 at a "
                              f"closed unit, with a finite gradient there), got {exponent!r}")
    state.units[node] = Scale(units) if exponent == 0 else units


def _of_scale(state: WalkState, node: fx.Node, where: str) -> None:
    """A unit-wise function that is infinite at 0 (``rsqrt``, ``reciprocal``: RMSNorm's ``rsqrt(mean(x²) + ε)``): of
    a scale or a statistic (never 0 at a closed unit) it gives a scale of the same kind; of a gated tensor it would
    be infinite wherever a unit is closed."""
    state.resolve(node, where)
    units = state.units.get(node.args[0])
    if not isinstance(units, Scale):
        state.gated(node.args[0], where)
        raise ConversionError(f"{where}: a function infinite at 0 (rsqrt, reciprocal) is supported on a scale or a "
                              "statistic (a mean of squares plus ε), not on a gated tensor, whose closed units are 0")
    state.units[node] = units


#: an op on every value alone with f(0) = 0 (an activation, drop-path): its output holds its input's units
UNITWISE = Handler("unitwise", _unitwise, scores="keeps")
#: a pool: unit-wise, and the units must not vary along the dims it pools
POOL = Handler("pool", _pool, scores="keeps")
#: a dropout, an identity, a copy or a cast: unit-wise, and a tensor holding parameter values passes as it is
PASSES = Handler("passes", _passes, scores="keeps")
#: f(0) ≠ 0 (a sigmoid): the output may only multiply a gated tensor
SCALE = Handler("scale", _scale)
#: a transformers activation, judged on a probe: unit-wise, or a scale
ACTIVATION = Handler("activation", _activation)
ADD = Handler("add", _add, scores="keeps")
PRODUCT = Handler("product", _product, scores="keeps")
DIVIDE = Handler("divide", _divide, scores="keeps")
#: ``x ** p``: a number p ≥ 1 keeps the units
POWER = Handler("power", _power)
#: ``rsqrt``, ``reciprocal``: of a scale or a statistic only
OF_SCALE = Handler("of a scale", _of_scale)
#: ``F.normalize``: keeps the units
NORMALIZE = Handler("normalize", _normalize)
#: ``input + t1 * t2``: a product and an add
ADDCMUL = Handler("addcmul", _addcmul)

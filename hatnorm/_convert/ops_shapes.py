"""Handlers of the ops that move values or change a tensor's shape: permutes, reshapes, flattens, splits, slices,
shuffles and rolls (replayed on the units' index), zero padding, concatenations and reductions."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from hatnorm._convert.error import ConversionError
from hatnorm._convert.state import WalkState
from hatnorm._convert.table import OPS, Handler
from hatnorm._convert.units import Units, expand
from hatnorm._convert.values import Derived, Flat, GatheredByData, Scale, Statistic, Ungated, residual
from hatnorm._masks import Concat, MaskSource

#: moves that need no shapes; flattens, which a Linear can read without them
SIZE_FREE = {torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.unsqueeze, "permute",
             "transpose", "swapaxes", "movedim", "unsqueeze"}
FLATTENS = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}
#: moves to the shape of another tensor (LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)``): that tensor gives only its
#: shape, not values
SHAPED_AS = {"reshape_as", "view_as", "expand_as"}
#: the most branches a reduction joins over a dim the units vary in (a split-attention radix, selective-kernel paths)
MAX_JOINED = 8


def moved_units(state: WalkState, node: fx.Node, source: fx.Node, where: str, call: nn.Module | None = None) -> Any:
    """An op that only moves values: replay it on the index of the units (and of any parameter's entries)."""
    units = state.units.get(source)
    if units is None:
        return None
    if isinstance(units, Flat):
        raise ConversionError(f"{where}: moves a flattened map; pass example_input so convert can follow it")
    if isinstance(units, tuple):
        raise ConversionError(f"{where}: reads a tuple of tensors")
    target = node.target
    if state.recorder is None:
        if target in FLATTENS or isinstance(call, nn.Flatten):
            inner = units.units if isinstance(units, Scale) else units
            if isinstance(units, Ungated) or (inner is not None and inner.unit_dim() not in (None, 1)):
                raise ConversionError(f"{where}: flattens a tensor whose units are not in dim 1; pass "
                                      "example_input")
            return Flat(inner) if not isinstance(units, Scale) else units
        if target not in SIZE_FREE:
            state.value(node, where)  # raises: this op needs the example's shapes
    shape = state.shape(source)

    def replay(index: Tensor) -> Any:
        def argument(a: fx.Node) -> Any:
            if a is source:
                return index
            if target in SHAPED_AS and a is node.args[1] and state.shape(a) is not None:
                return torch.empty(state.shape(a), device="meta")  # only its shape is read
            if isinstance(units, Ungated) and units.units is None and state.units.get(a, 0) is None:
                raise GatheredByData
            if a in state.units or a in state.pending:
                raise ConversionError(f"{where}: indexes or shapes a tensor by another tensor, which convert "
                                      "cannot follow")
            return state.value(a, where)

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

    if isinstance(units, Scale):
        if units.units is None:
            return units
        inner = units.units
        return wrap(replay(expand(inner.index, shape)), lambda m: Scale(Units(inner.source, m)))
    if isinstance(units, Ungated):
        moved_units = None if units.units is None else replay(expand(units.units.index, shape))
        try:
            moved_params = [(t, replay(expand(e, shape))) for t, e in units.params]
        except GatheredByData:  # a parameter gathered by an index buffer (a relative position bias)
            return Derived(tuple(t for t, _ in units.params))
        if isinstance(moved_units, tuple) or any(isinstance(e, tuple | list) for _, e in moved_params):
            raise ConversionError(f"{where}: splits a tensor holding a parameter's values")
        return Ungated(None if moved_units is None else Units(units.units.source, moved_units),
                        tuple(moved_params))
    return wrap(replay(expand(units.index, shape)), lambda m: Units(units.source, m))


#: the padding modules that copy values from the edge (``F.pad`` modes ``"reflect"``, ``"replicate"``,
#: ``"circular"``) → their mode
COPYING_PADS = {nn.modules.padding._ReflectionPadNd: "reflect", nn.modules.padding._ReplicationPadNd: "replicate",
                nn.modules.padding._CircularPadNd: "circular"}


def _pad(state: WalkState, node: fx.Node, where: str) -> None:
    """Zero padding (constant mode, value 0; ``F.pad``, ``nn.ZeroPad2d``, ``nn.ConstantPad2d(p, 0)``): padded
    positions are always 0 (index −1). Padding that copies values from the edge (reflect, replicate, circular: TResNet's
    blur pool) only moves values, so each padded position holds the unit of the value it copies."""
    state.resolve(node, where)
    if node.op == "call_module":  # a padding module: F.pad by its own padding and value (or mode)
        module = state.module(node)
        mode = next((m for kind, m in COPYING_PADS.items() if isinstance(module, kind)), "constant")
        value, pad = getattr(module, "value", None), module.padding
    else:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
    below_all = mode == "constant" and isinstance(value, float) and value == -math.inf
    if mode not in COPYING_PADS.values() and (mode != "constant" or value not in (None, 0, 0.0)) and not below_all:
        raise ConversionError(f"{where}: only zero padding keeps a closed unit at 0 (or -inf padding that only a "
                              f"max-pool reads), got mode={mode!r}, value={value!r}")
    units = state.gated(node.args[0], where)
    if units is None:
        state.units[node] = None
        return
    pad = fx.node.map_arg(pad, lambda a: state.value(a, where))
    if below_all:
        _check_max_pooled(state, node, list(pad), where)
    index = expand(units.index, state.shape(node.args[0]))
    if state.recorder is None:
        state.value(node, where)
    if mode == "constant":
        state.units[node] = Units(units.source, F.pad(index, list(pad), value=-1))
    else:  # F.pad copies floats only: the unit numbers are exact in float64
        state.units[node] = Units(units.source, F.pad(index.double(), list(pad), mode=mode).long())


#: the max-pools, functions and modules, that may read a map padded with -inf
MAX_POOL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.max_pool3d)
MAX_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def _check_max_pooled(state: WalkState, node: fx.Node, pad: list[int], where: str) -> None:
    """-inf padding (timm's ``MaxPool2dSame``: TensorFlow's 'SAME' padding before a max-pool): a padded position is
    -inf, never 0, but a max-pool drops it wherever its window also holds a value of the map, and then a closed unit
    gives 0. So every reader must be a max-pool none of whose windows (replayed on the example's spatial shape) holds
    padding only; the padded positions then count as always 0 (index −1), as after zero padding."""
    shape = state.shape(node.args[0])
    if shape is None:
        state.value(node, where)  # raises: the windows are checked at the example's shape
    spatial = len(pad) // 2
    probe = F.pad(torch.zeros(1, 1, *shape[len(shape) - spatial:]), pad, value=-math.inf)
    for user in node.users:
        pool = state.module(user) if user.op == "call_module" else user.target
        if not (isinstance(pool, MAX_POOL_MODULES) or pool in MAX_POOL_FUNCTIONS) or user.args[0] is not node:
            raise ConversionError(f"{where}: pads with -inf, which only a max-pool may read (a closed unit's padding "
                                  f"is -inf, not 0), but {user.name} reads it")
        if user.op == "call_module":
            pooled = pool(probe)
        else:
            args, kwargs = fx.node.map_arg((user.args[1:], user.kwargs), lambda a: state.value(a, where))
            pooled = pool(probe, *args, **kwargs)
        if isinstance(pooled, tuple):
            pooled = pooled[0]
        if bool(torch.isinf(pooled).any()):
            raise ConversionError(f"{where}: pads with -inf before a max-pool with a window that holds padding only "
                                  "(its output is -inf whatever the gates)")


def _cat(state: WalkState, node: fx.Node, where: str) -> None:
    """A concatenation: joins the parts' units (a Concat of their sources) and parameter entries."""
    state.resolve(node, where, ungated=True)
    inputs = list(node.args[0]) if node.args else list(node.kwargs["tensors"])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    parts = [state.units.get(a) for a in inputs]
    if any(isinstance(p, Scale | Flat | tuple) for p in parts):
        raise ConversionError(f"{where}: concatenates a flattened map, a scale or a tuple")
    if all(p is None for p in parts):
        state.units[node] = None
        return
    if any(p is None for p in parts) and any(isinstance(p, Units) or (isinstance(p, Ungated) and p.units is not None)
                                             for p in parts):
        raise ConversionError(f"{where}: concatenates raw data with gated tensors")
    shapes = [state.shape(a) for a in inputs]
    rank = next((len(s) for s in shapes if s is not None), None)
    if rank is None:
        rank = next((p.rank for p in parts if isinstance(p, Units) and p.rank is not None), None)
    if isinstance(dim, fx.Node):
        dim = state.value(dim, where)
    if dim < 0:
        if rank is None:
            raise ConversionError(f"{where}: concatenates along dim {dim} of a tensor of unknown rank; pass "
                                  "example_input")
        dim %= rank
    pieces = [p if isinstance(p, Ungated) else Ungated(p, ()) for p in parts]
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
        if index.dim() <= dim:  # a parameter's entries broadcast from the right (HGNetV2's one scale for all)
            index = index.view(*([1] * (max(rank or 0, dim + 1) - index.dim())), *index.shape)
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
    state.units[node] = unit_index if not params else Ungated(unit_index, params)


#: the positional arguments after the input of each reduction (``dim=None``: every dim)
REDUCTIONS: dict[object, tuple[str, ...]] = {
    **dict.fromkeys([torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin", torch.max, "max",
                     torch.min, "min"], ("dim", "keepdim")),
    **dict.fromkeys([torch.norm, "norm"], ("p", "dim", "keepdim")),
    torch.linalg.vector_norm: ("ord", "dim", "keepdim"),
    **dict.fromkeys([torch.var, torch.std, "var", "std"], ("dim", "unbiased", "keepdim")),
}


def _reduce(state: WalkState, node: fx.Node, where: str) -> None:
    """A mean, sum, max, min, norm, variance or standard deviation (each 0 on zeros) keeps the units over dims they
    do not vary in (a global average pool) and joins them over branches (:func:`_union`); over the dim the units
    vary in it gives a :class:`~.values.Statistic`, which may only scale a gated tensor."""
    state.resolve(node, where)
    units = state.gated(node.args[0], where)
    names = REDUCTIONS[node.target]
    if len(node.args) > 1 and isinstance(node.args[1], fx.Node) and node.args[1] in state.units:
        raise ConversionError(f"{where}: an elementwise maximum or minimum of two tensors is not supported")
    bound = dict(zip(names, node.args[1:], strict=False)) | {k: v for k, v in node.kwargs.items() if k in names}
    bound = fx.node.map_arg(bound, lambda a: state.value(a, where))
    dims, keepdim = bound.get("dim"), bool(bound.get("keepdim", False))
    dims = (dims,) if isinstance(dims, int) else dims
    if units is None:
        state.units[node] = None
        return
    rank = units.rank
    if dims is None and rank is not None:
        dims = tuple(range(rank))
    if not isinstance(dims, tuple | list) or not dims or not all(isinstance(d, int) for d in dims) or (
            rank is None and any(d >= 0 for d in dims)):
        raise ConversionError(f"{where}: only a mean over dims the units do not vary in (spatial dims, tokens) "
                              f"keeps the units, got dim={dims!r}")
    dims = sorted(d % rank if rank is not None else d for d in dims)
    units = Units(units.source, collapsed(units.index, dims, units.source.num_features))
    varying = [d for d in dims if units.index.shape[d] != 1]
    kept = [d for d in range(units.index.dim()) if d not in dims and units.index.shape[d] != 1]
    if varying and (rank is None or not kept or any(units.index.shape[d] > MAX_JOINED for d in varying)):
        state.units[node] = Statistic(None, why=(
            f"{where}: only a mean over dims the units do not vary in (spatial dims, tokens) keeps the units, got "
            f"dim={list(dims)} (it would mix units); over branches (a dim the units vary in beside the one they keep, "
            f"at most {MAX_JOINED} long) it joins them"))
        return
    for d in varying:
        units = _union(units, d)
    index = units.index if keepdim else units.index.squeeze(tuple(dims))
    state.units[node] = Units(units.source, index)
    if node.target in (torch.max, "max", torch.min, "min") and isinstance(bound.get("dim"), int):
        # max(dim=d) gives its values and their positions: data computed across the gated values, like a statistic
        state.units[node] = (state.units[node], Statistic(None, why=f"{where}: the positions of a maximum or "
                                                                    "minimum"))


def collapsed(index: Tensor, dims: list[int], num_features: int) -> Tensor:
    """``index`` reduced to size 1 along each of ``dims`` where, positions that are always 0 (zero padding) aside,
    it holds one unit (a window cut from a padded map)."""
    for d in [d for d in dims if d < index.dim() and index.shape[d] != 1]:
        valid = index >= 0
        high = index.masked_fill(~valid, -1).amax(d, keepdim=True)
        low = index.masked_fill(~valid, num_features).amin(d, keepdim=True)
        if not bool(((high != low) & valid.any(d, keepdim=True)).any()):
            index = high
    return index


def _union(units: Units, dim: int) -> Units:
    """The units of a sum, mean or max over ``dim``: where the units vary along it (the branches of a split-attention
    or selective-kernel block, stacked or split along it), each value left depends on the unit of every slice and is
    0 when all of them are closed, as in a residual add of the slices."""
    slices = [Units(units.source, part) for part in units.index.split(1, dim)]
    joined = slices[0]
    for part in slices[1:]:
        joined = residual(joined, part)
    return joined


def _stack(state: WalkState, node: fx.Node, where: str) -> None:
    """``torch.stack``: the graph says it as what it is, a concatenation of the parts each unsqueezed at ``dim``
    (the same values), which the walk then follows."""
    inputs = list(node.args[0]) if node.args else list(node.kwargs["tensors"])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    graph = state.gm.graph
    parts = []
    with graph.inserting_before(node):
        for tensor in inputs:
            part = graph.call_function(torch.unsqueeze, (tensor, dim))
            part.meta = dict(node.meta)  # messages name the stack's source line
            shape = state.shape(tensor)
            if shape is not None and isinstance(dim, int):
                state.recorder.shapes[part] = torch.empty(shape, device="meta").unsqueeze(dim).shape
            _moves(state, part, where)
            parts.append(part)
        joined = graph.call_function(torch.cat, (parts, dim))
    joined.meta = dict(node.meta)
    state.same_shape(joined, node)
    node.replace_all_uses_with(joined)
    graph.erase_node(node)
    _cat(state, joined, where)


def _moves(state: WalkState, node: fx.Node, where: str) -> None:
    """A move of a tensor holding parameter values passes them on (a position embedding reshaped before it is
    added), except when the tensor is gated units with a parameter added and read elsewhere too (TNT's pixel
    embedding plus ``pixel_pos``, reshaped for the patch path and read as it is by the pixel path): its gate
    follows it before the move, so every path reads the one gated tensor and the parameter is protected once; and
    a parameter's values moved and then read in several places (CaiT's ``cls_token.expand(B, -1, -1)``) get their
    gate after the move, for the same reason."""
    source = node.args[0] if node.args else None
    kind = state.units.get(source) if isinstance(source, fx.Node) else None
    if isinstance(kind, Ungated) and kind.units is not None and len(source.users) > 1 and \
            state.shape(source) is not None and kind.units.unit_dim() in (1, len(state.shape(source)) - 1):
        state.regate(source, kind, where)
    state.resolve(node, where, ungated=True)
    call = state.module(node) if node.op == "call_module" else None
    state.units[node] = moved_units(state, node, node.args[0], where, call=call)
    moved = state.units[node]
    readers = [u for u in node.users if OPS.lookup(state.module(u) if u.op == "call_module" else u.target) not in
               (MOVES, None)]
    if isinstance(moved, Ungated) and moved.units is None and len(readers) > 1 and state.shape(node) is not None:
        state.regate(node, moved, where)  # read by each class-attention block's cat and residual


#: an op that only moves, copies or drops values: the units move the same way
MOVES = Handler("moves", _moves, scores="keeps")
#: zero padding: padded positions are always 0; padded attention scores stay scores (relative position logits)
PAD = Handler("pad", _pad, scores="keeps")
#: a concatenation: joins the parts' units
CAT = Handler("cat", _cat)
#: a stack: a concatenation of the parts unsqueezed
STACK = Handler("stack", _stack)
#: a mean, sum or max over dims the units do not vary in
REDUCE = Handler("reduce", _reduce)

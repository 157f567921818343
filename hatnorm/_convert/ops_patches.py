"""Handlers of the ops that cut a map into patches and put patches back: ``F.unfold``/``nn.Unfold`` (im2col: channel
c becomes channels c·k..(c+1)·k−1, one per kernel position, zero where the window leaves the map; TNT, VOLO) only
moves values, so the units move the same way; ``F.fold``/``nn.Fold`` (col2im: each output position sums the patch
values that land on it; VOLO) keeps the units where every output position sums values of one unit."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx

from hatnorm._convert.error import ConversionError
from hatnorm._convert.state import WalkState
from hatnorm._convert.table import Handler
from hatnorm._convert.units import Units, expand


def _replayed(state: WalkState, node: fx.Node, index: Tensor, where: str) -> Tensor:
    """``node``'s op (a module or ``F.unfold``/``F.fold``) on ``index`` in float64, where unit numbers are exact."""
    values = index.double()
    if node.op == "call_module":
        return state.module(node)(values)
    args, kwargs = fx.node.map_arg((node.args[1:], node.kwargs), lambda a: state.value(a, where))
    return node.target(values, *args, **kwargs)


def _input_units(state: WalkState, node: fx.Node, where: str) -> tuple[Units | None, Any]:
    state.resolve(node, where)
    source = node.args[0] if node.args else node.kwargs["input"]
    units = state.gated(source, where)
    shape = state.shape(source)
    if units is not None and shape is None:
        state.value(node, where)  # raises: the patches are cut at the example's shape
    return units, shape


def _unfold(state: WalkState, node: fx.Node, where: str) -> None:
    """Im2col only copies values and pads with zeros: replayed on the units' index (shifted by one, so the zero
    padding lands at −1, a position that is always 0)."""
    units, shape = _input_units(state, node, where)
    if units is None:
        state.units[node] = None
        return
    moved = _replayed(state, node, expand(units.index, shape) + 1, where)
    state.units[node] = Units(units.source, moved.round().long() - 1)


def _fold(state: WalkState, node: fx.Node, where: str) -> None:
    """Col2im sums the values that land on each output position: 0 when they all belong to one closed unit. Where
    every output position sums values of one unit (or only positions that are always 0) the output has those units
    (found from the count, sum and sum of squares of the unit numbers that land there: equal numbers are exactly
    those whose squared sum is the count times the sum of squares); a position summing several units is refused."""
    units, shape = _input_units(state, node, where)
    if units is None:
        state.units[node] = None
        return
    index = expand(units.index, shape)
    valid = index >= 0
    numbers = torch.where(valid, index + 1, 0)
    count = _replayed(state, node, valid.long(), where)
    total = _replayed(state, node, numbers, where)
    squares = _replayed(state, node, numbers * numbers, where)
    if not torch.equal(total * total, count * squares):
        raise ConversionError(f"{where}: folds patches so that one output position sums values of several units (it "
                              "would mix units)")
    unit = torch.where(count > 0, total / count.clamp_min(1), 0).round().long() - 1
    state.units[node] = Units(units.source, unit)


#: ``F.unfold``/``nn.Unfold``: the units move with the values
UNFOLD = Handler("unfold", _unfold)
#: ``F.fold``/``nn.Fold``: the units of each output position's patch values, when they are one unit
FOLD = Handler("fold", _fold)

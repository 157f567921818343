"""What the walk knows of each tensor of a traced graph besides gated units (:class:`~.units.Units`): a flattened
map awaiting its reader, a scale, a tensor holding parameter values, attention scores, values derived from
parameters. The walk's state maps every tensor-valued node to one of these, to :class:`~.units.Units`, to ``None``
(raw input data or a buffer) or to a tuple of them (a split)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from hatnorm._convert.units import Units
from hatnorm._masks import Residual, Select


@dataclass(frozen=True)
class Flat:
    """Units of a flattened ``[N, C, *spatial]`` tensor, resolved when a Linear reads it (no example input)."""

    channels: Units | None


@dataclass(frozen=True)
class Scale:
    """Computed from gated units with f(0) ≠ 0 (a squeeze-excitation sigmoid, ``x + 3`` in a hard-swish):
    it may only multiply a gated tensor, whose units the product keeps."""

    units: Units | None
    origin: str = ""  # the module that made it, when it is named in errors (a transformers activation)


@dataclass(frozen=True)
class Statistic(Scale):
    """Computed across the units of a gated tensor (a mean or norm over the dim they vary in, as in ConvNeXt-V2's
    global response norm, or a layer of a scale branch): in a task's forward it reads only that task's units, but
    each value meets several units, so, like a scale, it may only multiply or divide a gated tensor. ``why``: what
    made it, named when something else reads it."""

    why: str = ""


@dataclass(frozen=True)
class Ungated:
    """A tensor holding a parameter's values (a class token, a position embedding added to a gated stream):
    closed units may be nonzero, so a gate must follow before anything reads it. ``params`` maps each
    parameter's graph target to the index of its element at every position (−1: not there)."""

    units: Units | None
    params: tuple[tuple[str, Tensor], ...]


@dataclass(frozen=True)
class Scores:
    """Attention scores ``q @ kᵀ`` (and their softmax): they mix tokens, not features, so they may only weigh the
    values (``scores @ v``), whose units the result keeps. ``params``: parameters biasing them (see
    :class:`Derived`)."""

    params: tuple[str, ...] = ()


@dataclass(frozen=True)
class Derived:
    """Computed from parameters in a way whose entries meet no single unit (a relative position bias table
    gathered by an index buffer): shared by every unit of a head, so no gate can protect them. They may only
    bias attention scores, and then become one copy per task (:class:`~.params.TaskParameter`)."""

    params: tuple[str, ...]



def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The nodes among ``node``'s arguments (nested in lists and tuples too), in order."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def residual(a: Units, b: Units) -> Units:
    """The units of ``a + b``: a unit is used where it is used on either path (elementwise max)."""
    ia, ib = torch.broadcast_tensors(a.index, b.index)
    if a.source is b.source and torch.equal(ia, ib):
        return Units(a.source, ia)
    if torch.equal(ia, ib) and a.source.num_features == b.source.num_features:
        return Units(Residual(a.source, b.source), ia)
    pairs, inverse = torch.unique(torch.stack([ia.reshape(-1), ib.reshape(-1)]), dim=1, return_inverse=True)
    return Units(Residual(Select(a.source, pairs[0]), Select(b.source, pairs[1])), inverse.view(ia.shape))


class GatheredByData(Exception):
    """A parameter indexed or shaped by a tensor: its entries no longer follow positions."""


def parameters_of(kinds: list[Any]) -> tuple[str, ...]:
    found = [t for k in kinds if isinstance(k, Derived) for t in k.params]
    found += [t for k in kinds if isinstance(k, Ungated) for t, _ in k.params]
    return tuple(dict.fromkeys(found))



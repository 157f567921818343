"""Per-unit values of gates carried through mask sources, both ways.

A policy that keeps its own value per unit (FG-AdaHAT's importance, a per-step sparsity) needs what
:meth:`MaskSource.state` does for the masks: the value of every unit a layer reads or writes. ``gather``
reads the gates' values at a source's units (a residual add takes the max over its paths, as for masks;
a flatten repeats a channel over its positions; a concatenation concatenates; a selection picks, 0 at
padding). ``scatter`` goes the other way: it adds a value per unit of a source into the gates behind it
(a flatten sums a channel's positions; every path of a residual add receives the whole value).

Dispatch is a table by source type; a source type it does not know raises a ``TypeError`` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from hatnorm._gate import HATGate
from hatnorm._masks import Concat, Flatten, MaskSource, Residual, Select


@dataclass(frozen=True)
class _Rule:
    parts: Callable[[MaskSource], tuple[MaskSource, ...]]
    gather: Callable[[MaskSource, list[Tensor]], Tensor]
    scatter: Callable[[MaskSource, Tensor], list[Tensor]]


def _split(source: Concat, values: Tensor) -> list[Tensor]:
    return list(values.split([p.num_features for p in source.parts]))


def _select_back(source: Select, values: Tensor) -> list[Tensor]:
    index = source.index.to(values.device)
    valid = index >= 0
    back = torch.zeros(source.source.num_features, dtype=values.dtype, device=values.device)
    return [back.index_add_(0, index[valid], values[valid])]


def _select(source: Select, values: list[Tensor]) -> Tensor:
    index = source.index.to(values[0].device)
    return values[0][index.clamp(min=0)].masked_fill(index < 0, 0)


_RULES: dict[type, _Rule] = {
    Residual: _Rule(lambda s: s.paths, lambda s, v: torch.stack(v).amax(0), lambda s, v: [v] * len(s.paths)),
    Flatten: _Rule(lambda s: (s.channels,), lambda s, v: v[0].repeat_interleave(s.positions),
                   lambda s, v: [v.view(-1, s.positions).sum(1)]),
    Concat: _Rule(lambda s: s.parts, lambda s, v: torch.cat(v), _split),
    Select: _Rule(lambda s: (s.source,), _select, _select_back),
}


def _rule(source: MaskSource) -> _Rule:
    rule = _RULES.get(type(source))
    if rule is None:
        raise TypeError(f"source: a per-step gradient policy follows units through HATGate, Residual, Flatten, "
                        f"Concat and Select, got a {type(source).__name__}")
    return rule


def gates_of(source: MaskSource) -> list[HATGate]:
    """The gates behind ``source``, each once, in order of appearance."""
    if isinstance(source, HATGate):
        return [source]
    found: dict[int, HATGate] = {}
    for part in _rule(source).parts(source):
        for gate in gates_of(part):
            found.setdefault(id(gate), gate)
    return list(found.values())


def gather(source: MaskSource, values: Mapping[HATGate, Tensor]) -> Tensor:
    """The value of every unit of ``source``, ``[source.num_features]``, from one value per gate unit."""
    if isinstance(source, HATGate):
        return values[source]
    rule = _rule(source)
    return rule.gather(source, [gather(p, values) for p in rule.parts(source)])


def scatter(source: MaskSource, values: Tensor, into: dict[HATGate, Tensor]) -> None:
    """Add ``values`` (one per unit of ``source``) into ``into[gate]`` for the gates behind ``source``."""
    if isinstance(source, HATGate):
        into[source] = into[source] + values if source in into else values
        return
    rule = _rule(source)
    for part, part_values in zip(rule.parts(source), rule.scatter(source, values), strict=True):
        scatter(part, part_values, into)

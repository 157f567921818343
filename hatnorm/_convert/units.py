"""Where a gate's units sit in a tensor, followed through the operations of a traced graph.

A gated tensor is described by its mask source and an *index*: an integer tensor that broadcasts to the
tensor and says, for every position, which unit of the source it holds (−1: a position that is always 0,
such as zero padding). The index has size 1 along every dim it does not vary in, so a convolution's output
``[N, C, H, W]`` is ``arange(C).view(1, C, 1, 1)``. An operation that only moves values (permute, reshape,
a channel split, a shuffle, a roll, padding) moves the index the same way: it is applied to the index
itself, at the shapes of an example input when the op needs them. A layer reads its input units along
the dim it contracts, which is valid only where the units do not vary along any other dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx

from hatnorm._masks import MaskSource, Select


class Units:
    """A gated tensor's units: position p holds unit ``index[p]`` of ``source`` (−1: always 0).

    ``index`` broadcasts to the tensor; when the tensor's rank is unknown (a layer reading raw data of
    unknown shape) it is 1-D and describes the last dim.
    """

    __slots__ = ("index", "source")

    def __init__(self, source: MaskSource, index: Tensor) -> None:
        self.source = source
        self.index = compress(index)

    @classmethod
    def of_gate(cls, source: MaskSource, rank: int | None, dim: int) -> Units:
        """The units of a fresh gate over ``dim`` of a tensor of ``rank`` dims (``None``: unknown, last dim)."""
        index = torch.arange(source.num_features)
        if rank is None:
            return cls(source, index)
        shape = [1] * rank
        shape[dim] = source.num_features
        return cls(source, index.view(shape))

    @property
    def rank(self) -> int | None:
        return self.index.dim() if self.index.dim() > 1 else None

    def read(self, dim: int, size: int, reader: str) -> MaskSource:
        """The mask source of the ``size`` features a layer contracts along ``dim`` (a position that is always 0,
        such as padding, does not count).

        Raises:
            ValueError: the units vary along another dim (the layer would mix units), or their count differs.
        """
        index = self.index
        if index.dim() == 1 and dim != -1:
            raise ValueError(f"{reader} reads dim {dim} of a tensor whose rank is unknown; pass example_input")
        moved = index.movedim(dim, -1)
        flat = moved.reshape(-1, moved.shape[-1])
        valid = flat >= 0
        high = flat.masked_fill(~valid, -1).amax(0)
        low = flat.masked_fill(~valid, self.source.num_features).amin(0)
        if bool(((high != low) & valid.any(0)).any()):
            raise ValueError(f"{reader} reads dim {dim}, but its input's units also vary along other dims: the "
                             "layer would mix units")
        row = high
        if row.numel() == 1 and size > 1:
            row = row.expand(size)
        if row.numel() != size:
            raise ValueError(f"{reader} reads {size} features, but its input holds {row.numel()} units there")
        if size == self.source.num_features and bool((row == torch.arange(size)).all()):
            return self.source
        return Select(self.source, row.clone())

    def unit_dim(self) -> int | None:
        """The one dim the units vary along, positions that are always 0 aside (``None``: several, or none)."""
        index = self.index
        valid = index >= 0
        varying = []
        for d in range(index.dim()):
            high = index.masked_fill(~valid, -1).amax(d, keepdim=True)
            if bool(((index != high) & valid).any()):
                varying.append(d)
        return varying[0] if len(varying) == 1 else None


def compress(index: Tensor) -> Tensor:
    """``index`` with every dim it does not vary along reduced to size 1 (a dim whose first two slices differ is
    told apart without reading the whole index)."""
    for d in range(index.dim()):
        if index.shape[d] > 1:
            first = index.narrow(d, 0, 1)
            if torch.equal(index.narrow(d, 1, 1), first) and torch.equal(index, first.expand_as(index)):
                index = first
    return index.contiguous()


def expand(index: Tensor, shape: torch.Size | None) -> Tensor:
    """``index`` at the tensor's own ``shape`` (when known), so a shape-changing op can be replayed on it."""
    if shape is None:
        return index
    return index.expand(shape).contiguous()


class Recorder(fx.Interpreter):
    """Runs an example input through a traced graph and keeps what the conversion needs of every node: a
    tensor's shape, or the value of a non-tensor (a shape read, a size computed from it)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, Any] = {}
        self.values: dict[fx.Node, Any] = {}
        self.integers: dict[fx.Node, Tensor] = {}  # small integer tensors (position ids), for lookups by them

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, Tensor):
            self.shapes[n] = result.shape
            if not result.is_floating_point() and not result.is_complex() and result.numel() <= 1 << 16:
                self.integers[n] = result.detach().clone()
        elif isinstance(result, tuple | list) and result and all(isinstance(r, Tensor) for r in result):
            self.shapes[n] = tuple(r.shape for r in result)
        else:
            self.values[n] = result
        return result


def record(gm: fx.GraphModule, example: Tensor) -> Recorder:
    """Every node's shape or value for ``example``, from one pass that leaves the graph's state as it was."""
    buffers = {k: v.clone() for k, v in gm.named_buffers()}  # a no-grad pass can move buffers, not parameters
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    recorder = Recorder(gm)
    try:
        with torch.no_grad():
            recorder.run(example)
    finally:
        for name, value in gm.named_buffers():
            value.copy_(buffers[name])
        for m, training in modes.items():
            m.training = training
    return recorder

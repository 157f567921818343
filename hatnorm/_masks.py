"""Masks of earlier tasks, and how they reach a layer's inputs and outputs.

Every parameter is protected from the masks of the units it connects (Serrà et al. eq. 3). A layer's
output units are those of the gate that follows it; its input units are those of the gate before it,
reached through the graph: a residual add takes the elementwise max of the summed paths, a flatten
repeats each channel's mask over its spatial positions, a concatenation concatenates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from hatnorm._checks import check_positive_int


@dataclass(frozen=True)
class MaskState:
    """What earlier tasks left on a set of units.

    Attributes:
        cumulative: a^{<t}, the elementwise max of the earlier tasks' masks, shape ``[N]``.
        summative: the number of earlier tasks that selected each unit (AdaHAT's summative mask), ``[N]``.
    """

    cumulative: Tensor
    summative: Tensor

    @property
    def free(self) -> float:
        """The fraction of capacity earlier tasks left unused: 1 − mean(a^{<t})."""
        return 1.0 - float(self.cumulative.float().mean())


class MaskSource(ABC):
    """Anything that says which units a tensor's channels are: a gate, or a combination of gates."""

    @property
    @abstractmethod
    def num_features(self) -> int:
        """The number of units (channels or features)."""

    @abstractmethod
    def state(self) -> MaskState:
        """The masks earlier tasks left on these units."""


def _check_sources(sources: tuple[object, ...], name: str) -> None:
    for source in sources:
        if not isinstance(source, MaskSource):
            raise TypeError(f"{name} must be gates or other mask sources (hatnorm.blocks.MaskSource), "
                            f"got a {type(source).__name__}")


class Residual(MaskSource):
    """The units of a residual add: a unit is used when it is used on any summed path (elementwise max).

    Args:
        *paths: the mask sources of the summed tensors, all with the same number of features.
    """

    def __init__(self, *paths: MaskSource) -> None:
        if len(paths) < 2:
            raise ValueError(f"paths: a residual add sums at least 2 paths, got {len(paths)}")
        _check_sources(paths, "paths")
        sizes = {p.num_features for p in paths}
        if len(sizes) != 1:
            raise ValueError(f"paths must all have the same number of features, got {[p.num_features for p in paths]}")
        self.paths = paths

    @property
    def num_features(self) -> int:
        return self.paths[0].num_features

    def state(self) -> MaskState:
        states = [p.state() for p in self.paths]
        return MaskState(
            cumulative=torch.stack([s.cumulative for s in states]).amax(0),
            summative=torch.stack([s.summative for s in states]).amax(0),
        )


class Flatten(MaskSource):
    """The units of a flattened ``[C, *spatial]`` tensor: each channel's mask repeated over its positions.

    Args:
        channels: the mask source of the channels before flattening.
        positions: the number of spatial positions per channel (H·W for a 2-D map).
    """

    def __init__(self, channels: MaskSource, positions: int) -> None:
        _check_sources((channels,), "channels")
        self.channels = channels
        self.positions = check_positive_int(positions, "positions")

    @property
    def num_features(self) -> int:
        return self.channels.num_features * self.positions

    def state(self) -> MaskState:
        s = self.channels.state()
        # flatten of [C, H, W] puts channel c at indices c·HW … (c+1)·HW − 1
        return MaskState(
            cumulative=s.cumulative.repeat_interleave(self.positions),
            summative=s.summative.repeat_interleave(self.positions),
        )


class Concat(MaskSource):
    """The units of a concatenation along the feature dimension, in order.

    Args:
        *parts: the mask sources of the concatenated tensors.
    """

    def __init__(self, *parts: MaskSource) -> None:
        if not parts:
            raise ValueError("parts: a concatenation needs at least 1 part, got 0")
        _check_sources(parts, "parts")
        self.parts = parts

    @property
    def num_features(self) -> int:
        return sum(p.num_features for p in self.parts)

    def state(self) -> MaskState:
        states = [p.state() for p in self.parts]
        return MaskState(
            cumulative=torch.cat([s.cumulative for s in states]),
            summative=torch.cat([s.summative for s in states]),
        )


class Select(MaskSource):
    """Units picked from another source by index: unit i is unit ``index[i]`` of ``source``, or a unit that is
    always 0 where ``index[i]`` is −1 (zero padding). What a channel split, a channel shuffle, a permuted
    flatten or a padded map reads.

    Args:
        source: the mask source the units come from.
        index: the unit of ``source`` behind each unit, ``[N]`` integers in ``[-1, source.num_features)``.
    """

    def __init__(self, source: MaskSource, index: Tensor) -> None:
        _check_sources((source,), "source")
        if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype.is_floating_point or index.numel() == 0:
            raise ValueError(f"index must be a non-empty 1-D integer tensor, got {index!r}")
        if int(index.min()) < -1 or int(index.max()) >= source.num_features:
            raise ValueError(f"index must lie in [-1, {source.num_features}) (the units of source), got values in "
                             f"[{int(index.min())}, {int(index.max())}]")
        self.source = source
        self.index = index.long().cpu()

    @property
    def num_features(self) -> int:
        return self.index.numel()

    def state(self) -> MaskState:
        s = self.source.state()
        picked = self.index.clamp(min=0).to(s.cumulative.device)
        zero = (self.index < 0).to(s.cumulative.device)
        return MaskState(
            cumulative=s.cumulative[picked].masked_fill(zero, 0),
            summative=s.summative[picked].masked_fill(zero, 0),
        )

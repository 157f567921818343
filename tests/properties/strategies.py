"""Shared hypothesis strategies for the property tests: sizes, shapes, gates and masks, tasks, dtypes,
seeds, optimizers, and malformed input (junk values, bad tasks and scales, malformed tensors). Tensors are
drawn as a seed and made with a ``torch.Generator``, so an example stays small for hypothesis to shrink and
the tensors stay reproducible."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor

S_MAX = 400.0

dtypes = st.sampled_from([torch.float32, torch.float64])
seeds = st.integers(min_value=0, max_value=2**32 - 1)
features = st.integers(min_value=1, max_value=6)
batch_sizes = st.integers(min_value=2, max_value=6)
momenta = st.one_of(st.sampled_from([0.0, 0.1, 1.0]), st.floats(min_value=0.0, max_value=1.0))
epsilons = st.sampled_from([1e-5, 1e-3, 1e-1])
#: gate scales s > 0, from HAT's smallest annealed scale 1/s_max up to s_max
scales = st.one_of(st.sampled_from([1 / S_MAX, 1.0, S_MAX]), st.floats(min_value=1 / S_MAX, max_value=S_MAX))
#: a tensor's spread and offset; float32 comparisons stay meaningful at these magnitudes
spreads = st.floats(min_value=0.1, max_value=10.0)
offsets = st.floats(min_value=-5.0, max_value=5.0)


@st.composite
def task_setups(draw: st.DrawFn, min_tasks: int = 1, max_tasks: int = 4) -> tuple[int, int]:
    """``(num_tasks, task)`` with ``task`` in ``[0, num_tasks)``."""
    num_tasks = draw(st.integers(min_value=min_tasks, max_value=max_tasks))
    return num_tasks, draw(st.integers(min_value=0, max_value=num_tasks - 1))


#: one gate value in [0, 1], with the selection threshold 0.5 and its neighbourhood drawn often
gate_values = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0]),
    st.floats(min_value=0.5 - 2**-7, max_value=0.5 + 2**-7, width=32),
    st.floats(min_value=0.0, max_value=1.0, width=32),
)


@st.composite
def gates(draw: st.DrawFn, n: int, dtype: torch.dtype, selection: str | None = None) -> Tensor:
    """A layer's gate ``[n]`` with values in [0, 1], each exact in float32 so the selection a > 0.5 does not
    depend on ``dtype``.

    Args:
        selection: ``"none"`` (every value ≤ 0.5: nothing selected), ``"all"`` (every value > 0.5,
            all ones drawn often), ``"any"``, or ``None`` to draw one of the three.
    """
    selection = selection or draw(st.sampled_from(["any", "none", "all"]))
    if selection == "none":
        values = st.one_of(st.just(0.0), st.just(0.5), st.floats(min_value=0.0, max_value=0.5, width=32))
    elif selection == "all":
        values = st.one_of(st.just(1.0), st.floats(min_value=0.5, max_value=1.0, exclude_min=True, width=32))
    else:
        values = gate_values
    return torch.tensor(draw(st.lists(values, min_size=n, max_size=n)), dtype=dtype)


@st.composite
def binary_masks(draw: st.DrawFn, n: int) -> Tensor:
    """A binarized cumulative mask ``[n]`` of 0s and 1s, all-zero and all-one drawn often."""
    bits = draw(st.one_of(
        st.just([False] * n),
        st.just([True] * n),
        st.lists(st.booleans(), min_size=n, max_size=n),
    ))
    return torch.tensor(bits, dtype=torch.float32)


@st.composite
def bn_shapes(draw: st.DrawFn, dims: int, channels: int) -> tuple[int, ...]:
    """An input shape for a batch norm with ``channels`` channels: ``[N, C]`` or ``[N, C, L]`` for
    ``dims=1``, ``[N, C, H, W]`` for ``dims=2``; at least 2 values per channel, as training needs."""
    n = draw(st.integers(min_value=1, max_value=5))
    if dims == 1:
        spatial = draw(st.one_of(st.just(()), st.tuples(st.integers(min_value=1, max_value=4))))
    else:
        spatial = draw(st.tuples(st.integers(min_value=1, max_value=3), st.integers(min_value=1, max_value=3)))
    if n * int(torch.Size(spatial).numel()) < 2:
        n = 2
    return (n, channels, *spatial)


@st.composite
def ln_shapes(draw: st.DrawFn, channels: int) -> tuple[int, ...]:
    """An input shape for a layer norm over ``channels`` features in the last dim (2-D to 4-D)."""
    lead = draw(st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=3))
    return (*lead, channels)


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator, which module initialisation reads, and restore it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def randn(shape: Iterable[int], gen: torch.Generator, dtype: torch.dtype, spread: float = 1.0,
          offset: float = 0.0) -> Tensor:
    """``offset + spread·N(0, 1)`` of ``shape``, drawn from ``gen``."""
    return torch.randn(tuple(shape), generator=gen, dtype=dtype) * spread + offset


@dataclass(frozen=True)
class OptimizerSpec:
    """A drawn optimizer configuration; calling it on parameters builds the optimizer."""

    name: str
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __call__(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


@st.composite
def optimizers(draw: st.DrawFn, names: tuple[str, ...] = ("sgd", "adam", "adamw"),
               decay: bool = False) -> OptimizerSpec:
    """An optimizer among ``names`` with a random learning rate, momentum (SGD) and weight decay.

    Args:
        decay: draw a momentum (SGD) and a weight decay that are both > 0, the settings that move entries
            whose gradient is zero.
    """
    name = draw(st.sampled_from(names))
    lr = draw(st.floats(min_value=1e-4, max_value=0.5))
    low = 0.1 if decay else 0.0
    momentum = draw(st.floats(min_value=low, max_value=0.99)) if name == "sgd" else 0.0
    weight_decay = draw(st.floats(min_value=1e-3 if decay else 0.0, max_value=0.1))
    return OptimizerSpec(name, lr, momentum, weight_decay)


# Malformed input ----------------------------------------------------------------------------------------------

#: values no argument of the API takes in place of a number, tensor or name: None, bools, text, containers, objects
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=4),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.builds(object),
    st.complex_numbers(max_magnitude=10, allow_nan=False, allow_infinity=False),
)
#: numbers that are never a size, a scale or an option that must be > 0
non_positive = st.one_of(
    st.sampled_from([0, 0.0, -0.0, -1, math.nan, math.inf, -math.inf]),
    st.integers(max_value=0),
    st.floats(max_value=0.0),
)
#: the dtypes no floating-point input takes
non_float_dtypes = st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])


@st.composite
def bad_tasks(draw: st.DrawFn, num_tasks: int) -> object:
    """A task id that is out of ``[0, num_tasks)`` or not an integer (floats, bools, text, float or multi-element
    tensors, ...)."""
    return draw(st.one_of(
        st.integers(min_value=num_tasks, max_value=num_tasks + 10**6),
        st.integers(max_value=-1, min_value=-(10**6)),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0.0, 1.0, float(num_tasks - 1)]),
        junk,
        st.builds(torch.tensor, st.floats(min_value=0, max_value=num_tasks - 1)),
        st.builds(torch.tensor, st.lists(st.integers(0, num_tasks - 1), min_size=2, max_size=3)),
        st.builds(lambda t: torch.tensor(t, dtype=torch.long), st.integers(num_tasks, num_tasks + 3)),
        st.just(torch.tensor(True)),
        st.just(torch.zeros(0, dtype=torch.long)),
    ))


@st.composite
def bad_scales(draw: st.DrawFn) -> object:
    """A gate scale that is not a number > 0 nor a one-element float tensor holding one (None included:
    required while training). A CPU tensor's value is checked (free there); an accelerator's is not read."""
    return draw(st.one_of(
        non_positive,
        st.sampled_from([0.0, -400.0, math.nan, math.inf, -math.inf]).map(torch.tensor),
        junk,
        st.builds(torch.ones, st.integers(min_value=2, max_value=3)),
        st.just(torch.zeros(0)),
        st.just(torch.tensor(2)),
        st.just(torch.tensor(True)),
        st.just(torch.tensor(2 + 0j)),
    ))


@st.composite
def malformed_tensors(draw: st.DrawFn, shape: tuple[int, ...], *, fixed: dict[int, int], ranks: tuple[int, ...],
                      bad_floats: tuple[torch.dtype, ...] = (), other_device: bool = True) -> object:
    """Something in place of a tensor of ``shape`` that is refused: a rank not in ``ranks``, a wrong size of a
    ``fixed`` dim (dim → required size), a size-0 dim, a dtype that is not floating-point or is in
    ``bad_floats``, another device (meta; unless ``other_device`` is off, for a module without parameters),
    or no tensor at all."""
    kinds = ["rank", "empty", "dtype", "not_a_tensor"] + (["size"] if fixed else []) + (["device"] if other_device
                                                                                         else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "device":
        return torch.zeros(shape, device="meta")
    if kind == "not_a_tensor":
        return draw(st.one_of(junk, st.just(torch.zeros(shape).tolist())))
    if kind == "dtype":
        return torch.zeros(shape).to(draw(st.one_of(non_float_dtypes, st.sampled_from(bad_floats or [torch.int16]))))
    new = list(shape)
    if kind == "rank":
        rank = draw(st.integers(min_value=0, max_value=6).filter(lambda r: r not in ranks))
        new = draw(st.lists(st.integers(min_value=1, max_value=3), min_size=rank, max_size=rank))
    elif kind == "size":
        dim = draw(st.sampled_from(sorted(fixed)))
        new[dim] = draw(st.integers(min_value=1, max_value=fixed[dim] + 3).filter(lambda n: n != fixed[dim]))
    else:
        new[draw(st.integers(min_value=0, max_value=len(shape) - 1))] = 0
    return torch.zeros(new)

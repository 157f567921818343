"""Fused CPU kernels for the masked LayerNorm, compiled by numba on first use and cached.

In ATen ops the masked LayerNorm's forward is six passes over its input (the two masked moments as
matrix-vector products, the centring, the square, the scaling and the affine) and its backward four;
on the CPU those passes, not the arithmetic, are its cost (2.3x ``nn.LayerNorm`` at [8, 197, 768]).
These kernels do the whole forward in one pass per row and the backward in one, each row staying in
the core's cache, so the layer costs what ``nn.LayerNorm`` costs (see docs/performance.md).

They run rows in parallel on numba's threads, as many as torch's intra-op threads, and are used only
where they apply (:func:`applies`): float32 or float64 tensors of torch's CPU type, outside
``torch.compile`` and ``torch.export`` tracing (which see the ATen version). ``HATNORM_FUSED=0`` in
the environment (or the block :func:`kernels` ``(False)``) uses the ATen version everywhere. The
summation order inside a row differs from ATen's, so the two agree to rounding, not bit for bit;
each is deterministic for a given number of threads.

numba is optional (the ``fused`` extra): the kernels, and numba with them, are imported by the first call
that uses them, not by ``import hatnorm``; without numba the ATen version runs everywhere.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from hatnorm._extras import missing

#: the module of the numba kernels, imported on first use (importing numba takes about a second)
KERNELS = "hatnorm._fused_kernels"

#: the dtypes the kernels are compiled for (the ATen version handles the others)
DTYPES = (torch.float32, torch.float64)

#: whether the kernels may be used: ``HATNORM_FUSED=0`` in the environment at import turns them off
_wanted = os.environ.get("HATNORM_FUSED", "1") != "0"

#: whether numba is installed, found without importing it
_available = importlib.util.find_spec("numba") is not None


def available() -> bool:
    """Whether numba is installed (the ``fused`` extra), so that the kernels can run."""
    return _available


@functools.cache
def _kernels() -> ModuleType:
    """The numba kernels; the first call imports them, and numba with them."""
    if not _available:
        raise missing("the fused masked-LayerNorm kernels", "numba", "fused")
    return importlib.import_module(KERNELS)


def enabled() -> bool:
    """Whether the fused kernels may be used (see :func:`kernels`)."""
    return _wanted


@contextmanager
def kernels(wanted: bool) -> Iterator[None]:
    """Within the block, use the fused kernels where they apply (``True``) or the ATen version everywhere
    (``False``); the previous choice is restored afterwards."""
    global _wanted
    before, _wanted = _wanted, bool(wanted)
    try:
        yield
    finally:
        _wanted = before


def applies(x: Tensor, *parameters: Tensor) -> bool:
    """Whether the fused kernels compute a masked LayerNorm of ``x`` with ``parameters`` (gate, γ, β):
    plain CPU tensors of one compiled dtype, outside compilation and export (dynamo and fake tensors
    trace the ATen version)."""
    tensors = (x, *parameters)
    return (all(t.device.type == "cpu" and t.dtype == x.dtype and type(t) in (Tensor, torch.nn.Parameter)
                for t in tensors)
            and x.dtype in DTYPES and not torch.compiler.is_compiling() and enabled() and _available)


def load() -> None:
    """Load both float32 kernels into this process now, as the first masked-LN call would (numba reads their
    machine code from its cache, or compiles and caches it): a fixed cost of about 60 MiB of resident
    memory per process, whatever the model's size (docs/performance.md).

    Raises:
        ImportError: numba is not installed.
    """
    x = torch.zeros(1, 2, dtype=torch.float32)
    parameters = (torch.full((2,), 0.5), torch.ones(2), torch.zeros(2), torch.ones(2))
    out, mean, rstd = layer_norm_forward(x, *parameters, 1e-5)
    layer_norm_backward(torch.ones_like(out), x, mean, rstd, *parameters)


def _threads() -> int:
    """numba's threads for one call: torch's intra-op threads, at most numba's pool."""
    numba = _kernels().numba
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    return threads


def _array(t: Tensor) -> Any:
    """``t`` as a numpy array sharing its memory. No torch op touches a fresh output buffer before the
    kernel fills it (a dispatch mode watching the ops would read its uninitialised bits)."""
    return (t.detach() if t.requires_grad else t).numpy()


def _rows(t: Tensor) -> Any:
    """``t`` as a 2-d numpy array [rows, last dim] sharing its memory."""
    array = _array(t)
    return array.reshape(-1, array.shape[-1])


def layer_norm_forward(x: Tensor, scale: Tensor, weight: Tensor, bias: Tensor, gate: Tensor,
                       eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(x − μ)·r·(γ ⊙ a) + β ⊙ a over the last dim of contiguous ``x``, μ and r⁻² − eps the moments
    weighted by ``scale`` (m/k); zeros where no feature is selected. Returns it, μ and r (``[rows]``)."""
    out = torch.empty_like(x)
    rows = _rows(x)
    mean, rstd = x.new_empty(rows.shape[0]), x.new_empty(rows.shape[0])
    _threads()
    parameters = (_array(t) for t in (scale, weight, bias, gate))
    _kernels().forward(rows, *parameters, rows.dtype.type(eps), _rows(out), _array(mean), _array(rstd))
    return out, mean, rstd


def layer_norm_backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, weight: Tensor,
                        bias: Tensor, gate: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of :func:`layer_norm_forward`'s output with respect to x, the gate a, γ and β:
    ∂L/∂x = r·(g − m/k·(Σ g + x̂·Σ g x̂)) with g = dy ⊙ γ ⊙ a, and with Σ dy·x̂ and Σ dy over the rows
    ∂L/∂a = γ·Σ dy·x̂ + β·Σ dy, ∂L/∂γ = a·Σ dy·x̂, ∂L/∂β = a·Σ dy."""
    dy = dy.to(x.dtype).contiguous()
    dx = torch.empty_like(x)
    sums = x.new_empty(2, _threads(), x.shape[-1])
    d_gate, d_weight, d_bias = torch.empty_like(gate), torch.empty_like(weight), torch.empty_like(bias)
    parameters = (_array(t) for t in (mean, rstd, scale, weight, bias, gate))
    gradients = (_array(t) for t in (d_gate, d_weight, d_bias))
    _kernels().backward(_rows(dy), _rows(x), *parameters, _array(x).dtype.type(0), _rows(dx), _array(sums),
                            *gradients)
    return dx, d_gate, d_weight, d_bias

"""Probes that check what an operation does on a tensor: whether it acts on every value alone and keeps 0 at 0,
only moves values, or gives no data. A registered rule's claim is checked with them, and transformers' activations
are judged by them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def rule_failure(op: Callable[[Tensor], Any], rule: str, shape: tuple[int, ...] = (2, 3, 4, 4), *,
                 lone: bool = False) -> str | None:
    """Why ``op`` does not do what ``rule`` claims, on a probe tensor of ``shape``; ``None`` when it does or the claim
    cannot be checked (``lone``: ``op`` may need more arguments than the tensor, so a call that raises is not held
    against it)."""
    if rule == "unitwise":
        failure = unitwise_failure(op, shape)
    elif rule == "moves":
        probe = (torch.randperm(math.prod(shape), generator=torch.Generator().manual_seed(0)) + 1.0).view(shape)
        try:
            with torch.no_grad():
                out = op(probe)
        except Exception as error:  # whatever the op raises for a plain tensor
            failure = f"cannot be checked: calling it on a tensor of shape {list(shape)} raised {error}"
        else:
            moved = [out] if isinstance(out, Tensor) else list(out) if isinstance(out, tuple | list) else []
            values = torch.cat([probe.reshape(-1), probe.new_zeros(1)])
            failure = None if moved and all(isinstance(m, Tensor) and bool(torch.isin(m, values).all())
                                            for m in moved) else \
                "gives values its input does not hold (it does more than move values)"
    elif rule == "bookkeeping":
        try:
            with torch.no_grad():
                out = op(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
        except Exception as error:  # whatever the op raises for a plain tensor
            failure = f"cannot be checked: calling it on a tensor of shape {list(shape)} raised {error}"
        else:
            failure = "gives a floating-point tensor (data, not bookkeeping)" if \
                isinstance(out, Tensor) and out.dtype.is_floating_point else None
    else:
        failure = None
    if failure is None or (lone and failure.startswith("cannot be checked")):
        return None
    return failure


def unitwise_failure(op: Callable[[Tensor], Any], shape: tuple[int, ...] = (2, 3, 4, 4), *,
                     zero: bool = True) -> str | None:
    """Why ``op`` is not unit-wise with f(0) = 0, judged on a probe tensor of ``shape`` (a third of its values 0,
    the rest spread over ±9): ``None`` when its output has the probe's shape, is exactly 0 wherever the probe is
    0 (checked only with ``zero``), and is the same function of every value alone (a permutation of the probe's
    values permutes the output alike); else the reason, for an error message."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(shape, generator=generator) * 3
    probe.view(-1)[::3] = 0.0
    order = torch.randperm(probe.numel(), generator=generator)
    try:
        with torch.no_grad():
            out, shuffled = op(probe.clone()), op(probe.reshape(-1)[order].reshape(shape))
    except Exception as error:  # whatever the op raises for a plain tensor
        return (f"cannot be checked: calling it on a tensor of shape {list(shape)} raised "
                f"{type(error).__name__}: {error}")
    if not isinstance(out, Tensor) or out.shape != probe.shape or not isinstance(shuffled, Tensor) or \
            shuffled.shape != probe.shape:
        return f"does not give a tensor of its input's shape {list(shape)}"
    at_zero = out[probe == 0]
    if zero and bool((at_zero != 0).any()):
        return f"maps 0 to {at_zero[at_zero != 0][0].item():.4g}, not 0, so a closed unit would not stay closed"
    if not torch.allclose(out.reshape(-1)[order], shuffled.reshape(-1), rtol=1e-4, atol=1e-6, equal_nan=True):
        return "does not act on every value alone (its output at one position depends on other positions)"
    return None


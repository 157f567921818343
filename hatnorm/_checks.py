"""Validation helpers shared by every public entry point.

Each helper raises where bad input enters, with a message that names the argument, the value given
and what is allowed, before any state is touched.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def check_task(task: object, num_tasks: int, name: str = "task") -> int:
    """Return ``task`` as an ``int`` after checking it is an integer in ``[0, num_tasks)``."""
    if isinstance(task, bool) or not isinstance(task, numbers.Integral | Tensor):
        raise TypeError(f"{name} must be an int in [0, {num_tasks}), got {task!r} of type {type(task).__name__}")
    if isinstance(task, Tensor):
        if task.numel() != 1 or task.dtype.is_floating_point or task.dtype == torch.bool:
            raise TypeError(f"{name} must be an int in [0, {num_tasks}), got a tensor of shape "
                            f"{tuple(task.shape)} and dtype {task.dtype}")
        task = task.item()
    task = int(task)
    if not 0 <= task < num_tasks:
        raise ValueError(f"{name} must be in [0, {num_tasks}), got {task}")
    return task


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` after checking it is an integer ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
    return int(value)


def check_positive(value: object, name: str) -> float:
    """Return ``value`` as a float after checking it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_non_negative(value: object, name: str) -> float:
    """Return ``value`` as a float after checking it is a finite number ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    return float(value)


def check_scale(s: object) -> float | Tensor:
    """Check the gate scale ``s``: a number > 0, or a one-element tensor (kept as is, so a changing
    scale does not force a recompile; its value is checked where it is made, in :func:`anneal_scale`)."""
    if isinstance(s, Tensor):
        if s.numel() != 1 or not s.dtype.is_floating_point:
            raise ValueError(f"s must be a number > 0 or a one-element float tensor, got a tensor of shape "
                             f"{tuple(s.shape)} and dtype {s.dtype}")
        return s
    return check_positive(s, "s")


def check_mask(mask: object, num_features: int) -> Tensor:
    """Check a layer's gate: a float tensor of shape ``[num_features]``."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a tensor of shape [{num_features}], got {type(mask).__name__}")
    if mask.shape != (num_features,):
        raise ValueError(f"mask must have shape [{num_features}] (one gate value per feature), "
                         f"got shape {list(mask.shape)}")
    if not mask.dtype.is_floating_point:
        raise ValueError(f"mask must be a floating-point tensor with values in [0, 1], got dtype {mask.dtype}")
    return mask


def check_input(x: object, num_features: int, *, dims: tuple[int, ...], channel_dim: int, name: str = "x") -> Tensor:
    """Check a norm's input: a float tensor whose rank is in ``dims`` and with ``num_features`` channels."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() not in dims:
        allowed = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {allowed}, got a {x.dim()}-D tensor of shape {list(x.shape)}")
    if x.shape[channel_dim] != num_features:
        raise ValueError(f"{name} must have {num_features} features in dim {channel_dim}, "
                         f"got shape {list(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x

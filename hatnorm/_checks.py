"""Validation helpers shared by every public entry point.

Each helper raises where bad input enters, with a message that names the argument, the value given
and what is allowed, before any state is touched.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Sequence
from typing import Any

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


#: the most tasks a model takes: every gate and per-task norm keeps a row per task, so 10,000 tasks of a
#: full-width ResNet-18 already hold about 200 MB of embeddings, and a mistyped 10**6 would take gigabytes
MAX_TASKS = 10_000


def check_num_tasks(value: object, name: str = "num_tasks") -> int:
    """Return ``value`` after checking it is an integer in ``[1, MAX_TASKS]``."""
    value = check_positive_int(value, name)
    if value > MAX_TASKS:
        raise ValueError(f"{name} must be ≤ {MAX_TASKS:,} (every gate and per-task norm keeps a row per task), "
                         f"got {value:,}")
    return value


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
    scale does not force a recompile). A tensor's value is checked where reading it is free: on the CPU,
    outside ``torch.compile``; on an accelerator it would cost a device synchronisation per call, and is
    left to where the scale is made (:func:`anneal_scale`)."""
    if isinstance(s, Tensor):
        if s.numel() != 1 or not s.dtype.is_floating_point:
            raise ValueError(f"s must be a number > 0 or a one-element float tensor, got a tensor of shape "
                             f"{tuple(s.shape)} and dtype {s.dtype}")
        if s.device.type == "cpu" and not torch.compiler.is_compiling():
            value = s.item()
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"s must be a finite number > 0, got a tensor holding {value}")
        return s
    return check_positive(s, "s")


def check_gate(gate: object, num_features: int, *, like: Tensor | None = None,
               device: torch.device | None = None) -> Tensor:
    """Check a layer's gate: a float tensor of shape ``[num_features]``, of a dtype and on the device that fit
    ``like`` (the norm's parameter, see :func:`check_dtype`), and on ``device`` (its input's) when given."""
    if not isinstance(gate, Tensor):
        raise TypeError(f"gate must be a tensor of shape [{num_features}], got {type(gate).__name__}")
    if gate.shape != (num_features,):
        raise ValueError(f"gate must have shape [{num_features}] (one gate value per feature), "
                         f"got shape {list(gate.shape)}")
    if not gate.dtype.is_floating_point:
        raise ValueError(f"gate must be a floating-point tensor with values in [0, 1], got dtype {gate.dtype}")
    if device is not None and gate.device != device:
        raise ValueError(f"gate must be on the device of x, {device}, got {gate.device}")
    check_dtype(gate, like, name="gate", mixed=True)
    # read on the CPU only, where it costs no device synchronisation (and not while compiling)
    if gate.device.type == "cpu" and not torch.compiler.is_compiling() and not _within_unit_interval(gate):
        outside = gate[~((gate >= 0) & (gate <= 1))]
        raise ValueError(f"gate must hold values in [0, 1], got {outside.numel()} outside, e.g. "
                         f"{outside[:3].tolist()}")
    return gate


class Remembered:
    """What was derived from one tensor, kept while that tensor lives and is not written to (its version
    counter moves on every in-place write): a transformer's norms all read the stream's gate, one tensor,
    so what each norm derives from it is computed once per forward. Not used while ``torch.compile``
    traces, where the derived values are part of the graph."""

    def __init__(self) -> None:
        # (tensor, its version, value) in one attribute, replaced whole, so threads never see a mix
        self._entry: tuple[weakref.ref[Tensor], int, Any] | None = None

    def get(self, tensor: Tensor) -> Any:
        """The value remembered for ``tensor``, or ``None``."""
        entry = self._entry
        if entry is not None and entry[0]() is tensor and tensor._version == entry[1]:
            return entry[2]
        return None

    def remember(self, tensor: Tensor, value: Any) -> Any:
        """Keep ``value`` for ``tensor`` (replacing what was kept) and return it."""
        self._entry = (weakref.ref(tensor), tensor._version, value)
        return value


_in_unit_interval = Remembered()


def _within_unit_interval(gate: Tensor) -> bool:
    """Whether every value is in [0, 1] (NaN is not): one reduction, read once per gate tensor."""
    if _in_unit_interval.get(gate):
        return True
    low, high = torch.aminmax(gate)
    if not (low.item() >= 0 and high.item() <= 1):
        return False
    _in_unit_interval.remember(gate, True)
    return True


def check_input(x: object, num_features: int, *, ranks: tuple[int, ...], channel_dim: int, like: Tensor | None = None,
                name: str = "x") -> Tensor:
    """Check a norm's input: a non-empty float tensor whose rank is in ``ranks``, with ``num_features`` channels
    in ``channel_dim``, of a dtype and on the device that fit ``like`` (the norm's parameter, see
    :func:`check_dtype`)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() not in ranks:
        allowed = " or ".join(f"{d}-D" for d in ranks)
        raise ValueError(f"{name} must be {allowed}, got a {x.dim()}-D tensor of shape {list(x.shape)}")
    if x.shape[channel_dim] != num_features:
        raise ValueError(f"{name} must have {num_features} features in dim {channel_dim}, "
                         f"got shape {list(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty (every size ≥ 1, a batch of N ≥ 1), got shape {list(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    check_dtype(x, like, name=name, mixed=True)
    return x


#: the lower-precision inputs that ``F.batch_norm`` and ``F.layer_norm`` take with float32 parameters
_MIXED = (torch.float16, torch.bfloat16)


def check_dtype(x: Tensor, like: Tensor | None, *, name: str, mixed: bool) -> None:
    """Check that floating-point ``x`` can meet ``like``, a parameter of the module it enters.

    ``x`` must be on ``like``'s device and have its dtype. With ``mixed``, a float16/bfloat16 ``x`` also
    fits float32 parameters (the norms compute their statistics in float32, as ``F.batch_norm`` does); at a
    model's input any floating dtype fits while autocast is on for the device, since autocast casts it.
    ``like=None`` (a module without parameters) accepts any device and dtype.
    """
    if like is None:
        return
    if x.device != like.device:
        raise ValueError(f"{name} must be on the device of the model's parameters, {like.device}, got {x.device}")
    if x.dtype == like.dtype:
        return
    if mixed and like.dtype == torch.float32:
        if x.dtype in _MIXED:
            return
        raise ValueError(f"{name} must have dtype torch.float32 (the parameters' dtype), or torch.float16 or "
                         f"torch.bfloat16 (mixed precision), got {x.dtype}")
    if not mixed and torch.is_autocast_enabled(x.device.type):
        return
    raise ValueError(f"{name} must have dtype {like.dtype} (the dtype of the model's parameters), got {x.dtype}")


def _shape_text(shape: Sequence[int | str]) -> str:
    return "[" + ", ".join(["N", *map(str, shape)]) + "]"


def check_batch(x: object, shape: Sequence[int | str], *, like: Tensor, name: str = "x") -> Tensor:
    """Check a model's input: a floating-point tensor ``[N, *shape]`` with N ≥ 1, on ``like``'s device and
    of its dtype (``like`` is a parameter of the model).

    Args:
        x: the input.
        shape: the size of every dim after the batch dim: an int for a fixed size, a name (``"H"``) for any
            size ≥ 1.
        like: a parameter of the model.
        name: the argument's name in messages.
    """
    expected = _shape_text(shape)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor of shape {expected}, got {type(x).__name__}")
    fits = x.dim() == len(shape) + 1 and all(
        isinstance(size, str) or x.shape[i] == size for i, size in enumerate(shape, start=1))
    if not fits or x.numel() == 0:
        free = ", ".join(["N", *(size for size in shape if isinstance(size, str))])
        raise ValueError(f"{name} must have shape {expected} with {free} ≥ 1, got {list(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    check_dtype(x, like, name=name, mixed=False)
    return x


def check_flat_batch(x: object, features: int, *, like: Tensor, name: str = "x") -> Tensor:
    """Check the input of a model that flattens it from dim 1: a floating-point tensor ``[N, ...]`` with N ≥ 1
    and ``features`` values per sample, on ``like``'s device and of its dtype."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor of shape [N, {features}] (or [N, ...] with {features} values "
                        f"per sample), got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] < 1 or math.prod(x.shape[1:]) != features:
        raise ValueError(f"{name} must have shape [N, {features}] (or [N, ...] with {features} values per sample) "
                         f"with N ≥ 1, got {list(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    check_dtype(x, like, name=name, mixed=False)
    return x


def check_batch_statistics(x: Tensor, positions: int | None, *, training: bool, name: str = "x") -> None:
    """Refuse, in training, a batch that would give a batch-statistics norm a single value per channel.

    Args:
        x: the model's input ``[N, ...]``.
        positions: the fewest values per sample and channel that any batch-statistics norm of the model sees
            (1 after a fully connected layer, H·W after a convolution), or ``None`` when the model has none.
        training: whether the model is in training mode.
        name: the argument's name in messages.
    """
    if training and positions is not None and x.shape[0] * positions < 2:
        raise ValueError(f"{name} must have N ≥ 2 in training: the model's batch-statistics norms need more than "
                         f"1 value per channel, got shape {list(x.shape)}")


def check_training_scale(s: object, training: bool) -> float | Tensor | None:
    """Check the gate scale of a forward: required (see :func:`check_scale`) while training, ignored in evaluation."""
    if not training:
        return s
    if s is None:
        raise ValueError("s must be given while training (a number > 0, e.g. HAT.scale(batch, num_batches)), "
                         "got None")
    return check_scale(s)


def check_task_loss(task_loss: object) -> Tensor:
    """Check the task loss given to :meth:`hatnorm.HAT.loss`: a one-element floating-point tensor, finite.

    The finiteness check reads the value (a device synchronisation); it is skipped while ``torch.compile``
    traces, so a compiled step has no graph break.
    """
    if not isinstance(task_loss, Tensor) or task_loss.numel() != 1 or not task_loss.dtype.is_floating_point:
        given = (f"a tensor of shape {list(task_loss.shape)} and dtype {task_loss.dtype}"
                 if isinstance(task_loss, Tensor) else repr(task_loss))
        raise TypeError(f"task_loss must be a one-element floating-point tensor (the batch's mean loss), got {given}")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(task_loss).all()):
        raise ValueError(f"task_loss must be finite, got {task_loss.item()}: the batch had NaN/inf inputs or "
                         "training diverged")
    return task_loss


def check_task_and_scale(task: object, s: object, *, num_tasks: int,
                         training: bool) -> tuple[int, float | Tensor | None]:
    """Check a model forward's ``task`` (see :func:`check_task`) and ``s`` (see :func:`check_training_scale`)."""
    return check_task(task, num_tasks), check_training_scale(s, training)

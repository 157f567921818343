"""HAT's gate: per-task embeddings, σ(s·e), the scale schedule and the embedding-gradient compensation."""

from __future__ import annotations

from typing import final

import torch
from torch import Tensor, nn

from hatnorm._checks import (
    check_non_negative,
    check_num_tasks,
    check_positive,
    check_positive_int,
    check_scale,
    check_task,
    check_training_scale,
)
from hatnorm._masks import MaskSource, MaskState

GATE_FLOOR = 1e-8
"""Gate values never fall below this (see :func:`hat_gate`)."""


def hat_gate(e: Tensor, s: float | Tensor, floor: float = GATE_FLOOR) -> Tensor:
    """The gate a = σ(s·e) (Serrà et al. eq. 1), held at ``floor`` in value where σ(s·e) is smaller.

    Why the floor: at the scales the schedule spends most of an epoch at, σ(s·e) of a closed unit is
    tiny (σ(−88) ≈ 6e−39 is a float32 subnormal), and so are its products with activations and
    gradients; x86 cores process subnormals one to two orders of magnitude slower. Held at 1e−8
    (s·e < −18.4), no tensor of a training step holds a subnormal, even where two gates multiply
    (attention's q·k; at 1e−12 a ViT still made ~1e−3 of its values subnormal), while the gradient stays
    σ'(s·e), exactly the gradient HAT's compensation (eq. 5) rescales to recruit closed units. 1e−8 is
    below float32's relative precision (6e−8): next to an open unit, a held unit's share of a sum is
    lost in rounding, as Serrà's smaller value is. The floor is a small positive value rather than 0
    because a gate sits before the activation (norm(x, a, t) → ReLU): ReLU(0·y) passes no gradient to
    the gate, ReLU(1e−8·y) passes Serrà's, whose gate follows the activation.

    Args:
        e: the embedding, a floating-point tensor of any shape.
        s: the scale, a number > 0 or a one-element float tensor.
        floor: the smallest gate value, in [0, 0.5) [1e-8]; 0 gives the plain sigmoid.
    """
    _check_embedding(e)
    return _gate(e, check_scale(s), _check_floor(floor))


def _gate(e: Tensor, s: float | Tensor, floor: float) -> Tensor:
    """:func:`hat_gate` for arguments already checked (a gate's forward and the regulariser check them once)."""
    a = torch.sigmoid(s * e)
    if floor == 0:
        return a
    # value max(a, floor) exactly ((a − a) + max(a, floor)); gradient σ's, also below the floor
    return (a - a.detach()) + a.detach().clamp_min(floor)


def _check_floor(floor: object) -> float:
    if check_non_negative(floor, "floor") >= 0.5:
        raise ValueError(f"floor must be a number in [0, 0.5) (0.5 is where a unit is selected), got {floor!r}")
    return float(floor)


def _check_embedding(e: object, name: str = "e") -> None:
    if not isinstance(e, Tensor) or not e.dtype.is_floating_point:
        given = f"dtype {e.dtype}" if isinstance(e, Tensor) else type(e).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {given}")


def anneal_scale(batch: int, num_batches: int, s_max: float, *, reference: bool = False) -> float:
    """The scale for batch ``batch`` (0-based) of ``num_batches``, annealed within each epoch.

    s = 1/s_max + (s_max − 1/s_max)·(b − 1)/(B − 1) with b = batch + 1 (Serrà et al. eq. 2); one batch
    per epoch gives s_max. ``reference=True`` gives the form of Serrà et al.'s code instead,
    s = 1/s_max + (s_max − 1/s_max)·i/N over the index i of the batch's first sample among N, which for
    batches of equal size is batch/num_batches: the last batch stays below s_max.
    """
    num_batches = check_positive_int(num_batches, "num_batches")
    s_max = check_positive(s_max, "s_max")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 0 <= batch < num_batches:
        raise ValueError(f"batch must be an int in [0, {num_batches}), got {batch!r}")
    if reference:
        return 1.0 / s_max + (s_max - 1.0 / s_max) * batch / num_batches
    if num_batches == 1:
        return s_max
    return 1.0 / s_max + (s_max - 1.0 / s_max) * batch / (num_batches - 1)


def compensation_factor(e: Tensor, s: float | Tensor, s_max: float, thres_cosh: float = 50.0) -> Tensor:
    """The factor q'/q of the embedding-gradient compensation (Serrà et al. eq. 5):
    s_max·[cosh(clamp(s·e, ±thres_cosh)) + 1] / (s·[cosh(e) + 1]).

    Args:
        e: the embedding, a floating-point tensor.
        s: the scale, a number > 0 or a one-element float tensor.
        s_max: the largest scale, > 0.
        thres_cosh: the clamp of s·e, > 0.
    """
    _check_embedding(e)
    s = check_scale(s)
    s_max = check_positive(s_max, "s_max")
    thres_cosh = check_positive(thres_cosh, "thres_cosh")
    num = torch.cosh(torch.clamp(s * e, -thres_cosh, thres_cosh)) + 1
    den = torch.cosh(e) + 1
    return (s_max / s) * num / den


def compensate(grad: Tensor, e: Tensor, s: float | Tensor, s_max: float, thres_cosh: float = 50.0) -> Tensor:
    """The compensated embedding gradient q' = factor·q (see :func:`compensation_factor`).

    Args:
        grad: the embedding's gradient q, a floating-point tensor of ``e``'s shape.
        e: the embedding, a floating-point tensor.
        s: the scale, a number > 0 or a one-element float tensor.
        s_max: the largest scale, > 0.
        thres_cosh: the clamp of s·e, > 0.
    """
    _check_embedding(grad, "grad")
    if isinstance(e, Tensor) and grad.shape != e.shape:
        raise ValueError(f"grad must have the shape of e, {list(e.shape)}, got {list(grad.shape)}")
    return grad * compensation_factor(e, s, s_max, thres_cosh)


@final
class HATGate(nn.Module, MaskSource):
    """The attention gate of one layer: a^t = σ(s·e^t) with one embedding row per task.

    While training, ``forward(task, s)`` gives the soft gate at scale ``s``. In evaluation it gives the
    gate at ``s_max``, or, when ``binarize`` is on, the binarized gate 1[a^t > 0.5] = 1[e^t > 0], so an
    earlier task reads exactly the units it protected.

    The gate also stores what finished tasks left: ``cumulative`` (a^{≤t}, binarized when ``binarize``)
    and ``summative`` (how many tasks selected each unit, for AdaHAT). :class:`hatnorm.HAT` updates both
    at the end of every task.

    Args:
        num_features: number of gated units (channels or features).
        num_tasks: number of tasks, one embedding row each.
        s_max: the largest scale, used in evaluation [400].
        binarize: store and evaluate binarized masks [True].
        floor: the smallest gate value while training and in soft evaluation (see :func:`hat_gate`)
            [``GATE_FLOOR``, 1e-8]; 0 gives the plain sigmoid. An attribute: set it on a built model's
            gates to compare.
    """

    def __init__(self, num_features: int, *, num_tasks: int, s_max: float = 400.0, binarize: bool = True,
                 floor: float = GATE_FLOOR) -> None:
        super().__init__()
        self._num_features = check_positive_int(num_features, "num_features")
        self.num_tasks = check_num_tasks(num_tasks)
        self.s_max = check_positive(s_max, "s_max")
        if not isinstance(binarize, bool):
            raise TypeError(f"binarize must be a bool, got {binarize!r}")
        self.binarize = binarize
        self.floor = _check_floor(floor)
        # e_l^t ~ N(0, 1), one row per task: [T, N]
        self.embedding = nn.Parameter(torch.randn(num_tasks, num_features))
        self.register_buffer("cumulative", torch.zeros(num_features))
        self.register_buffer("summative", torch.zeros(num_features))

    @property
    def num_features(self) -> int:
        return self._num_features

    def forward(self, task: int, s: float | Tensor | None = None, *, trusted: bool = False) -> Tensor:
        """The gate of ``task``, shape ``[num_features]``.

        Args:
            task: the task id, in ``[0, num_tasks)``.
            s: the scale; required while training, ignored in evaluation.
            trusted: the caller has checked ``task`` (an int in range) and ``s`` (a model that validated them at
                the top), so they are not checked again (the :func:`hat_gate`/``_gate`` split, for modules).
        """
        if not trusted:
            task = check_task(task, self.num_tasks)
            s = check_training_scale(s, self.training)
        e = self.embedding[task]
        if not self.training:
            return (e > 0).to(e.dtype) if self.binarize else _gate(e, self.s_max, self.floor)
        return _gate(e, s, self.floor)

    def selection(self, task: int) -> Tensor:
        """The units ``task`` selects: 1[a^t > 0.5] = 1[e^t > 0], a bool tensor ``[num_features]``."""
        task = check_task(task, self.num_tasks)
        return self.embedding[task].detach() > 0

    def final_mask(self, task: int) -> Tensor:
        """The mask ``task`` leaves when it ends: a^t at s_max, or 1[e^t > 0] when binarized."""
        task = check_task(task, self.num_tasks)
        e = self.embedding[task].detach()
        return (e > 0).to(e.dtype) if self.binarize else hat_gate(e, self.s_max, self.floor)

    def state(self) -> MaskState:
        return MaskState(cumulative=self.cumulative, summative=self.summative)

    @torch.no_grad()
    def consolidate(self, task: int) -> None:
        """Fold ``task``'s final mask into the cumulative and summative masks (a^{≤t} = max(a^t, a^{≤t−1}))."""
        mask = self.final_mask(task)
        self.cumulative.copy_(torch.maximum(self.cumulative, mask.to(self.cumulative.dtype)))
        self.summative.add_(self.selection(task).to(self.summative.dtype))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_tasks={self.num_tasks}, s_max={self.s_max}, binarize={self.binarize}, "
                f"floor={self.floor:g}")

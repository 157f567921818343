"""Re-estimation of the running statistics of a model's norms from data (recalibration), and its input rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hatnorm._inputs import Inputs, call, device_of, finite_samples, map_inputs, split_batch
from hatnorm._norm_protocol import MaskedNorm
from hatnorm.distributed import shard


def finite(x: Inputs) -> bool:
    """Whether every input value is finite (integer inputs, such as token ids, always are); ``x`` one tensor or
    tensors by name."""
    return bool(finite_samples(x).all())


def skip_hint(what: str) -> str:
    return f"the inputs hold NaN or inf; clean the data, or pass {what}(nonfinite='skip') to skip such batches"


@torch.no_grad()
def recalibrate_norms(model: nn.Module, parts: Sequence[tuple[int, Dataset]], batch_size: int = 64, *,
                      nonfinite: Literal["raise", "skip"] = "raise") -> None:
    """Re-estimate the running statistics of every batch-statistics norm from ``(task, data)`` parts.

    The model runs in evaluation mode (binarized gates, no dropout) with only its norms training. Each
    norm's statistics end as the mean of the batch statistics they saw: per task for norms with
    per-task statistics, over all parts for shared ones. Each norm moves only what its training
    forward moves (masked BN: the task's selected units). Under ``torchrun`` each rank passes its
    share of every batch, and norms converted by :func:`hatnorm.convert_sync` combine the shares.

    Args:
        model: the network; its forward takes ``task=``.
        parts: ``(task, data)`` pairs, ``data`` a dataset of ``(x, y)`` pairs or of dicts of named tensors (the
            model's inputs by name, and ``labels``).
        batch_size: the batch size of the passes (a part larger than one batch drops its last, smaller batch).
        nonfinite: what a batch whose inputs hold NaN or inf does: ``"raise"`` a ValueError, or ``"skip"``:
            it is left out.

    Raises:
        ValueError: a batch's inputs hold NaN or inf and ``nonfinite`` is ``"raise"``.
    """
    norms = [m for m in model.modules() if isinstance(m, MaskedNorm) and m.running_statistics()]
    if not norms:
        return
    model.eval()
    momenta = [m.momentum for m in norms]
    seen: dict[tuple[int, int | None], int] = {}
    try:
        for m in norms:
            m.train()
        for task, data in parts:
            for b, batch in enumerate(DataLoader(data, batch_size=batch_size, drop_last=len(data) > batch_size)):
                x, _ = split_batch(batch, device_of(model))
                if not finite(x):
                    if nonfinite == "skip":
                        continue
                    raise ValueError(f"task {task}, recalibration batch {b + 1}: {skip_hint('recalibrate_norms')}")
                for i, m in enumerate(norms):
                    key = (i, m.statistics_slot(task))
                    seen[key] = seen.get(key, 0) + 1
                    m.momentum = 1.0 / seen[key]
                call(model, map_inputs(shard, x), task=task)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()

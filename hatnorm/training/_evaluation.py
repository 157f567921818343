"""Evaluation of a task and precise statistics for validation (recalibration itself is hatnorm._recalibration)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hatnorm._norms import MaskedNorm
from hatnorm._recalibration import finite, recalibrate_norms, skip_hint


def diverged(where: str, what: str, value: float) -> FloatingPointError:
    return FloatingPointError(f"{where}: the {what} is {value} with finite inputs: training diverged; lower the "
                              "learning rate or check the model")


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, task: int, batch_size: int = 256, *,
             nonfinite: Literal["raise", "skip"] = "raise", where: str | None = None) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` on ``data`` for ``task``, in evaluation mode.

    Args:
        model: the network; its forward takes ``task=``.
        data: ``(x, y)`` pairs.
        task: the task id.
        batch_size: evaluation batch size.
        nonfinite: what a batch whose inputs hold NaN or inf does: ``"raise"`` a ValueError, or
            ``"skip"``: its samples with NaN or inf inputs are left out.
        where: names the split in messages [``"task <task>"``].

    Raises:
        ValueError: a batch's inputs hold NaN or inf (``nonfinite="raise"``), or every batch was left out.
        FloatingPointError: the loss is NaN or inf on finite inputs: the model diverged. No accuracy is
            reported next to a non-finite loss.
    """
    where = where or f"task {task}"
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    loader = DataLoader(data, batch_size=batch_size)
    for b, (x, y) in enumerate(loader):
        if not finite(x):
            if nonfinite == "raise":
                raise ValueError(f"{where}, batch {b + 1} of {len(loader)}: {skip_hint('TrainConfig')}")
            keep = torch.isfinite(x).flatten(1).all(1)  # evaluation leaves out samples, not whole batches
            x, y = x[keep], y[keep]
            if not len(y):
                continue
        out = model(x, task=task)
        total_loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += len(y)
    if count == 0:
        raise ValueError(f"{where}: every sample holds NaN or inf inputs; nothing left to evaluate")
    if not math.isfinite(total_loss):
        raise diverged(where, "loss", total_loss / count)
    return total_loss / count, correct / count


@contextmanager
def precise_statistics(model: nn.Module, parts: Sequence[tuple[int, Dataset]], batch_size: int, *,
                       nonfinite: Literal["raise", "skip"]) -> Iterator[None]:
    """Inside the block the norms hold statistics re-estimated for the current weights (precise BN).

    :func:`recalibrate_norms` runs on ``parts`` on entry; on exit every norm's statistics are put back
    bit for bit, so the block leaves no trace on training. A model without batch-statistics norms
    runs the block as it is.
    """
    buffers = [b for m in model.modules() if isinstance(m, MaskedNorm) for b in m.running_statistics()]
    saved = [b.clone() for b in buffers]
    try:
        recalibrate_norms(model, parts, batch_size, nonfinite=nonfinite)
        yield
    finally:
        with torch.no_grad():
            for b, value in zip(buffers, saved, strict=True):
                b.copy_(value)

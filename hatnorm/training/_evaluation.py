"""Evaluation of a task and precise statistics for validation (recalibration itself is hatnorm._recalibration)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from hatnorm._inputs import call, device_of, finite_samples, map_inputs, split_batch
from hatnorm._norm_protocol import MaskedNorm
from hatnorm._recalibration import finite, recalibrate_norms, skip_hint
from hatnorm.data import IGNORE_INDEX


def diverged(where: str, what: str, value: float) -> FloatingPointError:
    return FloatingPointError(f"{where}: the {what} is {value} with finite inputs: training diverged; lower the "
                              "learning rate or check the model")


def logits_of(output: object, model: nn.Module) -> Tensor:
    """The logits a forward returned: the tensor, or the ``logits`` of a mapping (transformers' ``ModelOutput``).

    A model that returns anything else (auxiliary classifiers' logits beside the main ones) is refused.
    """
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if not isinstance(output, Tensor):
        raise TypeError(f"model must return a logits tensor (or a mapping with one under 'logits'), got "
                        f"{type(output).__name__} from {type(model).__name__} (a model with auxiliary classifiers): "
                        "train it with a loop of your own that combines their losses, or build it without them "
                        "(e.g. aux_logits=False)")
    return output


def _next_tokens(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token logits ``[N, L − 1, V]`` and their targets ``[N, L − 1]``: position i's logits predict token i + 1."""
    if logits.dim() != 3 or logits.shape[:2] != target.shape:
        raise ValueError(f"labels of shape {list(target.shape)} are next-token targets [N, L]: the model must return "
                         f"logits [N, L, vocabulary], got {list(logits.shape)}")
    return logits[:, :-1], target[:, 1:]


def cross_entropy(logits: Tensor, target: Tensor, reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """The cross-entropy of a batch: the mean or the sum of its samples' losses.

    ``target`` ``[N]`` holds class labels for ``logits`` ``[N, C]``; ``target`` ``[N, L]`` holds next-token targets
    for ``logits`` ``[N, L, V]`` (``target[:, i]`` predicted at position ``i − 1``, :data:`~hatnorm.data.IGNORE_INDEX`
    where no loss is taken), and a sample's loss is the mean over its target tokens.
    """
    if target.dim() == 1:
        return F.cross_entropy(logits, target, reduction=reduction)
    logits, target = _next_tokens(logits, target)
    tokens = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
    per_sample = tokens.sum(1) / (target != IGNORE_INDEX).sum(1).clamp(min=1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def correct(logits: Tensor, target: Tensor) -> Tensor:
    """``[N]`` bools: whether each sample is answered right (top-1 class, or every target token the argmax).

    For next-token targets the argmax is taken at every target position given the true tokens before it, so
    a causal model answers a sample right exactly when its greedy decoding from the prompt gives the whole
    answer (exact match): both agree up to the first wrong token, and greedy decoding has one there too.
    """
    if target.dim() == 1:
        return logits.argmax(1) == target
    logits, target = _next_tokens(logits, target)
    return ((logits.argmax(-1) == target) | (target == IGNORE_INDEX)).all(1)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, task: int, batch_size: int = 256, *,
             nonfinite: Literal["raise", "skip"] = "raise", where: str | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` for ``task``, in evaluation mode.

    The accuracy is top-1 for class labels, and the exact match of the greedy answer for next-token targets
    (:func:`correct`); the loss of a sample with next-token targets is the mean over its target tokens.

    Args:
        model: the network; its forward takes ``task=``.
        data: ``(x, y)`` pairs, or dicts of named tensors: the model's inputs by name, and ``labels`` (see
            :class:`hatnorm.data.NamedTensorDataset`).
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
    total_loss, right, count = 0.0, 0, 0
    loader = DataLoader(data, batch_size=batch_size)
    device = device_of(model)
    for b, batch in enumerate(loader):
        x, y = split_batch(batch, device)
        if not finite(x):
            if nonfinite == "raise":
                raise ValueError(f"{where}, batch {b + 1} of {len(loader)}: {skip_hint('TrainConfig')}")
            keep = finite_samples(x)  # evaluation leaves out samples, not whole batches
            x, y = map_inputs(lambda v, keep=keep: v[keep], x), y[keep]
            if not len(y):
                continue
        out = logits_of(call(model, x, task=task), model)
        total_loss += cross_entropy(out, y, "sum").item()
        right += correct(out, y).sum().item()
        count += len(y)
    if count == 0:
        raise ValueError(f"{where}: every sample holds NaN or inf inputs; nothing left to evaluate")
    if not math.isfinite(total_loss):
        raise diverged(where, "loss", total_loss / count)
    return total_loss / count, right / count


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

"""A batch as the trainer and recalibration read it: the model's inputs and the targets.

A batch is ``(x, y)``, one input tensor passed positionally (``model(x, task=t)``), or a dict of named tensors
(a :class:`hatnorm.data.NamedTensorDataset`'s batch) whose ``labels`` are the targets and whose other entries
are passed by name, as transformers models take them (``model(input_ids=..., attention_mask=..., task=t)``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

#: a model's inputs: one tensor, or tensors by name
Inputs = Tensor | dict[str, Tensor]


def split_batch(batch: object, device: torch.device | None = None) -> tuple[Inputs, Tensor]:
    """The inputs and the targets of a batch: ``(x, y)``, or a dict's entries but ``labels``, and its ``labels``;
    on ``device`` when given (the model's, :func:`device_of`)."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError(f"a batch of named tensors must hold 'labels' (the targets) beside the model's inputs, "
                             f"got the names {list(batch)}")
        x, y = {name: value for name, value in batch.items() if name != "labels"}, batch["labels"]
    else:
        x, y = batch  # type: ignore[misc]
    if device is None:
        return x, y
    return map_inputs(lambda t: t.to(device, non_blocking=True), x), y.to(device, non_blocking=True)


def device_of(model: nn.Module) -> torch.device:
    """Where ``model`` computes: the device of its first parameter (or buffer), the CPU for a model with neither."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def call(model: nn.Module, inputs: Inputs, **options: Any) -> Any:
    """``model(x, **options)``, or ``model(**inputs, **options)`` for named inputs."""
    return model(**inputs, **options) if isinstance(inputs, dict) else model(inputs, **options)


def map_inputs(function: Callable[[Tensor], Tensor], inputs: Inputs) -> Inputs:
    """``function`` applied to the input tensor, or to every named one."""
    if isinstance(inputs, dict):
        return {name: function(value) for name, value in inputs.items()}
    return function(inputs)


def finite_samples(inputs: Inputs) -> Tensor:
    """``[N]`` bools: whether every input value of a sample is finite (integer inputs, such as token ids, are)."""
    tensors = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
    keep = torch.ones(len(tensors[0]), dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        if t.is_floating_point() or t.is_complex():
            keep &= torch.isfinite(t).reshape(len(t), -1).all(1)
    return keep

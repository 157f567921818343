"""What every trainer integration is measured against: hatnorm's own hand loop (the README's) on the same seed,
data and order; and the integrations stay out of ``import hatnorm``."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import hatnorm

FRAMEWORKS = ("lightning", "transformers", "avalanche")
IN_FEATURES = 8


def tiny_tasks(n: int = 2, samples: int = 24) -> list[TensorDataset]:
    """``n`` two-class tasks of ``samples`` points, task ``k`` labelled by the sign of feature ``k``."""
    generator = torch.Generator().manual_seed(0)
    tasks = []
    for k in range(n):
        x = torch.randn(samples, IN_FEATURES, generator=generator)
        tasks.append(TensorDataset(x, (x[:, k] > 0).long()))
    return tasks


def tiny_model(seed: int = 0) -> nn.Module:
    """A gated MLP with masked BatchNorm (its statistics need the end-of-task recalibration), two tasks."""
    torch.manual_seed(seed)
    return hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=2, in_features=IN_FEATURES,
                         hidden=(16, 16))


def probe(shape: tuple[int, ...] = (IN_FEATURES,)) -> Tensor:
    """Six fixed inputs of one sample's ``shape``."""
    return torch.randn(6, *shape, generator=torch.Generator().manual_seed(1))


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def hand_loop(model: nn.Module, tasks: list[TensorDataset], *, epochs: int = 2, batch_size: int = 8,
              accumulate: int = 1, clip: float | None = None, clip_first: bool = False,
              make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] = sgd,
              keep_optimizer: bool = False) -> list[Tensor]:
    """The README's loop, one new optimizer per task (as one fit per task makes one; one for all tasks with
    ``keep_optimizer``, its state carried over), batches in order.

    ``accumulate`` batches make one optimizer step (each loss divided by ``accumulate``; all share the step's
    scale); ``clip`` clips the gradient norm after protection (Serrà et al.'s order), or before it with
    ``clip_first``. Returns task 0's outputs on :func:`probe` after every task.
    """
    hat = hatnorm.HAT(model)
    outputs = []
    optimizer = make_optimizer(model)
    for task, data in enumerate(tasks):
        if task and not keep_optimizer:
            optimizer = make_optimizer(model)
        hat.begin_task(task)
        loader = DataLoader(data, batch_size=batch_size)
        steps = math.ceil(len(loader) / accumulate)
        model.train()
        for _ in range(epochs):
            for b, (x, y) in enumerate(loader):
                s = hat.scale(b // accumulate, steps)
                loss = hat.loss(F.cross_entropy(model(x, task=task, s=s), y), s)
                (loss / accumulate if accumulate > 1 else loss).backward()
                if (b + 1) % accumulate and b + 1 < len(loader):
                    continue
                if clip is not None and clip_first:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                hat.protect(s)
                if clip is not None and not clip_first:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                hat.step(optimizer)
                optimizer.zero_grad()
        hat.end_task()
        hatnorm.recalibrate_norms(model, [(task, data)])
        outputs.append(task_zero(model, data.tensors[0].shape[1:]))
    return outputs


def task_zero(model: nn.Module, shape: tuple[int, ...] = (IN_FEATURES,)) -> Tensor:
    """The model's task-0 outputs on :func:`probe` in evaluation mode."""
    model.eval()
    with torch.no_grad():
        return model(probe(shape), task=0)


def assert_same_weights(model: nn.Module, reference: nn.Module) -> None:
    """Every parameter and buffer bit-identical."""
    state = reference.state_dict()
    assert model.state_dict().keys() == state.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


def assert_kept_task_zero(outputs: list[Tensor]) -> None:
    """Task 0's outputs after task 1 bit-identical to those after task 0."""
    assert torch.equal(outputs[0], outputs[1])


def test_the_hand_loop_keeps_task_zero_and_its_orders_differ_only_when_the_clip_acts() -> None:
    tasks = tiny_tasks()
    model = tiny_model()
    assert_kept_task_zero(hand_loop(model, tasks))
    # a clip too wide to act: the order of clip and protection makes no difference at all
    wide, wide_first = tiny_model(), tiny_model()
    hand_loop(wide, tasks, clip=1e6)
    hand_loop(wide_first, tasks, clip=1e6, clip_first=True)
    assert_same_weights(wide, wide_first)
    assert_same_weights(wide, model)
    # a clip that acts: the norm measured before protection counts gradients protection zeroes
    tight, tight_first = tiny_model(), tiny_model()
    assert_kept_task_zero(hand_loop(tight, tasks, clip=0.05))
    assert_kept_task_zero(hand_loop(tight_first, tasks, clip=0.05, clip_first=True))
    head = "task_heads.heads.1.weight"
    assert not torch.equal(tight.state_dict()[head], tight_first.state_dict()[head])


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_import_hatnorm_loads_no_trainer_framework(framework: str) -> None:
    code = (f"import sys, hatnorm, hatnorm.integrations; assert {framework!r} not in sys.modules; "
            f"import hatnorm.integrations.{framework}; assert {framework!r} in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)

"""One task's training (several tasks' for joint training): the epoch loop, its schedule and its state."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torch.utils.data import DataLoader, Dataset, Subset

from hatnorm._inputs import Inputs, call, device_of, map_inputs, split_batch
from hatnorm.distributed import average_gradients, convert_sync, shard, share_weight, world_size
from hatnorm.training._config import TrainConfig
from hatnorm.training._display import Display
from hatnorm.training._evaluation import (
    cross_entropy,
    diverged,
    evaluate,
    finite,
    logits_of,
    precise_statistics,
    skip_hint,
)
from hatnorm.training._methods import Method

#: the fewest samples a rank trains on in one step: batch statistics need two
PER_RANK = 2


def validation_size(samples: int, fraction: float) -> int:
    """How many of a task's ``samples`` :func:`split_validation` holds out (at least one)."""
    return max(1, round(samples * fraction))


def split_validation(data: Dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """A seeded random split of ``data`` into training and validation parts."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = validation_size(len(data), fraction)
    return Subset(data, order[n_val:]), Subset(data, order[:n_val])


def check_trainable(tasks: Sequence[tuple[str, int]], config: TrainConfig) -> None:
    """Refuse, before any training, a task or batch too small to give every rank two samples a step.

    Args:
        tasks: every task's name and sample count (before the validation split).
        config: the training settings.

    Raises:
        ValueError: under ``torchrun``, a batch size below 2 per rank; a task whose training split (what
            the validation split leaves) holds fewer than 2 samples per rank, so that it would train on
            nothing (names the task and the split).
    """
    world = world_size()
    need = PER_RANK * world
    if config.batch_size < need:
        raise ValueError(f"batch_size must be ≥ {PER_RANK} per rank ({need} for {world} ranks under torchrun: batch "
                         f"statistics), got {config.batch_size}")
    for t, (name, samples) in enumerate(tasks):
        held = validation_size(samples, config.validation_fraction)
        left = samples - held
        if left < need:
            ranks = "" if world == 1 else f" ({PER_RANK} per rank, {world} ranks)"
            raise ValueError(f"task {t} ({name}): its training split holds {left} sample{'s' * (left != 1)} "
                             f"({held} of {samples} {'is' if held == 1 else 'are'} held out for validation; "
                             f"validation_fraction={config.validation_fraction}); training needs at least {need}"
                             f"{ranks}: give the task more samples")


def _batches(data: Dataset, batch_size: int, seed: int) -> DataLoader:
    # drop a last batch that cannot give every rank two samples (batch statistics need two): in one process a
    # last batch of one, under torchrun with W ranks any last batch of fewer than 2W
    drop_last = 0 < len(data) % batch_size < PER_RANK * world_size()
    return DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed))


def make_optimizer(model: nn.Module, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The configured optimizer over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


def cosine_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> LRScheduler:
    """Linear warmup over ``config.warmup_epochs`` epochs, then a cosine decay to 0 at the last step."""
    warmup, total = config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch
    decay = CosineAnnealingLR(optimizer, T_max=total - warmup)
    if not warmup:
        return decay
    ramp = LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, decay], milestones=[warmup])


@dataclass
class FitState:
    """Where the schedule of one :func:`fit_task` stands after an epoch: what a checkpoint keeps mid-task."""

    epoch: int  # epochs finished
    lr: float
    patience: int
    best_loss: float
    best_state: dict[str, Tensor]
    optimizer: dict[str, Any]
    skipped: int
    scheduler: dict[str, Any] | None = None  # the cosine schedule's state
    curve: list[float] = field(default_factory=list)  # validation accuracy after every epoch so far

    def state_dict(self) -> dict[str, Any]:
        # JSON keys are strings: the optimizer's per-parameter state goes as [index, state] pairs
        optimizer = {"state": [[i, v] for i, v in self.optimizer["state"].items()],
                     "param_groups": self.optimizer["param_groups"]}
        return vars(self) | {"optimizer": optimizer}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FitState:
        optimizer = {"state": dict(state["optimizer"]["state"]), "param_groups": state["optimizer"]["param_groups"]}
        return cls(**state | {"optimizer": optimizer})


def _batch_loss(model: nn.Module, x: Inputs, y: Tensor, task: int, s: float, where: str, classes: int) -> Tensor:
    """This rank's part of the batch's mean loss: its share's mean loss weighted by :func:`share_weight`.

    A head with fewer outputs than the task has classes is refused, naming the task.
    """
    logits = logits_of(call(model, map_inputs(shard, x), task=task, s=s), model)
    outputs = logits.shape[-1 if y.dim() == 2 else 1] if logits.dim() > 1 else None
    if outputs is not None and outputs < classes:
        raise ValueError(f"{where}: the model's head gives {outputs} outputs, but the task has {classes} "
                         f"classes (labels up to {classes - 1}): build the model with num_classes ≥ {classes} for "
                         "this task (a list gives every task its own)")
    return cross_entropy(logits, shard(y)) * share_weight(len(y))


def fit_task(model: nn.Module, method: Method, task_ids: Sequence[int], train: Sequence[Dataset],
        valid: Sequence[Dataset], config: TrainConfig, display: Display, name: str, seed: int, *,
        classes: Sequence[int], resume: FitState | None = None,
        epoch_end: Callable[[FitState], None] | None = None) -> tuple[int, int, list[float]]:
    """Train on one or more tasks (several for joint training) with the configured schedule.

    Each step takes one batch of every task in ``task_ids`` and averages their losses. Validation after every
    epoch sees statistics re-estimated for the current weights (``config.recalibrate``), and so do the
    best weights it keeps and restores. ``resume`` continues from a state ``epoch_end`` was given after an
    epoch. ``classes`` gives each task's class count (its head must have at least as many outputs).
    Returns the epochs run, the batches skipped and the validation accuracy after every epoch.

    Under ``torchrun`` every rank loads the same batches and trains on its share of each, with
    synchronised norms and gradients averaged over the ranks, so all ranks stay equal. Each rank's mean
    loss is weighted by its share of the batch, so unequal shares (a last batch of 5 over 2 ranks: 3 and
    2) step as one process does on the whole batch. The one difference: a last batch of fewer than 2
    samples per rank is left out on every rank (one process leaves out only a last batch of 1).
    """
    convert_sync(model)
    parts = list(zip(task_ids, train, strict=True))
    if resume is None:
        lr, patience, best_loss, first, skipped, curve = config.lr, config.patience, math.inf, 0, 0, []
        # as in Serrà et al.'s code: the first epoch always improves on the untrained model
        best_state = copy.deepcopy(model.state_dict())
    else:
        lr, patience, best_loss, first, skipped, curve = (resume.lr, resume.patience, resume.best_loss,
                                                          resume.epoch, resume.skipped, list(resume.curve))
        best_state = resume.best_state
    steps_per_epoch = min(len(_batches(d, config.batch_size, 0)) for d in train)
    optimizer = make_optimizer(model, config, lr)
    scheduler = cosine_schedule(optimizer, config, steps_per_epoch) if config.schedule == "cosine" else None
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(resume.scheduler)

    def validated(epoch: int) -> tuple[float, float]:
        results = [evaluate(model, v, t, nonfinite=config.nonfinite,
                            where=f"task {t} ({name}), epoch {epoch + 1}, validation")
                   for t, v in zip(task_ids, valid, strict=True)]
        return sum(r[0] for r in results) / len(results), sum(r[1] for r in results) / len(results)

    device = device_of(model)
    display.start_task(name, config.epochs, completed=first)
    epoch = first - 1
    for epoch in range(first, config.epochs):
        model.train()
        loaders = [_batches(d, config.batch_size, seed * 1000 + epoch) for d in train]
        running, trained, skipped_now = 0.0, 0, 0
        for b, raw in enumerate(zip(*loaders, strict=False)):
            batches = [split_batch(batch, device) for batch in raw]
            s = method.scale(b, steps_per_epoch)
            bad = [t for t, (x, _) in zip(task_ids, batches, strict=True) if not finite(x)]
            if bad:
                if config.nonfinite == "raise":
                    raise ValueError(f"task {bad[0]} ({name}), epoch {epoch + 1}, batch {b + 1} of {steps_per_epoch}: "
                                     f"{skip_hint('TrainConfig')}")
                skipped_now += 1
                continue
            # the mean of the task losses: joint training on T tasks steps at the scale of one task's loss
            task_loss = sum(_batch_loss(model, x, y, t, s, f"task {t} ({name})", k)
                            for t, k, (x, y) in zip(task_ids, classes, batches, strict=True)) / len(task_ids)
            # checked before any gradient or step: the model is left as the last finite step made it
            if not math.isfinite(value := task_loss.item()):
                raise diverged(f"task {task_ids[-1]} ({name}), epoch {epoch + 1}, batch {b + 1} of {steps_per_epoch}",
                               "training loss", value)
            loss = method.loss(task_loss, s)
            optimizer.zero_grad()
            loss.backward()
            average_gradients(model)
            method.after_backward(s)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            method.step(optimizer)
            if scheduler is not None:
                scheduler.step()
            running += loss.item()
            trained += 1
        skipped += skipped_now
        statistics = (precise_statistics(model, parts, config.batch_size, nonfinite=config.nonfinite)
                      if config.recalibrate else nullcontext())
        with statistics:  # the weights kept are kept with the statistics they were validated with
            val_loss, val_acc = validated(epoch)
            curve.append(val_acc)
            improved = val_loss < best_loss
            if improved:
                best_loss, best_state = val_loss, copy.deepcopy(model.state_dict())
        display.epoch(name, epoch, running / max(trained, 1), val_acc, optimizer.param_groups[0]["lr"], s, skipped_now)
        if config.schedule == "plateau":
            if improved:
                patience = config.patience
            else:
                patience -= 1
                if patience <= 0:
                    lr /= config.lr_factor
                    if lr < config.lr_min:
                        break
                    patience = config.patience
                    model.load_state_dict(best_state)
                    optimizer = make_optimizer(model, config, lr)
        if epoch_end is not None:
            epoch_end(FitState(epoch + 1, lr, patience, best_loss, best_state, optimizer.state_dict(), skipped,
                               None if scheduler is None else scheduler.state_dict(), list(curve)))
    model.load_state_dict(best_state)
    display.finish_task(config.epochs)
    return epoch + 1, skipped, curve

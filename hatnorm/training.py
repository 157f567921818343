"""Continual training of a task sequence with any registered architecture, norm and method.

The reference schedule (Serrà et al.): SGD with lr 0.05 and batch 64, gradient-norm clipping at 10000,
the learning rate divided by 3 after 5 epochs without validation improvement (the optimizer
re-created and the best weights restored), stop when the learning rate drops below 1e-4, keep the
best-validation weights, at most 200 epochs. Methods: HAT (per-batch scale annealing, the capacity
regulariser, gradient protection), SGD fine-tuning, EWC, and joint multitask training.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from hatnorm._checks import check_non_negative, check_positive, check_positive_int
from hatnorm._gate import HATGate
from hatnorm._hat import HAT
from hatnorm._norms import _BatchNormBase
from hatnorm._policies import GradientPolicy
from hatnorm.data import Task


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the defaults are the reference schedule.

    Attributes:
        epochs: most epochs per task.
        lr: initial learning rate.
        lr_min: training of a task stops when the learning rate falls below it.
        lr_factor: the learning rate is divided by it on a plateau.
        patience: epochs without validation improvement before the learning rate drops.
        batch_size: training batch size (≥ 2: batch statistics).
        clip: gradient-norm clipping threshold.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        validation_fraction: share of every task's training set held out for validation.
        seed: seeds the model, the validation split and the batch order.
        recalibrate: after each task, re-estimate that task's normalization statistics with one pass
            over its training data in inference mode (gates binarized, dropout off), as the exact
            mean of the batch statistics. Short runs need it: a running average with momentum lags
            weights that move fast, and dropout before a norm shifts the variance it sees.
    """

    epochs: int = 200
    lr: float = 0.05
    lr_min: float = 1e-4
    lr_factor: float = 3.0
    patience: int = 5
    batch_size: int = 64
    clip: float = 10000.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    validation_fraction: float = 0.1
    seed: int = 0
    recalibrate: bool = True

    def __post_init__(self) -> None:
        check_positive_int(self.epochs, "epochs")
        check_positive(self.lr, "lr")
        check_positive(self.lr_min, "lr_min")
        check_positive_int(self.patience, "patience")
        check_positive(self.clip, "clip")
        check_non_negative(self.momentum, "momentum")
        check_non_negative(self.weight_decay, "weight_decay")
        if check_positive(self.lr_factor, "lr_factor") <= 1:
            raise ValueError(f"lr_factor must be > 1, got {self.lr_factor!r}")
        if check_positive_int(self.batch_size, "batch_size") < 2:
            raise ValueError(f"batch_size must be ≥ 2 (batch statistics), got {self.batch_size}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")


class Method(ABC):
    """How a model learns one task of a sequence; the trainer drives it from its loop."""

    name: str

    def setup(self, model: nn.Module) -> None:  # noqa: B027 - most methods need no set-up
        """Called once with a fresh model before the first task."""

    @abstractmethod
    def begin_task(self, task: int) -> None:
        """Called before training ``task``."""

    @abstractmethod
    def scale(self, batch: int, num_batches: int) -> float:
        """The gate scale for a training batch."""

    def loss(self, task_loss: Tensor, s: float) -> Tensor:
        """The training loss from the task loss (a method may add a penalty)."""
        return task_loss

    def after_backward(self, s: float) -> None:  # noqa: B027 - plain methods leave gradients as they are
        """Called after ``backward`` and before clipping."""

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step."""
        optimizer.step()

    @abstractmethod
    def end_task(self, task: int, data: Dataset) -> None:
        """Called after training ``task`` on ``data``, with the best weights restored."""


class HATMethod(Method):
    """HAT: annealed scale, capacity regulariser, protection and optimizer-safe steps.

    Args:
        c: capacity-regulariser weight.
        policy: gradient policy name or instance.
    """

    name = "hat"

    def __init__(self, c: float = 0.75, policy: str | GradientPolicy = "hat") -> None:
        self.c, self.policy = c, policy

    def setup(self, model: nn.Module) -> None:
        self.hat = HAT(model, c=self.c, policy=self.policy)

    def begin_task(self, task: int) -> None:
        self.hat.begin_task(task)

    def scale(self, batch: int, num_batches: int) -> float:
        return self.hat.scale(batch, num_batches)

    def loss(self, task_loss: Tensor, s: float) -> Tensor:
        return self.hat.loss(task_loss, s)

    def after_backward(self, s: float) -> None:
        self.hat.protect(s)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.hat.step(optimizer)

    def end_task(self, task: int, data: Dataset) -> None:
        self.hat.end_task()


def _open_and_freeze_gates(model: nn.Module) -> float:
    """Open every gate (a = 1) and freeze it: the model becomes its plain, ungated twin."""
    gates = [m for m in model.modules() if isinstance(m, HATGate)]
    for gate in gates:
        gate.embedding.data.fill_(6.0)
        gate.embedding.requires_grad_(False)
    return max((g.s_max for g in gates), default=1.0)


class FineTune(Method):
    """SGD fine-tuning: the same architecture with every gate open and no protection."""

    name = "sgd"

    def setup(self, model: nn.Module) -> None:
        self.s_max = _open_and_freeze_gates(model)

    def begin_task(self, task: int) -> None:
        pass

    def scale(self, batch: int, num_batches: int) -> float:
        return self.s_max

    def end_task(self, task: int, data: Dataset) -> None:
        pass


class EWC(FineTune):
    """Elastic weight consolidation (Kirkpatrick et al. 2017) on the ungated model.

    The penalty λ/2 · Σ_k F_k (θ − θ*_k)² sums one diagonal Fisher per learned task, estimated from
    the squared gradients of the log-likelihood of the task's training data.

    Args:
        lam: the penalty weight λ.
        fisher_batches: how many training batches estimate each Fisher.
    """

    name = "ewc"

    def __init__(self, lam: float = 100.0, fisher_batches: int = 32) -> None:
        self.lam = check_non_negative(lam, "lam")
        self.fisher_batches = check_positive_int(fisher_batches, "fisher_batches")

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        self.model = model
        self.anchors: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []

    def loss(self, task_loss: Tensor, s: float) -> Tensor:
        if not self.anchors:
            return task_loss
        params = dict(self.model.named_parameters())
        penalty = sum((fisher[n] * (params[n] - anchor[n]).square()).sum()
                      for fisher, anchor in self.anchors for n in fisher)
        return task_loss + self.lam / 2 * penalty

    def end_task(self, task: int, data: Dataset) -> None:
        model = self.model
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in named.items()}
        model.eval()
        loader = DataLoader(data, batch_size=32, shuffle=False)
        seen = 0
        for i, (x, y) in enumerate(loader):
            if i == self.fisher_batches:
                break
            model.zero_grad()
            F.cross_entropy(model(x, task=task), y, reduction="sum").backward()
            for n, p in named.items():
                if p.grad is not None:
                    fisher[n] += p.grad.square()
            seen += len(y)
        model.zero_grad()
        self.anchors.append(({n: f / max(seen, 1) for n, f in fisher.items()},
                             {n: p.detach().clone() for n, p in named.items()}))


METHODS: dict[str, Callable[..., Method]] = {"hat": HATMethod, "sgd": FineTune, "ewc": EWC}


@dataclass
class SequenceResult:
    """What a run over a task sequence produced.

    Attributes:
        accuracy: ``accuracy[t][τ]``: test accuracy on task τ after training task t (all τ).
        loss: the matching test losses.
        epochs: epochs trained per task.
        seconds: wall time per task.
        tasks: task names.
    """

    accuracy: list[list[float]] = field(default_factory=list)
    loss: list[list[float]] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, task: int, batch_size: int = 256) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` on ``data`` for ``task``, in evaluation mode."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for x, y in DataLoader(data, batch_size=batch_size):
        out = model(x, task=task)
        total_loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += len(y)
    return total_loss / count, correct / count


@torch.no_grad()
def recalibrate_norms(model: nn.Module, parts: Sequence[tuple[int, Dataset]], batch_size: int = 64) -> None:
    """Re-estimate the running statistics of every batch-statistics norm from ``(task, data)`` parts.

    The model runs in evaluation mode (binarized gates, no dropout) with only its norms training. Each
    norm's statistics end as the mean of the batch statistics they saw: per task for norms with
    per-task statistics, over all parts for shared ones. Each norm moves only what its training
    forward moves (masked BN: the task's selected units).
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNormBase)]
    if not norms:
        return
    model.eval()
    momenta = [m.momentum for m in norms]
    seen: dict[tuple[int, int | None], int] = {}
    try:
        for m in norms:
            m.train()
        for task, data in parts:
            for x, _ in DataLoader(data, batch_size=batch_size, drop_last=len(data) > batch_size):
                for i, m in enumerate(norms):
                    key = (i, task if m.running_mean.dim() == 2 else None)
                    seen[key] = seen.get(key, 0) + 1
                    m.momentum = 1.0 / seen[key]
                model(x, task=task)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()


def split_validation(data: Dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """A seeded random split of ``data`` into training and validation parts."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(data) * fraction))
    return Subset(data, order[n_val:]), Subset(data, order[:n_val])


class _Display:
    """A rich progress bar on a terminal, plain log lines elsewhere (CI, files, pipes)."""

    def __init__(self, console: Console, title: str) -> None:
        self.console, self.title = console, title
        self.progress: Progress | None = None

    def __enter__(self) -> _Display:
        if self.console.is_terminal:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.console, transient=True)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def start_task(self, name: str, epochs: int) -> None:
        if self.progress is not None:
            self.bar = self.progress.add_task(f"{self.title} {name}", total=epochs)

    def epoch(self, name: str, epoch: int, loss: float, accuracy: float, lr: float, s: float) -> None:
        text = (f"{self.title} {name} epoch {epoch + 1}: train loss {loss:.4f}  val acc {accuracy:.4f}  "
                f"lr {lr:.2g}  s {s:.4g}")
        if self.progress is not None:
            self.progress.update(self.bar, advance=1, description=text)
        else:
            self.console.print(text, highlight=False, soft_wrap=True)

    def finish_task(self, epochs: int) -> None:
        if self.progress is not None:
            self.progress.update(self.bar, completed=epochs, total=epochs)


def _batches(data: Dataset, batch_size: int, seed: int) -> DataLoader:
    # drop a last batch of one: batch statistics need two samples
    drop_last = len(data) % batch_size == 1
    return DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed))


def _fit(model: nn.Module, method: Method, task_ids: Sequence[int], train: Sequence[Dataset],
         valid: Sequence[Dataset], config: TrainConfig, display: _Display, name: str, seed: int) -> int:
    """Train on one or more tasks (several for joint training) with the reference schedule; returns epochs run.

    Each step takes one batch of every task in ``task_ids`` and sums their losses.
    """
    lr, patience = config.lr, config.patience

    def new_optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                               momentum=config.momentum, weight_decay=config.weight_decay)

    def validation_loss() -> tuple[float, float]:
        results = [evaluate(model, v, t) for t, v in zip(task_ids, valid, strict=True)]
        return sum(r[0] for r in results) / len(results), sum(r[1] for r in results) / len(results)

    optimizer = new_optimizer()
    # as in Serrà et al.'s code: the first epoch always improves on the untrained model
    best_loss, best_state = math.inf, copy.deepcopy(model.state_dict())
    display.start_task(name, config.epochs)
    epoch = 0
    for epoch in range(config.epochs):
        model.train()
        loaders = [_batches(d, config.batch_size, seed * 1000 + epoch) for d in train]
        num_batches = min(len(loader) for loader in loaders)
        running = 0.0
        for b, batches in enumerate(zip(*loaders, strict=False)):
            s = method.scale(b, num_batches)
            task_loss = sum(F.cross_entropy(model(x, task=t, s=s), y) for t, (x, y) in
                            zip(task_ids, batches, strict=True))
            loss = method.loss(task_loss, s)
            optimizer.zero_grad()
            loss.backward()
            method.after_backward(s)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            method.step(optimizer)
            running += loss.item()
        val_loss, val_acc = validation_loss()
        display.epoch(name, epoch, running / max(num_batches, 1), val_acc, lr, s)
        if val_loss < best_loss:
            best_loss, patience = val_loss, config.patience
            best_state = copy.deepcopy(model.state_dict())
        else:
            patience -= 1
            if patience <= 0:
                lr /= config.lr_factor
                if lr < config.lr_min:
                    break
                patience = config.patience
                model.load_state_dict(best_state)
                optimizer = new_optimizer()
    model.load_state_dict(best_state)
    if config.recalibrate:
        recalibrate_norms(model, list(zip(task_ids, train, strict=True)), config.batch_size)
    display.finish_task(config.epochs)
    return epoch + 1


def _write(result: SequenceResult, out_dir: Path, info: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(info | asdict(result), indent=2))
    with (out_dir / "accuracy.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["after_task", *result.tasks])
        for t, row in enumerate(result.accuracy):
            writer.writerow([t, *(f"{a:.6f}" for a in row)])


def train_sequence(
    build_model: Callable[[], nn.Module],
    tasks: Sequence[Task],
    method: Method,
    config: TrainConfig = TrainConfig(),
    *,
    out_dir: str | Path | None = None,
    console: Console | None = None,
    title: str = "",
    info: dict[str, Any] | None = None,
) -> SequenceResult:
    """Train ``tasks`` in order with ``method`` and test every task after each one.

    Results are written as ``results.json`` and ``accuracy.csv`` to ``out_dir`` after every task.

    Args:
        build_model: makes the model (called once, after seeding); its forward is ``model(x, task=, s=)``.
        tasks: the task sequence.
        method: how each task is learned (:class:`HATMethod`, :class:`FineTune`, :class:`EWC`).
        config: the training settings.
        out_dir: where results go after every task; ``None`` writes nothing.
        console: where progress goes (a terminal gets a progress bar, anything else log lines).
        title: a prefix for progress lines.
        info: extra fields for ``results.json`` (architecture, norm, ...).
    """
    if not tasks:
        raise ValueError("tasks must hold at least one task, got none")
    console = console or Console()
    torch.manual_seed(config.seed)
    model = build_model()
    method.setup(model)
    splits = [split_validation(task.train, config.validation_fraction, config.seed + t) for t, task in enumerate(tasks)]
    result = SequenceResult(tasks=[t.name for t in tasks])
    meta = (info or {}) | {"method": method.name, "config": asdict(config)}
    with _Display(console, title) as display:
        for t, task in enumerate(tasks):
            start = time.perf_counter()
            method.begin_task(t)
            train, valid = splits[t]
            result.epochs.append(_fit(model, method, [t], [train], [valid], config, display, task.name,
                                      config.seed + t))
            method.end_task(t, train)
            tested = [evaluate(model, other.test, tau) for tau, other in enumerate(tasks)]
            result.loss.append([loss for loss, _ in tested])
            result.accuracy.append([acc for _, acc in tested])
            result.seconds.append(time.perf_counter() - start)
            if out_dir is not None:
                _write(result, Path(out_dir), meta)
    return result


def train_joint(
    build_model: Callable[[], nn.Module],
    tasks: Sequence[Task],
    config: TrainConfig = TrainConfig(),
    *,
    console: Console | None = None,
    title: str = "joint",
) -> list[list[float]]:
    """A_J: for every t, a fresh ungated model trained jointly on tasks 0..t, tested on each of them.

    Returns ``joint[t][τ]`` for τ ≤ t (NaN above the diagonal).
    """
    console = console or Console()
    matrix = []
    with _Display(console, title) as display:
        for t in range(len(tasks)):
            torch.manual_seed(config.seed)
            model = build_model()
            method = FineTune()
            method.setup(model)
            splits = [split_validation(task.train, config.validation_fraction, config.seed + k)
                      for k, task in enumerate(tasks[: t + 1])]
            _fit(model, method, list(range(t + 1)), [s[0] for s in splits], [s[1] for s in splits], config,
                 display, f"tasks 0..{t}", config.seed + 100 + t)
            matrix.append([evaluate(model, tasks[tau].test, tau)[1] if tau <= t else math.nan
                           for tau in range(len(tasks))])
    return matrix

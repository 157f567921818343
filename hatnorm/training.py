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
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

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
from hatnorm.checkpoint import (
    Checkpoint,
    describe_model,
    load_checkpoint,
    lock_folder,
    remove_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from hatnorm.data import Task, fingerprint
from hatnorm.distributed import average_gradients, convert_sync, is_main_process, shard


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
        nonfinite: what a batch whose inputs hold NaN or inf does, in training, validation, test and
            recalibration alike: ``"raise"`` a ValueError naming the task, epoch and batch, or ``"skip"``
            it (a training batch takes no forward and no step, and is counted in
            :attr:`SequenceResult.skipped` and the log lines; validation and test leave out the samples
            with NaN or inf inputs). A NaN or inf loss on finite inputs (a
            diverged run) always raises a FloatingPointError naming the task and epoch.
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
    nonfinite: Literal["raise", "skip"] = "raise"

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
        if self.nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {self.nonfinite!r}")


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

    def state_dict(self) -> dict[str, Any]:
        """The method's state beyond the model's, for checkpoints: nested dicts and lists of tensors and
        JSON values."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless methods restore nothing
        """Restore :meth:`state_dict`; called after :meth:`setup` and after the model's state is loaded.

        The method ends as it was when saved, an active task included (its :meth:`begin_task` is not
        called again by the trainer).
        """


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

    def state_dict(self) -> dict[str, Any]:
        return self.hat.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.hat.load_state_dict(state)


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
            if not _finite(x):  # only reached with TrainConfig(nonfinite="skip"): training raised otherwise
                continue
            model.zero_grad()
            F.cross_entropy(model(x, task=task), y, reduction="sum").backward()
            for n, p in named.items():
                if p.grad is not None:
                    fisher[n] += p.grad.square()
            seen += len(y)
        model.zero_grad()
        self.anchors.append(({n: f / max(seen, 1) for n, f in fisher.items()},
                             {n: p.detach().clone() for n, p in named.items()}))

    def state_dict(self) -> dict[str, Any]:
        return {"anchors": [{"fisher": fisher, "anchor": anchor} for fisher, anchor in self.anchors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = dict(self.model.named_parameters())
        anchors = []
        for i, saved in enumerate(state["anchors"]):
            unknown = sorted(set(saved["fisher"]) - set(params))
            if unknown or set(saved["fisher"]) != set(saved["anchor"]):
                raise ValueError(f"state['anchors'][{i}] must hold a Fisher and an anchor for the same parameters of "
                                 f"the model, got unknown names {unknown} or different name sets")
            anchors.append(tuple({n: t.to(params[n].device) for n, t in saved[part].items()}
                                 for part in ("fisher", "anchor")))
        self.anchors = anchors


METHODS: dict[str, Callable[..., Method]] = {"hat": HATMethod, "sgd": FineTune, "ewc": EWC}


@dataclass
class SequenceResult:
    """What a run over a task sequence produced.

    Attributes:
        accuracy: ``accuracy[t][τ]``: test accuracy on task τ after training task t (all τ).
        loss: the matching test losses.
        epochs: epochs trained per task.
        seconds: wall time per task (summed over the runs of a resumed task).
        tasks: task names.
        skipped: training batches skipped per task for inputs holding NaN or inf
            (``TrainConfig(nonfinite="skip")``).
    """

    accuracy: list[list[float]] = field(default_factory=list)
    loss: list[list[float]] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def _finite(x: Tensor) -> bool:
    """Whether every input value is finite (integer inputs, such as token ids, always are)."""
    return bool(torch.isfinite(x).all())


def _skip_hint(what: str) -> str:
    return f"the inputs hold NaN or inf; clean the data, or pass {what}(nonfinite='skip') to skip such batches"


def _diverged(where: str, what: str, value: float) -> FloatingPointError:
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
        if not _finite(x):
            if nonfinite == "raise":
                raise ValueError(f"{where}, batch {b + 1} of {len(loader)}: {_skip_hint('TrainConfig')}")
            finite = torch.isfinite(x).flatten(1).all(1)  # evaluation leaves out samples, not whole batches
            x, y = x[finite], y[finite]
            if not len(y):
                continue
        out = model(x, task=task)
        total_loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += len(y)
    if count == 0:
        raise ValueError(f"{where}: every sample holds NaN or inf inputs; nothing left to evaluate")
    if not math.isfinite(total_loss):
        raise _diverged(where, "loss", total_loss / count)
    return total_loss / count, correct / count


@torch.no_grad()
def recalibrate_norms(model: nn.Module, parts: Sequence[tuple[int, Dataset]], batch_size: int = 64, *,
                      nonfinite: Literal["raise", "skip"] = "raise") -> None:
    """Re-estimate the running statistics of every batch-statistics norm from ``(task, data)`` parts.

    The model runs in evaluation mode (binarized gates, no dropout) with only its norms training. Each
    norm's statistics end as the mean of the batch statistics they saw: per task for norms with
    per-task statistics, over all parts for shared ones. Each norm moves only what its training
    forward moves (masked BN: the task's selected units). A batch whose inputs hold NaN or inf raises
    a ValueError, or is left out with ``nonfinite="skip"``. Under ``torchrun`` each rank passes its
    share of every batch, and norms converted by :func:`hatnorm.convert_sync` combine the shares.
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
            for b, (x, _) in enumerate(DataLoader(data, batch_size=batch_size, drop_last=len(data) > batch_size)):
                if not _finite(x):
                    if nonfinite == "skip":
                        continue
                    raise ValueError(f"task {task}, recalibration batch {b + 1}: {_skip_hint('recalibrate_norms')}")
                for i, m in enumerate(norms):
                    key = (i, task if m.running_mean.dim() == 2 else None)
                    seen[key] = seen.get(key, 0) + 1
                    m.momentum = 1.0 / seen[key]
                model(shard(x), task=task)
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

    def start_task(self, name: str, epochs: int, completed: int = 0) -> None:
        if self.progress is not None:
            self.bar = self.progress.add_task(f"{self.title} {name}", total=epochs, completed=completed)

    def epoch(self, name: str, epoch: int, loss: float, accuracy: float, lr: float, s: float, skipped: int) -> None:
        text = (f"{self.title} {name} epoch {epoch + 1}: train loss {loss:.4f}  val acc {accuracy:.4f}  "
                f"lr {lr:.2g}  s {s:.4g}")
        if skipped:
            text += f"  skipped {skipped} non-finite batches"
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


@dataclass
class _FitState:
    """Where the schedule of one :func:`_fit` stands after an epoch: what a checkpoint keeps mid-task."""

    epoch: int  # epochs finished
    lr: float
    patience: int
    best_loss: float
    best_state: dict[str, Tensor]
    optimizer: dict[str, Any]
    skipped: int

    def state_dict(self) -> dict[str, Any]:
        # JSON keys are strings: the optimizer's per-parameter state goes as [index, state] pairs
        optimizer = {"state": [[i, v] for i, v in self.optimizer["state"].items()],
                     "param_groups": self.optimizer["param_groups"]}
        return vars(self) | {"optimizer": optimizer}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> _FitState:
        optimizer = {"state": dict(state["optimizer"]["state"]), "param_groups": state["optimizer"]["param_groups"]}
        return cls(**state | {"optimizer": optimizer})


def _fit(model: nn.Module, method: Method, task_ids: Sequence[int], train: Sequence[Dataset],
         valid: Sequence[Dataset], config: TrainConfig, display: _Display, name: str, seed: int, *,
         resume: _FitState | None = None, epoch_end: Callable[[_FitState], None] | None = None) -> tuple[int, int]:
    """Train on one or more tasks (several for joint training) with the reference schedule.

    Each step takes one batch of every task in ``task_ids`` and sums their losses. ``resume`` continues
    from a state ``epoch_end`` was given after an epoch. Returns the epochs run and the batches skipped.

    Under ``torchrun`` every rank loads the same batches and trains on its share of each, with
    synchronised norms and gradients averaged over the ranks, so all ranks stay equal.
    """
    convert_sync(model)
    if resume is None:
        lr, patience, best_loss, first, skipped = config.lr, config.patience, math.inf, 0, 0
        # as in Serrà et al.'s code: the first epoch always improves on the untrained model
        best_state = copy.deepcopy(model.state_dict())
    else:
        lr, patience, best_loss, first, skipped = (resume.lr, resume.patience, resume.best_loss, resume.epoch,
                                                   resume.skipped)
        best_state = resume.best_state

    def new_optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                               momentum=config.momentum, weight_decay=config.weight_decay)

    def validation_loss(epoch: int) -> tuple[float, float]:
        results = [evaluate(model, v, t, nonfinite=config.nonfinite,
                            where=f"task {t} ({name}), epoch {epoch + 1}, validation")
                   for t, v in zip(task_ids, valid, strict=True)]
        return sum(r[0] for r in results) / len(results), sum(r[1] for r in results) / len(results)

    optimizer = new_optimizer()
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
    display.start_task(name, config.epochs, completed=first)
    epoch = first - 1
    for epoch in range(first, config.epochs):
        model.train()
        loaders = [_batches(d, config.batch_size, seed * 1000 + epoch) for d in train]
        num_batches = min(len(loader) for loader in loaders)
        running, trained, skipped_now = 0.0, 0, 0
        for b, batches in enumerate(zip(*loaders, strict=False)):
            s = method.scale(b, num_batches)
            bad = [t for t, (x, _) in zip(task_ids, batches, strict=True) if not _finite(x)]
            if bad:
                if config.nonfinite == "raise":
                    raise ValueError(f"task {bad[0]} ({name}), epoch {epoch + 1}, batch {b + 1} of {num_batches}: "
                                     f"{_skip_hint('TrainConfig')}")
                skipped_now += 1
                continue
            task_loss = sum(F.cross_entropy(model(shard(x), task=t, s=s), shard(y)) for t, (x, y) in
                            zip(task_ids, batches, strict=True))
            # checked before any gradient or step: the model is left as the last finite step made it
            if not math.isfinite(value := task_loss.item()):
                raise _diverged(f"task {task_ids[-1]} ({name}), epoch {epoch + 1}, batch {b + 1} of {num_batches}",
                                "training loss", value)
            loss = method.loss(task_loss, s)
            optimizer.zero_grad()
            loss.backward()
            average_gradients(model)
            method.after_backward(s)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            method.step(optimizer)
            running += loss.item()
            trained += 1
        skipped += skipped_now
        val_loss, val_acc = validation_loss(epoch)
        display.epoch(name, epoch, running / max(trained, 1), val_acc, lr, s, skipped_now)
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
        if epoch_end is not None:
            epoch_end(_FitState(epoch + 1, lr, patience, best_loss, best_state, optimizer.state_dict(), skipped))
    model.load_state_dict(best_state)
    if config.recalibrate:
        recalibrate_norms(model, list(zip(task_ids, train, strict=True)), config.batch_size,
                          nonfinite=config.nonfinite)
    display.finish_task(config.epochs)
    return epoch + 1, skipped


def _write(result: SequenceResult, out_dir: Path, info: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(info | asdict(result), indent=2))
    with (out_dir / "accuracy.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["after_task", *result.tasks])
        for t, row in enumerate(result.accuracy):
            writer.writerow([t, *(f"{a:.6f}" for a in row)])


class _Checkpoints:
    """A run's checkpoint folder: when to save, the identity check on resume, the saves."""

    def __init__(self, directory: Path, every: int | None, resume: bool) -> None:
        self.directory, self.every, self.resume = directory, every, resume
        self.identity: dict[str, Any] = {}

    def start(self, identity: dict[str, Any]) -> Checkpoint | None:
        """The checkpoint to resume from; a run that does not resume replaces the folder's checkpoint."""
        self.identity = identity
        if self.resume:
            return load_checkpoint(self.directory, identity=identity)
        if is_main_process():
            remove_checkpoint(self.directory)
        return None

    def due(self, epoch: int) -> bool:
        return self.every is not None and epoch % self.every == 0

    def save(self, state: dict[str, Any]) -> None:
        if is_main_process():  # under torchrun the ranks are equal: rank 0 writes for all
            save_checkpoint(self.directory, state, identity=self.identity)


def _holding(checkpoints: _Checkpoints | None) -> AbstractContextManager[None]:
    """The run's hold on its checkpoint folder: one writer at a time (rank 0 writes under ``torchrun``)."""
    if checkpoints is None or not is_main_process():
        return nullcontext()
    return lock_folder(checkpoints.directory)


def _checkpoints(directory: str | Path | None, every: int | None, resume: bool) -> _Checkpoints | None:
    if every is not None:
        check_positive_int(every, "checkpoint_every")
    if not isinstance(resume, bool):
        raise ValueError(f"resume must be a bool, got {resume!r}")
    if directory is None:
        if resume or every is not None:
            option = "resume=True" if resume else f"checkpoint_every={every}"
            raise ValueError(f"{option} needs checkpoint_dir, the folder of the run's checkpoints; got "
                             "checkpoint_dir=None")
        return None
    return _Checkpoints(Path(directory), every, resume)


def _method_identity(method: Method) -> dict[str, Any]:
    """The method's name and options, read before :meth:`Method.setup` adds its state."""
    options = {k: v if v is None or isinstance(v, bool | int | float | str) else type(v).__name__
               for k, v in vars(method).items()}
    return {"name": method.name} | options


def _identity(run: str, model: nn.Module, tasks: Sequence[Task], method: dict[str, Any], config: TrainConfig,
              info: dict[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed; ``nonfinite`` may change (skipping after an error)."""
    return (info or {}) | {
        "run": run,
        "num_tasks": len(tasks),
        # the data itself, not only its size: a checkpoint of other data (another seed's permutations) is refused
        "tasks": {str(i): {"name": t.name, "train": len(t.train), "test": len(t.test),
                           "train_sha256": fingerprint(t.train), "test_sha256": fingerprint(t.test)}
                  for i, t in enumerate(tasks)},
        "method": method,
        "config": {k: v for k, v in asdict(config).items() if k != "nonfinite"},
    } | describe_model(model)


def _check_writable(folder: str | Path | None, name: str) -> None:
    """Refuse a folder results or checkpoints cannot be written to now, not after a task's training."""
    if folder is None or not is_main_process():
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise PermissionError(f"{name}: {folder} is not a folder this run can write to ({error.strerror}); "
                              "results are written there after every task") from None


def _afresh(title: str, directory: Path) -> str:
    return f"{title or 'run'}: resume asked, but {directory} holds no checkpoint: starting afresh"


def _resumed(title: str, checkpoint: Checkpoint, done: str, fit: _FitState | None, current: str) -> str:
    text = f"{title or 'run'}: resumed from checkpoint {checkpoint.step} in {checkpoint.path}: {done}"
    return text + ("" if fit is None else f"; {current} continues after epoch {fit.epoch}")


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
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> SequenceResult:
    """Train ``tasks`` in order with ``method`` and test every task after each one.

    Results are written as ``results.json`` and ``accuracy.csv`` to ``out_dir`` after every task. With
    ``checkpoint_dir``, a checkpoint (:mod:`hatnorm.checkpoint`) is written there after every task and
    every ``checkpoint_every`` epochs within a task: the model, the optimizer, the schedule, the method,
    the random states and the results so far. ``resume=True`` continues from it; the run ends exactly as
    an uninterrupted one (bitwise on the CPU).

    Under ``torchrun`` (an initialised process group), every rank makes this same call: each trains on
    its share of every batch with synchronised norms and averaged gradients, the ranks stay equal, and
    rank 0 alone logs and writes files (see :mod:`hatnorm.distributed`).

    Args:
        build_model: makes the model (called once, after seeding); its forward is ``model(x, task=, s=)``.
        tasks: the task sequence.
        method: how each task is learned (:class:`HATMethod`, :class:`FineTune`, :class:`EWC`).
        config: the training settings.
        out_dir: where results go after every task; ``None`` writes nothing.
        console: where progress goes (a terminal gets a progress bar, anything else log lines).
        title: a prefix for progress lines.
        info: extra fields for ``results.json`` (architecture, norm, ...); a checkpoint must agree on them.
        checkpoint_dir: the checkpoint folder; ``None`` writes no checkpoints. A run that does not resume
            replaces the folder's checkpoint.
        checkpoint_every: also checkpoint after every this many epochs within a task (≥ 1); ``None``: only
            after every task.
        resume: continue from the checkpoint in ``checkpoint_dir`` (a finished run returns its results
            without training; an empty folder starts afresh).

    Raises:
        ValueError: no tasks, bad checkpoint options, or an input batch holding NaN or inf (with
            ``config.nonfinite="raise"``).
        hatnorm.checkpoint.CheckpointError: the checkpoint to resume is from a different run (another
            architecture, norm, task count, method, config, ...) or damaged; nothing is loaded.
    """
    if not tasks:
        raise ValueError("tasks must hold at least one task, got none")
    checkpoints = _checkpoints(checkpoint_dir, checkpoint_every, resume)
    _check_writable(out_dir, "out_dir")
    _check_writable(checkpoint_dir, "checkpoint_dir")
    with _holding(checkpoints):
        console = console or Console(quiet=not is_main_process())
        method_identity = _method_identity(method)
        torch.manual_seed(config.seed)
        model = build_model()
        method.setup(model)
        splits = [split_validation(task.train, config.validation_fraction, config.seed + t)
                  for t, task in enumerate(tasks)]
        result = SequenceResult(tasks=[t.name for t in tasks])
        meta = (info or {}) | {"method": method.name, "config": asdict(config)}
        fit_state, elapsed = None, 0.0
        if checkpoints is not None:
            saved = checkpoints.start(_identity("sequence", model, tasks, method_identity, config, info))
            if saved is not None:
                model.load_state_dict(saved.state["model"])
                method.load_state_dict(saved.state["method"])
                result = SequenceResult(**saved.state["result"])
                fit_state = None if saved.state["fit"] is None else _FitState.from_state_dict(saved.state["fit"])
                elapsed = saved.state["elapsed"]
                set_rng_state(saved.state["rng"])
                done = len(result.accuracy)
                console.print(_resumed(title, saved, f"{done} of {len(tasks)} tasks done", fit_state,
                                       f"task {done} ({tasks[min(done, len(tasks) - 1)].name})"),
                              highlight=False, soft_wrap=True)
                if done and out_dir is not None and is_main_process():  # the results, wherever they go now
                    _write(result, Path(out_dir), meta)
            elif resume:
                console.print(_afresh(title, checkpoints.directory), highlight=False, soft_wrap=True)

        def save(fit: _FitState | None, seconds: float) -> None:
            checkpoints.save({"fit": None if fit is None else fit.state_dict(), "elapsed": seconds,
                              "model": model.state_dict(), "method": method.state_dict(), "result": asdict(result),
                              "rng": rng_state()})

        with _Display(console, title) as display:
            for t in range(len(result.accuracy), len(tasks)):
                start = time.perf_counter() - elapsed
                if fit_state is None:
                    method.begin_task(t)
                train, valid = splits[t]

                def epoch_end(fit: _FitState, start: float = start) -> None:
                    if checkpoints.due(fit.epoch):
                        save(fit, time.perf_counter() - start)

                epochs, skipped = _fit(model, method, [t], [train], [valid], config, display, tasks[t].name,
                                       config.seed + t, resume=fit_state,
                                       epoch_end=epoch_end if checkpoints is not None else None)
                fit_state, elapsed = None, 0.0
                method.end_task(t, train)
                tested = [evaluate(model, other.test, tau, nonfinite=config.nonfinite,
                                   where=f"after task {t} ({tasks[t].name}), test split of task {tau} ({other.name})")
                          for tau, other in enumerate(tasks)]
                result.epochs.append(epochs)
                result.skipped.append(skipped)
                result.loss.append([loss for loss, _ in tested])
                result.accuracy.append([acc for _, acc in tested])
                result.seconds.append(time.perf_counter() - start)
                if out_dir is not None and is_main_process():
                    _write(result, Path(out_dir), meta)
                if checkpoints is not None:
                    save(None, 0.0)
        return result


def train_joint(
    build_model: Callable[[], nn.Module],
    tasks: Sequence[Task],
    config: TrainConfig = TrainConfig(),
    *,
    console: Console | None = None,
    title: str = "joint",
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> list[list[float]]:
    """A_J: for every t, a fresh ungated model trained jointly on tasks 0..t, tested on each of them.

    Checkpoints work as in :func:`train_sequence`: after every t, and every ``checkpoint_every`` epochs
    within one.

    Args:
        build_model: makes the model (called after seeding, once per t).
        tasks: the task sequence.
        config: the training settings.
        console: where progress goes.
        title: a prefix for progress lines.
        checkpoint_dir: the checkpoint folder; ``None`` writes no checkpoints.
        checkpoint_every: also checkpoint after every this many epochs within a t (≥ 1).
        resume: continue from the checkpoint in ``checkpoint_dir``.

    Returns:
        ``joint[t][τ]`` for τ ≤ t (NaN above the diagonal).

    Raises:
        ValueError: bad checkpoint options, or an input batch holding NaN or inf.
        hatnorm.checkpoint.CheckpointError: the checkpoint to resume is from a different run, or damaged.
    """
    checkpoints = _checkpoints(checkpoint_dir, checkpoint_every, resume)
    _check_writable(checkpoint_dir, "checkpoint_dir")
    with _holding(checkpoints):
        console = console or Console(quiet=not is_main_process())
        matrix: list[list[float]] = []
        fit_state, model_state, rng = None, None, None
        if checkpoints is not None:
            torch.manual_seed(config.seed)  # every t seeds again: this model only describes the run
            saved = checkpoints.start(_identity("joint", build_model(), tasks, {"name": "joint"}, config, None))
            if saved is not None:
                matrix = saved.state["matrix"]
                if saved.state["fit"] is not None:
                    fit_state = _FitState.from_state_dict(saved.state["fit"])
                    model_state, rng = saved.state["model"], saved.state["rng"]
                console.print(_resumed(title, saved, f"{len(matrix)} of {len(tasks)} joint models trained", fit_state,
                                       f"tasks 0..{len(matrix)}"), highlight=False, soft_wrap=True)
            elif resume:
                console.print(_afresh(title, checkpoints.directory), highlight=False, soft_wrap=True)
        with _Display(console, title) as display:
            for t in range(len(matrix), len(tasks)):
                torch.manual_seed(config.seed)
                model = build_model()
                method = FineTune()
                method.setup(model)
                if fit_state is not None:
                    model.load_state_dict(model_state)
                    set_rng_state(rng)
                splits = [split_validation(task.train, config.validation_fraction, config.seed + k)
                          for k, task in enumerate(tasks[: t + 1])]

                def epoch_end(fit: _FitState, model: nn.Module = model) -> None:
                    if checkpoints.due(fit.epoch):
                        checkpoints.save({"matrix": matrix, "fit": fit.state_dict(), "model": model.state_dict(),
                                          "rng": rng_state()})

                _fit(model, method, list(range(t + 1)), [s[0] for s in splits], [s[1] for s in splits], config,
                     display, f"tasks 0..{t}", config.seed + 100 + t, resume=fit_state,
                     epoch_end=epoch_end if checkpoints is not None else None)
                fit_state = None
                matrix.append([evaluate(model, tasks[tau].test, tau, nonfinite=config.nonfinite,
                                        where=f"joint tasks 0..{t}, test split of task {tau} ({tasks[tau].name})")[1]
                               if tau <= t else math.nan for tau in range(len(tasks))])
                if checkpoints is not None:
                    checkpoints.save({"matrix": matrix, "fit": None, "model": None, "rng": None})
        return matrix

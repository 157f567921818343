"""Whole task sequences: train, test after every task, write results, checkpoint and resume."""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hatnorm._checks import check_positive_int
from hatnorm._shards import shard_optimizer_state, shard_state, whole_state
from hatnorm.checkpoint import (
    Checkpoint,
    describe_model,
    describe_options,
    load_checkpoint,
    lock_folder,
    remove_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_sha256,
)
from hatnorm.data import Task, fingerprint
from hatnorm.distributed import fully_shard, is_main_process, world_size
from hatnorm.training._config import TrainConfig
from hatnorm.training._display import Console, Display
from hatnorm.training._evaluation import evaluate
from hatnorm.training._fit import FitState, check_trainable, fit_task, split_validation
from hatnorm.training._methods import FineTune, HATMethod, Method


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
        validation: ``validation[t][e]``: validation accuracy on task t after its epoch e + 1, the learning
            curve (the weights kept are those of the lowest validation loss).
    """

    accuracy: list[list[float]] = field(default_factory=list)
    loss: list[list[float]] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    validation: list[list[float]] = field(default_factory=list)


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
        state = whole_state(state)  # sharding="fsdp": every rank gathers its shards, rank 0 writes the whole state
        if is_main_process():  # under torchrun the ranks are equal: rank 0 writes for all
            save_checkpoint(self.directory, state, identity=self.identity)


def _check_sharding(config: TrainConfig, method: Method) -> None:
    """Refuse ``sharding="fsdp"`` with a method other than HAT or fine-tuning (EWC reads whole parameters)."""
    if config.sharding == "fsdp" and not (isinstance(method, HATMethod) or type(method) is FineTune):
        raise ValueError(f"config.sharding='fsdp' trains HAT and fine-tuning (methods 'hat', 'sgd'), got method "
                         f"{method.name!r}; use sharding='ddp' for it")


def _placed(model: nn.Module, config: TrainConfig) -> nn.Module:
    """The model as the ranks train it: on ``config.device`` when given (each rank's own GPU for an unindexed
    ``"cuda"`` under torchrun), then sharded by FSDP2 with ``sharding="fsdp"`` (under torchrun), else itself."""
    if config.device is not None:
        device = torch.device(config.device)
        if device.type == "cuda" and device.index is None and world_size() > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        model = model.to(device)
    return fully_shard(model) if config.sharding == "fsdp" else model


def _sharded_fit(fit: FitState, model: nn.Module) -> FitState:
    """A checkpoint's mid-task state, its whole tensors cut as ``model``'s parameters are (``sharding="fsdp"``)."""
    fit.best_state = shard_state(fit.best_state, model.state_dict())
    # the optimizer's parameters, in the order make_optimizer gives them
    fit.optimizer = shard_optimizer_state(fit.optimizer, [p for p in model.parameters() if p.requires_grad])
    return fit


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
    """The method's name and options, read before :meth:`Method.setup` adds its state; an object among them (a
    gradient policy) with all of its own options."""
    return {"name": method.name} | describe_options(vars(method))


def _identity(run: str, model: nn.Module, tasks: Sequence[Task], method: dict[str, Any], config: TrainConfig,
              info: dict[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed; ``nonfinite`` may change (skipping after an error),
    ``sharding`` (its checkpoints hold the whole state either way) and ``device`` (a run started on one device
    resumes on another).

    ``model`` is the run's model as built, before anything is loaded into it: its state's digest records the
    weights the run started from (pretrained ones included).
    """
    return (info or {}) | {
        "run": run,
        "num_tasks": len(tasks),
        # the data itself, not only its size: a checkpoint of other data (another seed's permutations) is refused
        "tasks": {str(i): {"name": t.name, "train": len(t.train), "test": len(t.test),
                           "train_sha256": fingerprint(t.train), "test_sha256": fingerprint(t.test)}
                  for i, t in enumerate(tasks)},
        "method": method,
        "config": {k: v for k, v in asdict(config).items() if k not in ("nonfinite", "sharding", "device")},
        "initial_sha256": state_sha256(model),
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


def _resumed(title: str, checkpoint: Checkpoint, done: str, fit: FitState | None, current: str) -> str:
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
    an uninterrupted one (bitwise on the CPU). A checkpoint is only resumed by the same run: the same
    model as built (its starting weights included), data, method with every option, and settings.

    Under ``torchrun`` (an initialised process group), every rank makes this same call: each trains on
    its share of every batch with synchronised norms and averaged gradients, the ranks stay equal, and
    rank 0 alone logs and writes files (see :mod:`hatnorm.distributed`). With ``config.sharding="fsdp"``
    each rank holds a slice of the model (PyTorch FSDP2, :func:`hatnorm.distributed.fully_shard`, applied to
    the built model before the method sees it); every checkpoint gathers the whole state for rank 0 to write,
    and a resumed run cuts it to the ranks' slices again.

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
        ValueError: no tasks, bad checkpoint options, a task whose training split holds fewer than 2
            samples (per rank under ``torchrun``; before any training), a head with fewer outputs than its
            task has classes, or an input batch holding NaN or inf (with ``config.nonfinite="raise"``), or
            ``config.sharding="fsdp"`` with a method other than HAT or fine-tuning (before any training).
        hatnorm.checkpoint.CheckpointError: the checkpoint to resume is from a different run (another
            architecture, norm, task count, method, config, ...) or damaged; nothing is loaded.
    """
    if not tasks:
        raise ValueError("tasks must hold at least one task, got none")
    check_trainable([(task.name, len(task.train)) for task in tasks], config)
    _check_sharding(config, method)
    checkpoints = _checkpoints(checkpoint_dir, checkpoint_every, resume)
    _check_writable(out_dir, "out_dir")
    _check_writable(checkpoint_dir, "checkpoint_dir")
    with _holding(checkpoints):
        console = console or Console(quiet=not is_main_process())
        method_identity = _method_identity(method)
        torch.manual_seed(config.seed)
        model = _placed(build_model(), config)
        method.setup(model)
        splits = [split_validation(task.train, config.validation_fraction, config.seed + t)
                  for t, task in enumerate(tasks)]
        result = SequenceResult(tasks=[t.name for t in tasks])
        meta = (info or {}) | {"method": method.name, "config": asdict(config)}
        fit_state, elapsed = None, 0.0
        if checkpoints is not None:
            saved = checkpoints.start(_identity("sequence", model, tasks, method_identity, config, info))
            if saved is not None:
                model.load_state_dict(shard_state(saved.state["model"], model.state_dict()))
                method.load_state_dict(saved.state["method"])
                result = SequenceResult(**saved.state["result"])
                # a checkpoint written before the learning curves were kept: those tasks have none
                result.validation += [[] for _ in range(len(result.accuracy) - len(result.validation))]
                if saved.state["fit"] is not None:
                    fit_state = _sharded_fit(FitState.from_state_dict(saved.state["fit"]), model)
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

        def save(fit: FitState | None, seconds: float) -> None:
            checkpoints.save({"fit": None if fit is None else fit.state_dict(), "elapsed": seconds,
                              "model": model.state_dict(), "method": method.state_dict(), "result": asdict(result),
                              "rng": rng_state()})

        with Display(console, title) as display:
            for t in range(len(result.accuracy), len(tasks)):
                start = time.perf_counter() - elapsed
                if fit_state is None:
                    method.begin_task(t)
                train, valid = splits[t]

                def epoch_end(fit: FitState, start: float = start) -> None:
                    if checkpoints.due(fit.epoch):
                        save(fit, time.perf_counter() - start)

                epochs, skipped, curve = fit_task(model, method, [t], [train], [valid], config, display,
                                                  tasks[t].name, config.seed + t, classes=[tasks[t].num_classes],
                                                  resume=fit_state,
                                                  epoch_end=epoch_end if checkpoints is not None else None)
                fit_state, elapsed = None, 0.0
                method.end_task(t, train)
                tested = [evaluate(model, other.test, tau, nonfinite=config.nonfinite,
                                   where=f"after task {t} ({tasks[t].name}), test split of task {tau} ({other.name})")
                          for tau, other in enumerate(tasks)]
                result.epochs.append(epochs)
                result.skipped.append(skipped)
                result.validation.append(curve)
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
    within one; a checkpoint of other starting weights (``build_model`` loading another pretrained file)
    is refused.

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
        ValueError: bad checkpoint options, a task too small to train or a head too small for its task (as
            for :func:`train_sequence`), or an input batch holding NaN or inf.
        hatnorm.checkpoint.CheckpointError: the checkpoint to resume is from a different run, or damaged.
    """
    check_trainable([(task.name, len(task.train)) for task in tasks], config)
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
                    fit_state = FitState.from_state_dict(saved.state["fit"])
                    model_state, rng = saved.state["model"], saved.state["rng"]
                console.print(_resumed(title, saved, f"{len(matrix)} of {len(tasks)} joint models trained", fit_state,
                                       f"tasks 0..{len(matrix)}"), highlight=False, soft_wrap=True)
            elif resume:
                console.print(_afresh(title, checkpoints.directory), highlight=False, soft_wrap=True)
        with Display(console, title) as display:
            for t in range(len(matrix), len(tasks)):
                torch.manual_seed(config.seed)
                model = _placed(build_model(), config)
                method = FineTune()
                method.setup(model)
                if fit_state is not None:
                    model.load_state_dict(shard_state(model_state, model.state_dict()))
                    fit_state = _sharded_fit(fit_state, model)
                    set_rng_state(rng)
                splits = [split_validation(task.train, config.validation_fraction, config.seed + k)
                          for k, task in enumerate(tasks[: t + 1])]

                def epoch_end(fit: FitState, model: nn.Module = model) -> None:
                    if checkpoints.due(fit.epoch):
                        checkpoints.save({"matrix": matrix, "fit": fit.state_dict(), "model": model.state_dict(),
                                          "rng": rng_state()})

                fit_task(model, method, list(range(t + 1)), [s[0] for s in splits], [s[1] for s in splits], config,
                     display, f"tasks 0..{t}", config.seed + 100 + t,
                     classes=[task.num_classes for task in tasks[: t + 1]], resume=fit_state,
                     epoch_end=epoch_end if checkpoints is not None else None)
                fit_state = None
                matrix.append([evaluate(model, tasks[tau].test, tau, nonfinite=config.nonfinite,
                                        where=f"joint tasks 0..{t}, test split of task {tau} ({tasks[tau].name})")[1]
                               if tau <= t else math.nan for tau in range(len(tasks))])
                if checkpoints is not None:
                    checkpoints.save({"matrix": matrix, "fit": None, "model": None, "rng": None})
        return matrix

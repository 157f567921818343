"""hatnorm in Lightning: one ``Trainer.fit`` per task, HAT driven by :class:`HATCallback`.

    module = Classifier(model)             # a HATLightningModule: self.hat_loss(...) in training_step
    for task, loader in enumerate(loaders):
        L.Trainer(max_epochs=5, callbacks=[HATCallback(task)]).fit(module, loader)

Per fit the callback begins the task and attaches HAT to the trainer's optimizers (:meth:`hatnorm.HAT.attach`);
per batch it sets the annealed scale; in ``on_before_optimizer_step`` (once per optimizer step, after gradient
accumulation and before Lightning's gradient clipping: Serrà et al.'s order) it protects the gradients; at the
end of the fit it ends the task and re-estimates the task's norm statistics. Its ``state_dict`` carries HAT's
state in Lightning's checkpoints, restored after the model's (``fit(..., ckpt_path=...)`` resumes a task).
Under DDP the callback synchronises hatnorm's norms across the processes (:func:`hatnorm.convert_sync`).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from hatnorm import HAT, convert_sync, recalibrate_norms


class HATLightningModule(pl.LightningModule):
    """A ``LightningModule`` around a HAT model: subclass it with ``training_step`` and ``configure_optimizers``.

    ``self(x)`` runs the model on the task :class:`HATCallback` trains, with the batch's scale while training;
    :meth:`hat_loss` adds the capacity regulariser to the task loss.

    Args:
        model: the HAT model; its forward takes ``task=`` and ``s=``.
        hat: the HAT over ``model``; ``HAT(model)`` when omitted (a :class:`hatnorm.HATModule` or a
            converted model, which know their wiring).

    Raises:
        ValueError: ``hat`` is a HAT over another model.
    """

    def __init__(self, model: nn.Module, hat: HAT | None = None) -> None:
        super().__init__()
        if hat is not None and not isinstance(hat, HAT):
            raise TypeError(f"hat must be a hatnorm.HAT or None, got {type(hat).__name__}")
        if hat is not None and hat.model is not model:
            raise ValueError("hat must be the HAT over model, got a HAT over another "
                             f"{type(hat.model).__name__}; build it with HAT(model) or leave it out")
        self.model = model
        self.hat = HAT(model) if hat is None else hat
        #: the task being trained (set by HATCallback), and the scale of the current batch
        self.task: int | None = None
        self.s: float | None = None

    def forward(self, x: Any, task: int | None = None) -> Any:
        """The model on ``x`` for ``task`` (default: the task being trained), with the batch's scale while training.

        Raises:
            RuntimeError: no task is given and none is being trained.
        """
        if task is None:
            if self.task is None:
                raise RuntimeError("task must be given outside a HATCallback's fit (no task is being trained), "
                                   "got task=None")
            task = self.task
        return self.model(x, task=task, s=self.s if self.training else None)

    def hat_loss(self, task_loss: Tensor) -> Tensor:
        """``task_loss + c·R`` at the batch's scale (:meth:`hatnorm.HAT.loss`).

        Raises:
            RuntimeError: called outside the training of a fit driven by :class:`HATCallback`.
        """
        if self.s is None:
            raise RuntimeError("hat_loss needs the batch's scale, which HATCallback sets while it trains a task; "
                               "add HATCallback(task) to the Trainer's callbacks")
        return self.hat.loss(task_loss, self.s)


class HATCallback(pl.Callback):
    """Train one task of a :class:`HATLightningModule` with HAT: one ``Trainer.fit`` per task.

    Args:
        task: the task this fit trains.
        recalibrate: at the end of the fit, re-estimate the task's norm statistics in one pass over the training
            data in inference mode (:func:`hatnorm.recalibrate_norms`) [True].
        batch_size: the batch size of that pass [64].

    Raises:
        ValueError: ``task`` is not an integer ≥ 0, or ``batch_size`` is not an integer > 0.
    """

    def __init__(self, task: int, *, recalibrate: bool = True, batch_size: int = 64) -> None:
        if isinstance(task, bool) or not isinstance(task, int) or task < 0:
            raise ValueError(f"task must be an integer >= 0, got {task!r}")
        if not isinstance(recalibrate, bool):
            raise TypeError(f"recalibrate must be a bool, got {recalibrate!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be an integer > 0, got {batch_size!r}")
        self.task = task
        self.recalibrate = recalibrate
        self.batch_size = batch_size
        self.hat: HAT | None = None
        self._attached: list[torch.optim.Optimizer] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, HATLightningModule):
            raise TypeError(f"HATCallback trains a hatnorm.integrations.lightning.HATLightningModule, got a "
                            f"{type(pl_module).__name__}")
        self.hat = pl_module.hat
        convert_sync(pl_module.model)  # nothing without several processes

    def on_train_start(self, trainer: pl.Trainer, pl_module: HATLightningModule) -> None:
        hat = self._hat()
        if hat.task is None:
            hat.begin_task(self.task)
        elif hat.task != self.task:
            raise RuntimeError(f"task {hat.task} is still being trained (a fit interrupted before its end); resume "
                               f"it with HATCallback({hat.task}) and its checkpoint before training task {self.task}")
        pl_module.task = self.task
        pl_module.train()  # Lightning keeps the mode a module arrives in: evaluated after the last task, it is in eval
        for optimizer in trainer.optimizers:
            hat.attach(optimizer)
            self._attached.append(optimizer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: HATLightningModule, batch: Any,
                             batch_idx: int) -> None:
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("the training data must have a length: the scale anneals over the batches of an epoch, "
                             "got a loader of unknown length")
        accumulate = trainer.accumulate_grad_batches
        # every batch of one optimizer step has the step's scale, as one large batch would
        pl_module.s = self._hat().scale(batch_idx // accumulate, math.ceil(batches / accumulate))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: HATLightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._hat().protect(pl_module.s)

    def on_train_end(self, trainer: pl.Trainer, pl_module: HATLightningModule) -> None:
        self._detach()
        self._hat().end_task()
        pl_module.s = None
        if self.recalibrate:
            recalibrate_norms(pl_module.model, [(self.task, trainer.train_dataloader.dataset)], self.batch_size)
        pl_module.task = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    def state_dict(self) -> dict[str, Any]:
        """The task and HAT's state (:meth:`hatnorm.HAT.state_dict`), kept in Lightning's checkpoints."""
        return {"task": self.task, "hat": self._hat().state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore HAT's state after Lightning restored the model's (an active task is begun again).

        Raises:
            ValueError: the checkpoint is of another task's fit.
        """
        if state_dict["task"] != self.task:
            raise ValueError(f"the checkpoint must be of this callback's task {self.task}, got one of task "
                             f"{state_dict['task']}")
        self._hat().load_state_dict(state_dict["hat"])

    def _hat(self) -> HAT:
        if self.hat is None:
            raise RuntimeError("HATCallback is used before Trainer.fit set it up with its HATLightningModule")
        return self.hat

    def _detach(self) -> None:
        while self._attached:
            self._hat().detach(self._attached.pop())

"""hatnorm in the transformers ``Trainer``: one ``train()`` per task, HAT driven by :class:`HATTrainerCallback`.

    model = hatnorm.convert(ViTForImageClassification(config), num_tasks=2, norm="masked_ln", num_classes=2)
    hat = hatnorm.HAT(model)
    for task, data in enumerate(datasets):          # items {"pixel_values": x, "labels": y}
        HATTrainer(model=model, args=args, train_dataset=data, hat=hat, task=task).train()

The callback begins the task and attaches HAT to the Trainer's optimizer (:meth:`hatnorm.HAT.attach`), sets
the annealed scale at the start of every optimizer step, protects the gradients in ``on_pre_optimizer_step``
(once per optimizer step, after gradient accumulation) and, at the end of ``train()``, ends the task and
re-estimates its norm statistics. The Trainer clips gradients *before* that hook; :class:`HATTrainer` therefore
turns the Trainer's own clip off and clips at ``args.max_grad_norm`` after protection, Serrà et al.'s order.
A Trainer of your own with the callback alone keeps the Trainer's clip before protection: the clip coefficient
is then computed on the unprotected gradients (docs/integrations.md measures the difference).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hatnorm import HAT, recalibrate_norms


class _Pairs(Dataset):
    """A dataset of ``{input_key: x, label_key: y}`` items as the ``(x, y)`` pairs recalibration reads."""

    def __init__(self, data: Dataset, input_key: str, label_key: str) -> None:
        self.data, self.input_key, self.label_key = data, input_key, label_key

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        item = self.data[i]
        return item[self.input_key], item[self.label_key]


def _innermost(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that steps the parameters under accelerate's wrapper (whose hooks the wrapper never runs)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class HATTrainerCallback(TrainerCallback):
    """Train one task with HAT inside a transformers ``Trainer``: one ``train()`` per task.

    Args:
        hat: the HAT over the model the Trainer trains.
        task: the task this ``train()`` trains.
        input_key: the key of the model input in the dataset's items ["pixel_values"].
        label_key: the key of the labels ["labels"].
        max_grad_norm: clip the gradient norm to this after protection (Serrà et al.'s order); 0 clips nothing
            here (set the Trainer's ``max_grad_norm`` to 0 when you use this) [0].
        recalibrate: at the end of ``train()``, re-estimate the task's norm statistics in one pass over the
            training data in inference mode (:func:`hatnorm.recalibrate_norms`) [True].
        batch_size: the batch size of that pass [64].

    Raises:
        TypeError: ``hat`` is not a HAT.
        ValueError: ``task`` is not an integer ≥ 0, ``max_grad_norm`` < 0 or ``batch_size`` not > 0.
    """

    def __init__(self, hat: HAT, task: int, *, input_key: str = "pixel_values", label_key: str = "labels",
                 max_grad_norm: float = 0.0, recalibrate: bool = True, batch_size: int = 64) -> None:
        if not isinstance(hat, HAT):
            raise TypeError(f"hat must be a hatnorm.HAT, got {type(hat).__name__}")
        if isinstance(task, bool) or not isinstance(task, int) or task < 0:
            raise ValueError(f"task must be an integer >= 0, got {task!r}")
        if not isinstance(max_grad_norm, int | float) or not max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be a number >= 0 (0: no clip), got {max_grad_norm!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be an integer > 0, got {batch_size!r}")
        self.hat, self.task = hat, task
        self.input_key, self.label_key = input_key, label_key
        self.max_grad_norm = float(max_grad_norm)
        self.recalibrate, self.batch_size = recalibrate, batch_size
        #: the scale of the current optimizer step (every micro-batch of it), ``None`` outside training
        self.s: float | None = None
        self._steps = 0
        self._data: Dataset | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, *,
                       optimizer: torch.optim.Optimizer, train_dataloader: Any, **kwargs: Any) -> None:
        if self.hat.task is None:
            self.hat.begin_task(self.task)
        elif self.hat.task != self.task:
            raise RuntimeError(f"task {self.hat.task} is still being trained (a train() interrupted before its end); "
                               f"finish it before training task {self.task}")
        self._steps = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        self._data = train_dataloader.dataset
        self._optimizer = _innermost(optimizer)
        self.hat.attach(self._optimizer)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        # every epoch has the same number of optimizer steps: the step within the epoch, also after a resume
        self.s = self.hat.scale(state.global_step % self._steps, self._steps)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        self.hat.protect(self.s)
        if self.max_grad_norm:
            nn.utils.clip_grad_norm_(self.hat.model.parameters(), self.max_grad_norm)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._optimizer is not None:
            self.hat.detach(self._optimizer)
            self._optimizer = None
        self.hat.end_task()
        self.s = None
        if self.recalibrate and self._data is not None:
            recalibrate_norms(self.hat.model, [(self.task, _Pairs(self._data, self.input_key, self.label_key))],
                              self.batch_size)


class HATTrainer(Trainer):
    """The smallest ``Trainer`` for HAT: :meth:`compute_loss` runs the model on the task and the step's scale
    and adds the capacity regulariser; a :class:`HATTrainerCallback` does the rest.

    The Trainer's own clip (``args.max_grad_norm``) runs before the callback's hook, so HATTrainer turns it off
    (on its own copy of ``args``) and the callback clips at that norm after protection. The copy also keeps every
    key of the dataset's items (``remove_unused_columns=False``): the model's arguments are ``x, task, s``.

    Args:
        *args: the Trainer's arguments (``model``, ``args``, ``train_dataset``, ``optimizers``, ...).
        hat: the HAT over the model.
        task: the task this ``train()`` trains (evaluation and prediction run on it too).
        loss_fn: the task loss of ``(logits, labels)``, a mean over the batch [``F.cross_entropy``].
        input_key: the key of the model input in the dataset's items ["pixel_values"].
        label_key: the key of the labels ["labels"].
        recalibrate: re-estimate the task's norm statistics at the end of ``train()`` [True].
        **kwargs: the Trainer's keyword arguments.

    Raises:
        ValueError: a ``compute_loss_func`` is given (pass ``loss_fn``).
    """

    def __init__(self, *args: Any, hat: HAT, task: int, loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                 input_key: str = "pixel_values", label_key: str = "labels", recalibrate: bool = True,
                 **kwargs: Any) -> None:
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func must be None for a HATTrainer, which computes the loss itself, got "
                             f"{kwargs['compute_loss_func']!r}; pass the task loss as loss_fn(logits, labels)")
        super().__init__(*args, **kwargs)
        self.args = copy.copy(self.args)
        clip, self.args.max_grad_norm = self.args.max_grad_norm, 0.0
        # the items' keys are the input and the labels, not the model's argument names: keep them all
        self.args.remove_unused_columns = False
        self.hat_callback = HATTrainerCallback(hat, task, input_key=input_key, label_key=label_key,
                                               max_grad_norm=clip, recalibrate=recalibrate)
        self.add_callback(self.hat_callback)
        self.loss_fn = loss_fn

    def compute_loss(self, model: nn.Module, inputs: Mapping[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """The task loss of the batch plus ``c·R`` while training (the task loss alone in evaluation)."""
        callback = self.hat_callback
        training = model.training
        logits = model(inputs[callback.input_key], task=callback.task, s=callback.s if training else None)
        loss = self.loss_fn(logits, inputs[callback.label_key])
        if training:
            loss = callback.hat.loss(loss, callback.s)
        return (loss, logits) if return_outputs else loss

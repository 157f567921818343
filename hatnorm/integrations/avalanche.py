"""hatnorm in Avalanche: a training plugin and a multi-task module adapter.

    model = HATMultiTaskModule(hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=2))
    hat = hatnorm.HAT(model.model)
    strategy = Naive(model=model, optimizer=SGD(model.parameters(), lr=0.1), criterion=CrossEntropyLoss(),
                     plugins=[HATPlugin(hat)])
    for experience in benchmark.train_stream:       # a task-incremental stream: one task label per experience
        strategy.train(experience)

:class:`HATMultiTaskModule` routes Avalanche's per-sample task labels to the HAT model (``model(x, task=t, s=s)``
for the samples of each task). :class:`HATPlugin` begins the experience's task and attaches HAT to the strategy's
optimizer (:meth:`hatnorm.HAT.attach`) in ``before_training_exp``, sets the annealed scale per iteration, adds
the capacity regulariser to the loss in ``before_backward``, protects the gradients in ``after_backward`` (each
iteration is one optimizer step; a gradient-clipping plugin that clips in ``before_update`` clips after protection,
Serrà et al.'s order) and ends the task and re-estimates its norm statistics in ``after_training_exp``.
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule
from torch import Tensor, nn
from torch.utils.data import Dataset

from hatnorm import HAT, recalibrate_norms


class HATMultiTaskModule(MultiTaskModule):
    """A HAT model as an Avalanche ``MultiTaskModule``: each task's samples run as ``model(x, task=t, s=s)``.

    Args:
        model: the HAT model; its forward takes ``task=`` and, while training, ``s=`` (set by :class:`HATPlugin`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        #: the scale of the current iteration, set by HATPlugin; ``None`` outside training
        self.s: float | None = None

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        """The model's outputs for ``x``, samples of task ``task_label``."""
        return self.model(x, task=int(task_label), s=self.s if self.training else None)


class _Inputs(Dataset):
    """An Avalanche dataset's ``(x, y, t)`` items as the ``(x, y)`` pairs recalibration reads."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        item = self.data[i]
        return item[0], item[1]


class HATPlugin(SupervisedPlugin):
    """Train every experience of a task-incremental stream with HAT; the strategy's model must be a
    :class:`HATMultiTaskModule` over ``hat.model``.

    Args:
        hat: the HAT over the model.
        recalibrate: after each experience, re-estimate its task's norm statistics in one pass over its training
            data in inference mode (:func:`hatnorm.recalibrate_norms`) [True].
        batch_size: the batch size of that pass [64].

    Raises:
        TypeError: ``hat`` is not a HAT.
        ValueError: ``batch_size`` is not an integer > 0.
    """

    def __init__(self, hat: HAT, *, recalibrate: bool = True, batch_size: int = 64) -> None:
        super().__init__()
        if not isinstance(hat, HAT):
            raise TypeError(f"hat must be a hatnorm.HAT, got {type(hat).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be an integer > 0, got {batch_size!r}")
        self.hat, self.recalibrate, self.batch_size = hat, recalibrate, batch_size
        self._optimizer: torch.optim.Optimizer | None = None

    def _module(self, strategy: Any) -> HATMultiTaskModule:
        module = strategy.model
        if not isinstance(module, HATMultiTaskModule):
            raise TypeError(f"the strategy's model must be a HATMultiTaskModule over the HAT's model, got a "
                            f"{type(module).__name__}")
        if module.model is not self.hat.model:
            raise ValueError(f"the strategy's model must be a HATMultiTaskModule over the HAT's model, got one over "
                             f"another {type(module.model).__name__}")
        return module

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._module(strategy)
        labels = list(strategy.experience.task_labels)
        if len(labels) != 1:
            raise ValueError(f"each training experience must hold one task (a task-incremental stream), got task "
                             f"labels {labels}")
        self.hat.begin_task(int(labels[0]))
        self._optimizer = strategy.optimizer
        self.hat.attach(self._optimizer)

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self._module(strategy).s = self.hat.scale(strategy.clock.train_epoch_iterations, len(strategy.dataloader))

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        strategy.loss = self.hat.loss(strategy.loss, self._module(strategy).s)

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        self.hat.protect(self._module(strategy).s)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        task = self.hat.task
        if self._optimizer is not None:
            self.hat.detach(self._optimizer)
            self._optimizer = None
        self.hat.end_task()
        self._module(strategy).s = None
        if self.recalibrate:
            recalibrate_norms(self.hat.model, [(task, _Inputs(strategy.experience.dataset.train()))], self.batch_size)

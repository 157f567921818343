"""How a model learns one task of a sequence: HAT, SGD fine-tuning and EWC behind one interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from hatnorm._checks import check_non_negative, check_positive_int
from hatnorm._gate import HATGate
from hatnorm._hat import HAT
from hatnorm._inputs import call, device_of, split_batch
from hatnorm._policies import GradientPolicy
from hatnorm.training._evaluation import cross_entropy, finite, logits_of


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
        reference: Serrà et al.'s code rather than the paper (``HAT(reference=True)``); the model must be
            built with ``hatnorm.build(..., reference=True)``.
    """

    name = "hat"

    def __init__(self, c: float = 0.75, policy: str | GradientPolicy = "hat", reference: bool = False) -> None:
        self.c, self.policy, self.reference = c, policy, reference

    def setup(self, model: nn.Module) -> None:
        self.hat = HAT(model, c=self.c, policy=self.policy, reference=self.reference)

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
        for i, batch in enumerate(loader):
            x, y = split_batch(batch, device_of(model))
            if i == self.fisher_batches:
                break
            if not finite(x):  # only reached with TrainConfig(nonfinite="skip"): training raised otherwise
                continue
            model.zero_grad()
            cross_entropy(logits_of(call(model, x, task=task), model), y, "sum").backward()
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


"""HAT's optimizer safety: :meth:`HAT.step` and the step hooks of :meth:`HAT.attach`.

Optimizer safety. Scaling gradients is not enough to freeze a parameter: SGD's momentum and weight
decay, and Adam's moments, move entries whose gradient is zero. :meth:`HAT.step` therefore restores,
after ``optimizer.step()``, every entry whose multiplier is exactly 0 to its value before the step
(a ``torch.where`` with a mask fixed for the task). Restoring is exact for every optimizer, needs no
knowledge of the optimizer's update rule, and touches only parameters that have protected entries;
masking the update instead would need one implementation per optimizer. Plain SGD (no momentum, no
weight decay) moves no entry whose gradient is 0, so with it the restore, and its copy of the frozen
parameters, is skipped.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from hatnorm._gate import HATGate
from hatnorm._policies import GradientPolicy
from hatnorm._shards import local
from hatnorm._step_policy import StepPolicy


def _moves_only_by_gradient(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` leaves every entry with a zero gradient exactly as it is: plain SGD."""
    return type(optimizer) is torch.optim.SGD and all(
        group["momentum"] == 0 and group["weight_decay"] == 0 for group in optimizer.param_groups)


def _check_optimizer(optimizer: object, why: str) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError("optimizer must be one whose step() needs no closure (SGD, Adam, AdamW, ...), got LBFGS, "
                        f"which re-evaluates the loss inside step(); {why}")


class OptimizerSafety:
    """The optimizer step of :class:`~hatnorm.HAT`: the step itself, the restore of frozen entries and the clamp
    of the embeddings around it, directly (:meth:`step`) or as hooks on an optimizer (:meth:`attach`).

    :class:`~hatnorm.HAT` sets the state it reads (the active task's frozen parameters, their restore masks
    and snapshots, the gates with their sharded rows, the policy) and gives ``_active``, which names the
    active task or refuses a call outside one.
    """

    gates: list[HATGate]
    policy: GradientPolicy
    reference: bool
    clamp: float
    _frozen: list[torch.nn.Parameter]
    _drop: list[Tensor]
    _snapshots: list[Tensor]
    _rows: list[Tensor | None]
    _restore: bool
    _attached: list[tuple[torch.optim.Optimizer, tuple[RemovableHandle, RemovableHandle]]]

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``, then restore every entry with multiplier 0 and clamp the active embeddings
        (every embedding with ``reference=True``). On an optimizer :meth:`attach` gave to this HAT, only
        ``optimizer.step()``: its hooks do the rest.

        See the module docstring for why restoring is needed for momentum, weight decay and Adam.
        """
        self._active("step")
        _check_optimizer(optimizer, "HAT.step calls optimizer.step() once")
        if any(o is optimizer for o, _ in self._attached):
            optimizer.step()
            return
        self._before_step(optimizer)
        optimizer.step()
        self._after_step(optimizer)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Give every ``optimizer.step()`` HAT's optimizer safety, for trainers that step the optimizer
        themselves (Lightning, the transformers ``Trainer``, Avalanche).

        PyTorch's step hooks do what :meth:`step` does around the step: the pre-hook takes the snapshot of
        the parameters with frozen entries, the post-hook restores those entries and clamps the embeddings.
        A step that does not happen (a gradient scaler's overflow skips ``optimizer.step()``) runs neither.
        Protection stays the caller's: :meth:`protect` once per optimizer step, after the last
        ``backward`` of a gradient-accumulation cycle and before any gradient clipping (Serrà et al.'s
        order); docs/integrations.md says where each trainer calls it.

        Args:
            optimizer: a ``torch.optim.Optimizer`` whose ``step()`` needs no closure, not attached yet.

        Raises:
            TypeError: ``optimizer`` is not an optimizer, or is LBFGS.
            ValueError: ``optimizer`` is already attached to this HAT.
        """
        _check_optimizer(optimizer, "a step hook runs once around it")
        if any(o is optimizer for o, _ in self._attached):
            raise ValueError(f"optimizer must not be attached already, got a {type(optimizer).__name__} this HAT "
                             "is attached to; detach(optimizer) first")
        handles = (optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_step(opt)),
                   optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step(opt)))
        self._attached.append((optimizer, handles))

    def detach(self, optimizer: torch.optim.Optimizer) -> None:
        """Remove the hooks :meth:`attach` registered: ``optimizer.step()`` is a plain step again.

        Raises:
            ValueError: ``optimizer`` is not attached to this HAT.
        """
        for i, (attached, handles) in enumerate(self._attached):
            if attached is optimizer:
                for handle in handles:
                    handle.remove()
                del self._attached[i]
                return
        raise ValueError(f"optimizer must be one attached to this HAT, got a {type(optimizer).__name__} that is not "
                         f"({len(self._attached)} attached)")

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Snapshot the parameters with frozen entries, unless ``optimizer`` moves no entry without a gradient."""
        self._active("optimizer.step() on an optimizer attached to HAT")
        self._restore = bool(self._frozen) and not _moves_only_by_gradient(optimizer)
        if self._restore:
            if not self._snapshots:
                self._snapshots = [torch.empty_like(local(p)) for p in self._frozen]
            torch._foreach_copy_(self._snapshots, [local(p).detach() for p in self._frozen])

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore the frozen entries the step moved and clamp the embeddings."""
        task = self._active("optimizer.step() on an optimizer attached to HAT")
        if self._restore:
            for p, drop, before in zip(self._frozen, self._drop, self._snapshots, strict=True):
                shard = local(p)
                shard.copy_(torch.where(drop, before, shard))
        # Serrà et al.'s code clamps every task's embedding
        plain = [g.embedding if self.reference else g.embedding[task]
                 for g, rows in zip(self.gates, self._rows, strict=True) if rows is None]
        if plain:
            torch._foreach_clamp_min_(plain, -self.clamp)
            torch._foreach_clamp_max_(plain, self.clamp)
        for g, rows in zip(self.gates, self._rows, strict=True):
            if rows is not None:  # sharded: the task's entries of the local shard (every entry with reference=True)
                e = local(g.embedding)
                e.copy_(e.clamp(-self.clamp, self.clamp) if self.reference else
                        torch.where(rows, e.clamp(-self.clamp, self.clamp), e))
        if isinstance(self.policy, StepPolicy):
            self.policy.after_step()

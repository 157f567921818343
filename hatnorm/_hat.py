"""HAT, the method a user drives from their own training loop.

    hat = HAT(model, layers)
    for task in range(num_tasks):
        hat.begin_task(task)
        for batch, (x, y) in enumerate(loader):
            s = hat.scale(batch, len(loader))
            loss = hat.loss(F.cross_entropy(model(x, task=task, s=s), y), s)
            optimizer.zero_grad()
            loss.backward()
            hat.protect(s)          # one fused pass: multipliers fixed at task start + compensation
            hat.step(optimizer)     # optimizer.step(), then frozen entries restored, embeddings clamped
        hat.end_task()

Optimizer safety (:meth:`HAT.step`, :meth:`HAT.attach`): see :mod:`hatnorm._hat_optimizer`.

Cost. Multipliers are fixed at task start; binary ones (HAT's, with binarized masks) are kept as bool
tensors, one byte per parameter, and also serve as the restore mask.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from hatnorm._checks import check_non_negative, check_positive, check_scale, check_task, check_task_loss
from hatnorm._gate import HATGate, anneal_scale, compensation_factor, hat_gate
from hatnorm._hat_optimizer import OptimizerSafety
from hatnorm._heads import TaskHeads
from hatnorm._masks import MaskSource, MaskState
from hatnorm._norm_protocol import MaskedNorm
from hatnorm._policies import GradientPolicy, create_policy
from hatnorm._protected import Protected
from hatnorm._shards import gathered, is_sharded, local, local_part, reshard, whole
from hatnorm._step_policy import StepPolicy, Wiring


@dataclass(frozen=True)
class Layer:
    """How one module connects to the gates.

    Attributes:
        module: a weighted layer (``weight`` of shape ``[out, in/groups, *kernel]``, optional ``bias``
            ``[out]``, as in ``nn.Linear`` and ``nn.Conv*d``), a :class:`MaskedNorm`, or any
            :class:`~hatnorm.Protected` module (which reports its own multipliers).
        out: the units of the module's output: the gate that follows it.
        inp: the units of a weighted layer's input: the gate before it, or a
            :class:`~hatnorm.blocks.Residual`, :class:`~hatnorm.blocks.Flatten` or :class:`~hatnorm.blocks.Concat` of
            gates; ``None`` when the input is data (only the output side protects the layer). Unused for
            norms and other :class:`~hatnorm.Protected` modules.
    """

    module: nn.Module
    out: MaskSource
    inp: MaskSource | None = None


#: a parameter with more entries than this whose multipliers are all 0 or 1 keeps them as a bool mask
_FILL_ABOVE = 1 << 16


class HATModule(nn.Module, ABC):
    """A model that knows its own wiring, so ``HAT(model)`` needs no ``layers`` argument."""

    @abstractmethod
    def hat_layers(self) -> list[Layer]:
        """Every weighted layer and norm of the model with the masks of its output and input units."""

    def head_units(self) -> MaskSource | None:
        """The units the task heads read. :func:`hatnorm.export` removes a task's unused units only when the
        model says this; ``None`` (the default) keeps every unit."""
        return None

    def only_in_training(self) -> list[str]:
        """The paths of the submodules only the training forward runs (auxiliary classifiers), which
        :func:`hatnorm.export` removes; none by default."""
        return []


def _weight_rate(policy: GradientPolicy, weight: Tensor, out: MaskState, inp: MaskState | None, groups: int) -> Tensor:
    if inp is not None and groups > 1:
        # grouped conv: output unit i reads the input units of its group, [out, in/groups]
        per_group = weight.shape[0] // groups
        inp = MaskState(
            cumulative=inp.cumulative.view(groups, -1).repeat_interleave(per_group, 0),
            summative=inp.summative.view(groups, -1).repeat_interleave(per_group, 0),
        )
    rate = policy.weight_rate(out, inp)
    return rate.reshape(*rate.shape, *([1] * (weight.dim() - 2))).expand(weight.shape)


class HAT(OptimizerSafety):
    """Hard Attention to the Task (Serrà et al. 2018) over a model with :class:`HATGate` gates.

    Args:
        model: the network; its forward takes ``task=`` and, while training, ``s=``. A
            ``DistributedDataParallel`` wrapper is unwrapped: HAT works on (and ``HAT.model`` is) the
            inner module, whose gradients DDP has already averaged when :meth:`protect` runs. A model
            sharded with FSDP2 (:func:`hatnorm.distributed.fully_shard`, before this call) is protected
            on each rank's shards (docs/reliability.md, "FSDP2").
        layers: the wiring of every weighted layer and norm; omitted when ``model`` is a
            :class:`HATModule`.
        c: the capacity-regulariser weight [0.75].
        policy: a registered gradient-policy name (``"hat"``, ``"adahat"``, ``"fg_adahat"``) or a
            :class:`GradientPolicy` [``"hat"``]. A :class:`~hatnorm.policies.StepPolicy` (FG-AdaHAT, AdaHAT's reference
            form) adjusts gradients at every :meth:`protect` and reads every :meth:`step`; it serves one HAT.
        clamp: embeddings are clamped to [−clamp, clamp] after every step [6].
        thres_cosh: the clamp of s·e in the compensation [50].
        reference: reproduce Serrà et al.'s code where it differs from the paper: the scale anneals over
            the sample index (the last batch of an epoch stays below s_max), every task's embeddings are
            clamped after each step (not only the active task's), and the masks are soft, so the model's
            gates must not binarize (``hatnorm.build(..., reference=True)``) [False].

    Raises:
        ValueError: when a trainable parameter is neither protected by a mask nor owned by one task
            (naming it), or the gates disagree on ``s_max`` or the number of tasks.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[Layer] | None = None,
        *,
        c: float = 0.75,
        policy: str | GradientPolicy = "hat",
        clamp: float = 6.0,
        thres_cosh: float = 50.0,
        reference: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        reshard(model)  # a model sharded with fully_shard: its sharded parameters, the ones the optimizer steps
        if layers is None:
            if not isinstance(model, HATModule):
                raise ValueError("layers must be given unless model is a HATModule (which lists its own), "
                                 f"got layers=None for a {type(model).__name__}")
            layers = model.hat_layers()
        if not isinstance(layers, Sequence) or isinstance(layers, str):
            raise TypeError(f"layers must be a sequence of hatnorm.blocks.Layer, got {type(layers).__name__}")
        self.c = check_non_negative(c, "c")
        self.clamp = check_positive(clamp, "clamp")
        self.thres_cosh = check_positive(thres_cosh, "thres_cosh")
        if isinstance(policy, str):
            policy = create_policy(policy)
        elif not isinstance(policy, GradientPolicy):
            raise TypeError(f"policy must be a registered policy name or a GradientPolicy, got {policy!r}")
        self.policy = policy
        self.model = model
        self.gates = [m for m in model.modules() if isinstance(m, HATGate)]
        if not self.gates:
            raise ValueError("model must contain at least one HATGate, found none")
        if not isinstance(reference, bool):
            raise TypeError(f"reference must be a bool, got {reference!r}")
        if reference and any(g.binarize for g in self.gates):
            binarizing = [n for n, m in model.named_modules() if isinstance(m, HATGate) and m.binarize]
            raise ValueError(f"reference=True reproduces Serrà et al.'s soft masks, but gates {binarizing[:3]}"
                             f"{' ...' if len(binarizing) > 3 else ''} binarize; build the model with "
                             "hatnorm.build(..., reference=True) or its gates with HATGate(binarize=False)")
        self.reference = reference
        self.s_max = self._agree("s_max", {g.s_max for g in self.gates})
        self.num_tasks = self._agree("num_tasks", {g.num_tasks for g in self.gates} | {
            m.num_tasks for m in model.modules() if isinstance(m, MaskedNorm | TaskHeads)})
        self.layers = tuple(self._check_layer(i, layer) for i, layer in enumerate(layers))
        self.task: int | None = None
        self.learned_tasks: list[int] = []
        self._names = {id(p): n for n, p in model.named_parameters()}
        # the optimizers attach() hooked, with their hooks' handles
        self._attached: list[tuple[torch.optim.Optimizer, tuple[RemovableHandle, RemovableHandle]]] = []
        self._restore = False
        self._check_coverage()
        self._reset_task_state()
        if isinstance(self.policy, StepPolicy):
            self.policy.wire(self._wiring())

    @staticmethod
    def _agree(name: str, values: set) -> object:
        if len(values) != 1:
            raise ValueError(f"{name}: every gate, norm and head of the model must use the same {name}, "
                             f"got {sorted(values)}")
        return values.pop()

    def _check_layer(self, i: int, layer: Layer) -> Layer:
        where = f"layers[{i}]"
        if not isinstance(layer, Layer):
            raise TypeError(f"{where} must be a hatnorm.blocks.Layer, got {type(layer).__name__}")
        module, out, inp = layer.module, layer.out, layer.inp
        if not any(m is module for m in self.model.modules()):
            raise ValueError(f"{where}.module must be a submodule of model, got a {type(module).__name__} "
                             "that is not in it")
        if not isinstance(out, MaskSource) or (inp is not None and not isinstance(inp, MaskSource)):
            raise TypeError(f"{where}.out and .inp must be gates or mask sources (inp may be None), "
                            f"got {type(out).__name__} and {type(inp).__name__}")
        if isinstance(module, MaskedNorm) and out.num_features != module.num_features:
            raise ValueError(f"{where}.out has {out.num_features} units but the norm has "
                             f"{module.num_features} features")
        if isinstance(module, Protected):
            return layer
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() < 2:
            raise TypeError(f"{where}.module must be a Protected module (e.g. a MaskedNorm) or a weighted layer "
                            f"with a weight [out, in, ...], got {type(module).__name__}")
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            raise TypeError(f"{where}.module: transposed convolutions ({type(module).__name__}) store weights "
                            "[in, out, ...] and are not supported; allowed: nn.Linear, nn.Conv1d/2d/3d")
        if weight.shape[0] != out.num_features:
            raise ValueError(f"{where}.out has {out.num_features} units but the layer has {weight.shape[0]} outputs")
        groups = getattr(module, "groups", 1)
        if inp is not None and inp.num_features != weight.shape[1] * groups:
            raise ValueError(f"{where}.inp has {inp.num_features} units but the layer reads "
                             f"{weight.shape[1] * groups} input features")
        return layer

    def _multipliers(self, task: int) -> Iterator[tuple[nn.Parameter, Tensor]]:
        """Every trainable parameter the method governs, with its gradient multiplier for ``task``."""
        for layer in self.layers:
            module = layer.module
            out = layer.out.state()
            if isinstance(module, Protected):
                params = dict(module.named_parameters())
                for name, mult in module.gradient_multipliers(out, task, self.policy).items():
                    yield params[name], mult
                continue
            inp = None if layer.inp is None else layer.inp.state()
            yield module.weight, _weight_rate(self.policy, module.weight, out, inp, getattr(module, "groups", 1))
            if getattr(module, "bias", None) is not None:
                yield module.bias, self.policy.unit_rate(out)
        for task_heads in (m for m in self.model.modules() if isinstance(m, TaskHeads)):
            params = dict(task_heads.named_parameters())
            for name, mult in task_heads.gradient_multipliers(task).items():
                yield params[name], mult
        for gate in self.gates:
            own = torch.zeros_like(gate.embedding)
            own[task] = 1
            yield gate.embedding, own

    def _wiring(self) -> Wiring:
        """What a per-step policy reads of the model: its layers, gates, and the heads with the units they read."""
        units = self.model.head_units() if isinstance(self.model, HATModule) else None
        task_heads = () if units is None else tuple((h, units) for h in self.model.modules()
                                                    if isinstance(h, TaskHeads))
        return Wiring(self.model, tuple((layer.module, layer.out, layer.inp) for layer in self.layers),
                      tuple(self.gates), task_heads)

    def _check_coverage(self) -> None:
        # a model sharded with fully_shard: its modules compute multipliers over whole parameters
        with gathered(self.model), torch.no_grad():
            covered = {id(p) for p, _ in self._multipliers(0)}
            loose = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in covered]
        if loose:
            raise ValueError(f"model: trainable parameters neither protected by a mask nor owned by one task: "
                             f"{loose}; wire their modules in layers (hatnorm.blocks.Layer) or freeze them")

    def _reset_task_state(self) -> None:
        # parameters with multipliers other than 0 and 1, and theirs
        self._params: list[nn.Parameter] = []
        self._mults: list[Tensor] = []
        # parameters with an entry whose multiplier is 0, and the bool mask of those entries
        self._frozen: list[nn.Parameter] = []
        self._drop: list[Tensor] = []
        # the frozen parameters with large 0/1 multipliers, by index in _frozen: their gradients are filled
        self._filled: list[int] = []
        self._snapshots: list[Tensor] = []
        self._free: list[Tensor] = []
        self._free_total = 1.0
        self._free_flat: Tensor | None = None
        self._rows: list[Tensor | None] = []
        # each gate's masks as begin_task read them: (version, values) of cumulative, then of summative
        self._masks: list[tuple[int, Tensor, int, Tensor]] = []

    def begin_task(self, task: int) -> None:
        """Start training ``task``: fix its gradient multipliers and the regulariser's weights.

        Raises:
            ValueError: ``task`` out of range or already learned.
            RuntimeError: another task is still being trained.
        """
        task = check_task(task, self.num_tasks)
        if self.task is not None:
            raise RuntimeError(f"task {self.task} is still being trained; call end_task() before begin_task({task})")
        if task in self.learned_tasks:
            raise ValueError(f"task must be a task not learned yet, got {task}; learned: {self.learned_tasks}")
        merged: dict[int, tuple[nn.Parameter, Tensor]] = {}
        # a model sharded with fully_shard computes its multipliers over its whole parameters; they are then cut to
        # the local shards of the sharded parameters of the same names, which the optimizer steps
        with gathered(self.model), torch.no_grad():
            names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
            for p, mult in self._multipliers(task):
                mult = mult.to(device=p.device, dtype=p.dtype).expand(p.shape)
                if id(p) in merged:  # a module used twice keeps the stricter multiplier
                    mult = torch.minimum(merged[id(p)][1], mult)
                merged[id(p)] = (p, mult.contiguous())
        params = dict(self.model.named_parameters(remove_duplicate=False))
        self._reset_task_state()
        for key, (_, mult) in merged.items():
            p = params[names[key]]
            mult = local_part(mult, p)  # a parameter sharded by FSDP2: the entries of its local shard
            if bool((mult == 1).all()):
                continue
            drop = mult == 0
            # a large 0/1 multiplier is kept as its bool mask only (a quarter of the memory), and the gradient's
            # dropped entries are filled with 0; the others go through one fused multiply
            filled = mult.numel() > _FILL_ABOVE and bool((drop | (mult == 1)).all())
            if not filled:
                self._params.append(p)
                self._mults.append(mult)
            if bool(drop.any()):
                if filled:
                    self._filled.append(len(self._frozen))
                self._frozen.append(p)
                self._drop.append(drop)
        self._free = [1 - g.cumulative for g in self.gates]
        self._free_total = max(float(sum(f.sum() for f in self._free)), 1e-12)
        # gates of one device and dtype are computed as one tensor (a few ops per step instead of a few per gate)
        together = len({(g.embedding.device, g.embedding.dtype) for g in self.gates}) == 1
        self._free_flat = torch.cat(self._free) if together else None
        # the entries of a sharded embedding's local shard that are the task's row
        own = torch.zeros(self.num_tasks, 1, dtype=torch.bool)
        own[task] = True
        self._rows = [local_part(own.to(g.embedding.device), g.embedding) if is_sharded(g.embedding) else None
                      for g in self.gates]
        self._masks = [(g.cumulative._version, g.cumulative.clone(), g.summative._version, g.summative.clone())
                       for g in self.gates]
        self.task = task
        if isinstance(self.policy, StepPolicy):
            with gathered(self.model):
                names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
                self.policy.begin_task(task, len(self.learned_tasks) + 1)
            self.policy.shard({key: params[name] for key, name in names.items()})

    def _active(self, what: str) -> int:
        if self.task is None:
            raise RuntimeError(f"{what} needs an active task; call begin_task(task) first")
        return self.task

    def scale(self, batch: int, num_batches: int) -> float:
        """The annealed scale s for batch ``batch`` (0-based) of ``num_batches`` (Serrà et al. eq. 2; their
        code's form with ``reference=True``)."""
        return anneal_scale(batch, num_batches, self.s_max, reference=self.reference)

    def regularizer(self, s: float | Tensor) -> Tensor:
        """The capacity regulariser R = Σ a^t(1 − a^{<t}) / Σ (1 − a^{<t}) over all gates (Serrà et al. eq. 6)."""
        task = self._active("regularizer")
        s = check_scale(s)
        floors = {g.floor for g in self.gates}
        if self._free_flat is not None and len(floors) == 1:
            used = (hat_gate(torch.cat([whole(g.embedding)[task] for g in self.gates]), s, floors.pop()) *
                    self._free_flat).sum()
        else:
            gates = (hat_gate(whole(g.embedding)[task], s, g.floor) for g in self.gates)
            used = sum((a * free).sum() for a, free in zip(gates, self._free, strict=True))
        return used / self._free_total

    def loss(self, task_loss: Tensor, s: float | Tensor) -> Tensor:
        """``task_loss + c·R``.

        Args:
            task_loss: the batch's task loss, a one-element floating-point tensor.
            s: the scale of the batch.

        Raises:
            TypeError: ``task_loss`` is not a one-element floating-point tensor.
            ValueError: ``task_loss`` is NaN or infinite (the batch had NaN/inf inputs or training diverged;
                not checked while ``torch.compile`` traces, so a compiled step has no graph break), or ``s``
                is not a number > 0.
            RuntimeError: no task is active.
        """
        reg = self.regularizer(s)
        return check_task_loss(task_loss) + self.c * reg

    @torch.no_grad()
    def protect(self, s: float | Tensor) -> None:
        """Protect the gradients after ``backward``: compensate the embedding gradients of the active task
        (Serrà et al. eq. 5), then multiply every governed gradient by its task multiplier: one fused
        multiply, and for a large parameter whose multipliers are all 0 or 1, a fill of its 0 entries."""
        task = self._active("protect")
        s = check_scale(s)
        self._check_masks_unchanged(task)
        gates = [g for g in self.gates if g.embedding.grad is not None and not is_sharded(g.embedding)]
        for g, rows in zip(self.gates, self._rows, strict=True):
            if rows is not None and g.embedding.grad is not None:  # sharded: the task's entries of the local shard
                e = local(g.embedding)
                local(g.embedding.grad).mul_(torch.where(
                    rows, compensation_factor(e, s, self.s_max, self.thres_cosh), torch.ones((), dtype=e.dtype)))
        if gates and self._free_flat is not None:
            factor = compensation_factor(torch.cat([g.embedding[task] for g in gates]), s, self.s_max, self.thres_cosh)
            torch._foreach_mul_([g.embedding.grad[task] for g in gates],
                                list(factor.split([g.num_features for g in gates])))
        else:
            for g in gates:
                g.embedding.grad[task] *= compensation_factor(g.embedding[task], s, self.s_max, self.thres_cosh)
        pairs = [(local(p.grad), m) for p, m in zip(self._params, self._mults, strict=True) if p.grad is not None]
        if pairs:
            grads, mults = map(list, zip(*pairs, strict=True))
            torch._foreach_mul_(grads, mults)
        for i in self._filled:
            grad = self._frozen[i].grad
            if grad is not None:
                local(grad).masked_fill_(self._drop[i], 0)
        if isinstance(self.policy, StepPolicy):
            self.policy.adjust(s)

    def _check_masks_unchanged(self, task: int) -> None:
        """Refuse to protect with multipliers computed from masks that have since been replaced.

        A tensor's version counter moves on every in-place write, ``load_state_dict`` included, and reading
        it costs nothing; only when it moved are the values compared (a reload of the same masks, as the
        trainer's restore of its best weights, is fine).
        """
        for i, (gate, (cum_version, cumulative, sum_version, summative)) in enumerate(
                zip(self.gates, self._masks, strict=True)):
            if gate.cumulative._version == cum_version and gate.summative._version == sum_version:
                continue
            if not (torch.equal(gate.cumulative, cumulative) and torch.equal(gate.summative, summative)):
                name = next(n for n, m in self.model.named_modules() if m is gate)
                raise RuntimeError(
                    f"the masks of gate {name} changed after begin_task({task}), so the gradient multipliers no "
                    "longer match them: a model state was loaded after hat.load_state_dict, or during a task. "
                    "Load the model's state first, then hat.load_state_dict(...), which begins the active task "
                    "again from the loaded masks")
            self._masks[i] = (gate.cumulative._version, cumulative, gate.summative._version, summative)

    def end_task(self) -> None:
        """Finish the active task: fold its masks into every gate's cumulative mask (binarized by default)
        and run the norms' end-of-task hooks."""
        task = self._active("end_task")
        # a model sharded with fully_shard: the masks (and a step policy's per-unit state) read whole embeddings
        with gathered(self.model):
            for g in self.gates:
                g.consolidate(task)
            if isinstance(self.policy, StepPolicy):
                self.policy.end_task(task)
        for layer in self.layers:
            if isinstance(layer.module, MaskedNorm):
                layer.module.end_task(task)
        self.learned_tasks.append(task)
        self.task = None
        self._reset_task_state()

    def gradient_multipliers(self) -> dict[str, Tensor]:
        """The multipliers of the active task by parameter name; parameters left out keep their raw gradient, except
        those a :class:`~hatnorm.policies.StepPolicy` governs, whose rates change every step
        (``hat.policy.rates(s)``). For a parameter sharded by ``fully_shard``, the multipliers of this rank's
        local shard."""
        self._active("gradient_multipliers")
        filled = {self._names[id(self._frozen[i])]: (~self._drop[i]).to(self._frozen[i].dtype) for i in self._filled}
        return {self._names[id(p)]: m for p, m in zip(self._params, self._mults, strict=True)} | filled

    def state_dict(self) -> dict[str, Any]:
        """What the model's own ``state_dict`` leaves out: the learned tasks and the active task (or ``None``), and
        a :class:`~hatnorm.policies.StepPolicy`'s state under ``"policy"``."""
        state: dict[str, Any] = {"learned_tasks": list(self.learned_tasks), "task": self.task}
        if isinstance(self.policy, StepPolicy):
            state["policy"] = self.policy.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` after the model's state is loaded (an active task is begun again: its
        multipliers come from the restored masks, as when it began).

        Raises:
            ValueError: a learned task out of range or repeated, or an active task out of range or learned.
        """
        learned, task = state["learned_tasks"], state["task"]
        if not isinstance(learned, list) or len(set(learned)) != len(learned):
            raise ValueError(f"state['learned_tasks'] must be a list of distinct tasks, got {learned!r}")
        learned = [check_task(t, self.num_tasks, "state['learned_tasks'][i]") for t in learned]
        if task is not None and check_task(task, self.num_tasks, "state['task']") in learned:
            raise ValueError(f"state['task'] must be a task not learned yet, got {task}; learned: {learned}")
        if isinstance(self.policy, StepPolicy):
            if not isinstance(state.get("policy"), dict):
                raise ValueError(f"state['policy'] must hold the state of the {type(self.policy).__name__} (a dict), "
                                 f"got {state.get('policy')!r}")
            self.policy.load_state_dict(state["policy"])
        self.task = None
        self.learned_tasks = learned
        self._reset_task_state()
        if task is not None:
            self.begin_task(task)

"""Gradient policies whose rates change every step, and the soft rate α/(c·Î + α) that AdaHAT and FG-AdaHAT share.

A :class:`StepPolicy` leaves the multipliers HAT fixes at task start alone (its static rate is 1) and is
called by :class:`hatnorm.HAT` at every step instead: :meth:`StepPolicy.adjust` from ``protect`` (after
backward), :meth:`StepPolicy.after_step` from ``step`` (after the optimizer), :meth:`StepPolicy.end_task`
after the masks of the task are folded in. Heads and embeddings keep HAT's own multipliers (a head and an
embedding row belong to one task).

:class:`SoftRatePolicy` is the rate of AdaHAT (Wang et al. 2024, eq. 9, as their code computes it) and of
FG-AdaHAT: a gradient entry keeps a = α/(c_l·Î + α) of itself, where Î is a per-entry importance fixed for
the task (aggregated from the importances of the entry's output and input units) and c_l a per-layer
coefficient that may read the layer's network sparsity R_l of this step:
R_l = Σ_i a_i(1 − c_i) / Σ_i (1 − c_i) over the units of the layer's gate (a: this step's soft gate,
c: the cumulative mask), 0 when 10 or fewer units are free (the reference's threshold).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

import torch
from torch import Tensor, nn

from hatnorm._checks import check_positive, check_scale
from hatnorm._gate import HATGate, hat_gate
from hatnorm._heads import TaskHeads
from hatnorm._masks import MaskSource, MaskState
from hatnorm._norm_protocol import MaskedNorm
from hatnorm._policies import GradientPolicy
from hatnorm._protected import Protected
from hatnorm._shards import local, local_part, whole
from hatnorm._unit_maps import gates_of, gather

#: how the importances of a weight's output unit i and input unit j combine into the weight's
AGGREGATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "min": torch.minimum,
    "max": torch.maximum,
    # the reference calls torch.mean(a, b), which raises; the mean of the two is what the name says
    "mean": lambda a, b: (a + b) / 2,
}

#: a layer with this many free units or fewer has network sparsity 0 (the reference's threshold)
FEWEST_FREE_UNITS = 10


@dataclass(frozen=True)
class Wiring:
    """What a per-step policy sees of the model :class:`hatnorm.HAT` protects.

    Attributes:
        model: the protected model.
        layers: every wired module with the mask sources of its output and input units (as ``hatnorm.blocks.Layer``).
        gates: every gate of the model, in module order.
        task_heads: the task heads whose input units the model names (``HATModule.head_units``), with those units.
    """

    model: nn.Module
    layers: tuple[tuple[nn.Module, MaskSource, MaskSource | None], ...]
    gates: tuple[HATGate, ...]
    task_heads: tuple[tuple[TaskHeads, MaskSource], ...]


class StepPolicy(GradientPolicy):
    """A gradient policy whose rates depend on per-step state; :class:`hatnorm.HAT` drives its hooks."""

    _wiring: Wiring | None = None

    @final
    def rate(self, cumulative: Tensor, summative: Tensor, free: float) -> Tensor:
        """1: the parameters a step policy governs keep their gradient at task start; :meth:`adjust` scales it."""
        return torch.ones_like(cumulative, dtype=torch.promote_types(cumulative.dtype, torch.float32))

    @property
    def wiring(self) -> Wiring:
        """The model this policy is wired to (set by :class:`hatnorm.HAT`)."""
        if self._wiring is None:
            raise RuntimeError("this policy is not wired to a model yet; pass it to hatnorm.HAT(model, policy=...)")
        return self._wiring

    def wire(self, wiring: Wiring) -> None:
        """Bind the policy to a model; called once by :class:`hatnorm.HAT`.

        Raises:
            ValueError: the policy is already wired to another model (a per-step policy keeps state per unit).
        """
        if self._wiring is not None and self._wiring.model is not wiring.model:
            raise ValueError("policy: this per-step policy already serves another model (it keeps state per unit); "
                             "give each HAT its own policy instance")
        self._wiring = wiring

    @abstractmethod
    def begin_task(self, task: int, position: int) -> None:
        """Called by ``HAT.begin_task``.

        Args:
            task: the task id.
            position: the task's place in the sequence, 1 for the first task trained.
        """

    def shard(self, params: dict[int, nn.Parameter]) -> None:
        """Point the state :meth:`begin_task` built at the parameters the optimizer steps (called by
        ``HAT.begin_task``).

        Under ``fully_shard``, :meth:`begin_task` runs with the model's parameters gathered whole; ``params`` maps
        the ``id`` of each whole parameter to the sharded parameter of the same name (to itself in a model nobody
        sharded). A policy that keeps per-entry state cuts it to the local shard (``hatnorm._shards.local_part``);
        one that keeps none does nothing, the default.
        """

    @abstractmethod
    def rates(self, s: float | Tensor) -> dict[nn.Parameter, Tensor]:
        """The rate of every governed parameter at this step's scale ``s``, each broadcastable to the parameter
        (to its local shard for a parameter sharded by ``fully_shard``)."""

    @torch.no_grad()
    def adjust(self, s: float | Tensor) -> None:
        """Multiply the gradients of the governed parameters by their rates (called by ``HAT.protect``)."""
        for p, rate in self.rates(s).items():
            if p.grad is not None:
                local(p.grad).mul_(rate)

    def after_step(self) -> None:
        """Called by ``HAT.step`` after ``optimizer.step()``."""

    def end_task(self, task: int) -> None:
        """Called by ``HAT.end_task`` after the gates' masks took in ``task``."""

    def state_dict(self) -> dict[str, Any]:
        """What the policy keeps across tasks, for checkpoints (lists and dicts of tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class _Probe(GradientPolicy):
    """Hands fixed per-unit values to a :class:`Protected` module, to see where its parameters use the policy."""

    def __init__(self, values: Tensor) -> None:
        self.values = values

    def rate(self, cumulative: Tensor, summative: Tensor, free: float) -> Tensor:
        return self.values

    def unit_rate(self, out: MaskState) -> Tensor:
        return self.values


def protected_importance(module: Protected, out: MaskSource, task: int, unit: Tensor) -> dict[str, Tensor]:
    """The per-entry importance of the parameters of ``module`` that the policy governs, from one value per unit.

    A :class:`Protected` module maps its policy's per-unit rate onto its parameters (``gradient_multipliers``);
    the entries that take the policy's value are those that change when the policy's value does (the others are
    owned by one task). Those entries get the value mapped from ``unit``; a parameter none of whose entries uses
    the policy is left out.
    """
    state = out.state()
    zeros = module.gradient_multipliers(state, task, _Probe(torch.zeros_like(unit)))
    ones = module.gradient_multipliers(state, task, _Probe(torch.ones_like(unit)))
    mapped = module.gradient_multipliers(state, task, _Probe(unit))
    found = {}
    for name, value in mapped.items():
        uses_policy = zeros[name] != ones[name]
        if bool(uses_policy.any()):
            found[name] = torch.where(uses_policy, value, torch.zeros((), dtype=value.dtype, device=value.device))
    return found


@dataclass(frozen=True)
class _Entry:
    param: nn.Parameter
    importance: Tensor  # Î, broadcastable to the parameter
    layer: tuple[int, ...]  # the gates whose soft gates give the layer's network sparsity


#: a per-unit factor of Î: the values by gate, how a weight combines its two units, an offset added after that
Factor = tuple[dict[HATGate, Tensor], str, float]


class SoftRatePolicy(StepPolicy):
    """The rate a = α/(c_l·Î + α) of every governed gradient entry (module docstring).

    Args:
        alpha: the adjustment intensity α, > 0.
        aggregation: how a weight's importance comes from its output and input units: ``"min"``, ``"max"`` or
            ``"mean"``.
        norms: adjust the γ/β of masked norms (and of every other :class:`Protected` module's shared per-unit
            parameters); a unit of a norm is a unit of its gate, so γ_i/β_i take unit i's importance, as a bias
            does. ``False`` leaves norms' shared parameters free, as the reference does.
    """

    def __init__(self, alpha: float, aggregation: str = "min", norms: bool = True) -> None:
        self.alpha = check_positive(alpha, "alpha")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {aggregation!r}")
        if not isinstance(norms, bool):
            raise TypeError(f"norms must be a bool, got {norms!r}")
        self.aggregation = aggregation
        self.norms = norms
        self.task: int | None = None
        self.position = 0
        self._entries: list[_Entry] = []
        self._free: list[Tensor] = []
        self._free_units: dict[tuple[int, ...], float] = {}

    @abstractmethod
    def factors(self) -> list[Factor]:
        """The per-unit quantities whose aggregated product is Î for the active task."""

    @abstractmethod
    def coefficient(self, sparsity: Tensor) -> Tensor | float:
        """c_l from the layer's network sparsity R_l (a 0-d tensor) at this step."""

    def begin_task(self, task: int, position: int) -> None:
        self.task, self.position = task, position
        gates = self.wiring.gates
        index = {id(g): i for i, g in enumerate(gates)}
        with torch.no_grad():
            self._free = [1 - g.cumulative for g in gates]
            entries = []
            factors = self.factors()
            for module, out, inp in self.wiring.layers:
                layer = tuple(index[id(g)] for g in gates_of(out))
                entries += [_Entry(p, imp, layer) for p, imp in self._layer_importance(module, out, inp, factors)]
            self._entries = entries
            self._free_units = {e.layer: float(sum(self._free[i].sum() for i in e.layer)) for e in entries}

    def shard(self, params: dict[int, nn.Parameter]) -> None:
        with torch.no_grad():
            self._entries = [_Entry(params[id(e.param)], local_part(e.importance, params[id(e.param)]), e.layer)
                             for e in self._entries]

    def _layer_importance(self, module: nn.Module, out: MaskSource, inp: MaskSource | None,
                          factors: list[Factor]) -> list[tuple[nn.Parameter, Tensor]]:
        outs = [gather(out, values) + offset for values, _, offset in factors]
        unit = torch.stack(outs).prod(0)
        if isinstance(module, Protected):
            if isinstance(module, MaskedNorm) and not self.norms:
                return []
            params = dict(module.named_parameters())
            return [(params[name], imp.to(params[name])) for name, imp in
                    protected_importance(module, out, self.task, unit).items()]
        weight = module.weight
        if inp is None:  # the layer reads data: only its output units count (the reference's first layer)
            w = unit[:, None]
        else:
            groups = getattr(module, "groups", 1)
            terms = []
            for values, agg, offset in factors:
                i = gather(inp, values)
                # output unit k reads the input units of its group: [out, in/groups]
                i = i.view(groups, -1).repeat_interleave(weight.shape[0] // groups, 0) if groups > 1 else i[None, :]
                terms.append(AGGREGATIONS[agg](gather(out, values)[:, None], i) + offset)
            w = torch.stack(torch.broadcast_tensors(*terms)).prod(0)
        w = w.reshape(*w.shape, *([1] * (weight.dim() - w.dim()))).to(weight)
        found = [(weight, w)]
        if getattr(module, "bias", None) is not None:
            found.append((module.bias, unit.to(module.bias)))
        return found

    def sparsities(self, s: float | Tensor) -> dict[tuple[int, ...], Tensor]:
        """The network sparsity R_l of every governed layer at scale ``s``, keyed by the indices of its gates."""
        s = check_scale(s)
        gates = self.wiring.gates
        with torch.no_grad():
            used = [(hat_gate(whole(g.embedding)[self.task], s, g.floor) * free).sum() for g, free in zip(
                gates, self._free, strict=True)]
        found = {}
        for layer, free in self._free_units.items():
            total = sum(used[i] for i in layer)
            found[layer] = total / free if free > FEWEST_FREE_UNITS else torch.zeros_like(used[layer[0]])
        return found

    def rates(self, s: float | Tensor) -> dict[nn.Parameter, Tensor]:
        if self.task is None:
            raise RuntimeError("rates needs an active task; HAT.begin_task(task) starts one")
        coefficients = {layer: self.coefficient(r) for layer, r in self.sparsities(s).items()}
        found: dict[nn.Parameter, Tensor] = {}
        with torch.no_grad():
            for e in self._entries:
                # α/(c·Î + α), one allocation
                rate = torch.mul(e.importance, coefficients[e.layer]).add_(self.alpha).reciprocal_().mul_(self.alpha)
                # a module wired twice keeps the stricter rate
                found[e.param] = torch.minimum(found[e.param], rate) if e.param in found else rate
        return found

    def end_task(self, task: int) -> None:
        self.task = None
        self._entries = []

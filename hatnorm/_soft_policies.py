"""AdaHAT as its authors' code runs it, and FG-AdaHAT: soft protection with per-step network sparsity.

Both keep a = α/(c_l·Î + α) of every governed gradient entry (:class:`hatnorm.policies.SoftRatePolicy`). AdaHAT's Î is
the number of earlier tasks that used the entry (the summative mask, min over its two units) and
c_l = ε + R_l. FG-AdaHAT's Î is a learned importance: every step, every gate unit gets an importance (weights,
gradients, activations: :data:`hatnorm.policies.IMPORTANCE_TYPES`), min–max normalised over the gate and multiplied by
the step's soft gate; a task's importance is the mean over its steps plus b_I; the importances of the learned
tasks are summed by a strategy, and c_l follows a scheduler. See docs/concepts.md, "Gradient policies", for
every difference from the reference code (CLArena).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hatnorm._attribution import ATTRIBUTIONS, AttributionImportance, load_captum
from hatnorm._checks import check_non_negative, check_positive
from hatnorm._gate import HATGate, hat_gate
from hatnorm._importance import TYPES, UnitImportance, normalize
from hatnorm._policies import AdaHATPolicy, GradientPolicy, register_policy
from hatnorm._shards import whole
from hatnorm._step_policy import Factor, SoftRatePolicy, Wiring

ADAHAT_MODES = ("adahat", "adahat_no_sum", "adahat_no_reg")


class AdaHATReferencePolicy(SoftRatePolicy):
    """AdaHAT as CLArena runs it (``AdaHAT.clip_grad_by_adjustment``): R_l from every step's soft gates.

    Modes: ``"adahat"``: a = r/(Î + r) with r = α/(ε + R_l) and Î = min of the summative masks of the entry's
    two units; ``"adahat_no_sum"``: Î = t, the task's place in the sequence (1 for the first), for every entry;
    ``"adahat_no_reg"``: R_l replaced by 0.

    Args:
        alpha: α [1e-6, the paper's].
        epsilon: ε [0.1].
        mode: one of ``"adahat"``, ``"adahat_no_sum"``, ``"adahat_no_reg"`` [``"adahat"``].
        norms: adjust shared γ/β of masked norms like biases of their gate's units [True]; ``False``: free, as
            the reference leaves BatchNorm.
    """

    def __init__(self, alpha: float = 1e-6, epsilon: float = 0.1, mode: str = "adahat", norms: bool = True) -> None:
        super().__init__(alpha, "min", norms)
        self.epsilon = check_positive(epsilon, "epsilon")
        if mode not in ADAHAT_MODES:
            raise ValueError(f"mode must be one of {list(ADAHAT_MODES)}, got {mode!r}")
        self.mode = mode

    def factors(self) -> list[Factor]:
        gates = self.wiring.gates
        if self.mode == "adahat_no_sum":
            return [({g: torch.full_like(g.summative, self.position) for g in gates}, "min", 0.0)]
        return [({g: g.summative for g in gates}, "min", 0.0)]

    def coefficient(self, sparsity: Tensor) -> Tensor | float:
        return self.epsilon if self.mode == "adahat_no_reg" else self.epsilon + sparsity


@register_policy("adahat")
def adahat(alpha: float | None = None, epsilon: float = 0.1, *, reference: bool = False, mode: str = "adahat",
           norms: bool = True) -> GradientPolicy:
    """AdaHAT: hatnorm's task-start form (:class:`hatnorm.policies.AdaHATPolicy`, α = 0.1), or with
    ``reference=True`` the form of the authors' code (:class:`hatnorm.policies.AdaHATReferencePolicy`, α = 1e-6,
    per-step sparsity, ``mode``).

    Args:
        alpha: α [0.1; 1e-6 with ``reference=True``].
        epsilon: ε [0.1].
        reference: the per-step form of the reference code [False].
        mode: ``reference=True`` only: ``"adahat"``, ``"adahat_no_sum"`` or ``"adahat_no_reg"``.
        norms: ``reference=True`` only: adjust shared γ/β of masked norms [True].
    """
    if not isinstance(reference, bool):
        raise TypeError(f"reference must be a bool, got {reference!r}")
    if reference:
        return AdaHATReferencePolicy(1e-6 if alpha is None else alpha, epsilon, mode, norms)
    if mode != "adahat" or norms is not True:
        raise ValueError(f"mode and norms apply to reference=True only, got mode={mode!r}, norms={norms!r} with "
                         "reference=False (the task-start form adjusts norms like biases)")
    return AdaHATPolicy(0.1 if alpha is None else alpha, epsilon)


#: summing strategy → weight of task τ's importance after task t (1-based), from the options
_ADD = ("add_latest", "add_all", "add_average")
_DECREASE = {
    "linear_decrease": lambda t, tau, o: o["linear_step"] * (t - tau) + 1,
    "quadratic_decrease": lambda t, tau, o: (t - tau + 1) ** 2,
    "cubic_decrease": lambda t, tau, o: (t - tau + 1) ** 3,
    "exponential_decrease": lambda t, tau, o: o["exponential_rate"] ** (t - tau + 1),
    # the reference's log_a(t − τ) + 1 is −inf for τ = t; shifted by one like the others
    "log_decrease": lambda t, tau, o: math.log(t - tau + 1, o["log_base"]) + 1,
    "factorial_decrease": lambda t, tau, o: math.factorial(t - tau + 1),
}
SUMMING_STRATEGIES = (*_ADD, *_DECREASE)
_STRATEGY_OPTION = {"linear_decrease": "linear_step", "exponential_decrease": "exponential_rate",
                    "log_decrease": "log_base"}
SCHEDULERS = ("linear_sparsity_reg", "sparsity_reg", "summative_mask_sparsity_reg")


def summing_weights(strategy: str, t: int, *, reference: bool = False, **options: float) -> tuple[float, list[float]]:
    """How a summing strategy updates the summed importance S after task ``t``: S ← keep·S + Σ_τ w_τ·I^τ.

    Returns:
        ``(keep, [w_1, …, w_t])``. The ``add_*`` strategies keep S (the reference's ``add_all`` adds every
        importance again each task, so task τ weighs t − τ + 1 after task t); the ``*_decrease`` ones recompute
        S from the weights their code intends, or with ``reference=True`` as the reference's code computes
        them: only the latest task, with its weight.
    """
    if strategy == "add_latest":
        return 1.0, [0.0] * (t - 1) + [1.0]
    if strategy == "add_all":
        return 1.0, [1.0] * t
    if strategy == "add_average":
        return 1.0, [1.0 / t] * t
    weight = _DECREASE[strategy]
    if reference:
        return 0.0, [0.0] * (t - 1) + [float(weight(t, t, options))]
    return 0.0, [float(weight(t, tau, options)) for tau in range(1, t + 1)]


@register_policy("fg_adahat")
class FGAdaHATPolicy(SoftRatePolicy):
    """FG-AdaHAT: AdaHAT with a learned, fine-grained importance of every unit in place of the summative mask.

    The defaults are the paper's configuration (``fgadahat.yaml``): IG importance, ``add_all``,
    ``linear_sparsity_reg``, min aggregation, α = 1.5e-7, b_I = 1e-8, b_R = 0.1, b_L = 5. Rates of order α
    matter together with Adam's ε (1e-8), as in the paper; with SGD they freeze a used entry almost entirely.

    Args:
        alpha: α [1.5e-7].
        importance: the per-step importance type, a key of :data:`hatnorm.policies.IMPORTANCE_TYPES`, or of
            :data:`hatnorm.policies.ATTRIBUTION_TYPES` (computed with Captum, the ``captum`` extra)
            [``"input_weight_gradient_abs_sum"``].
        summing: how the importances of the learned tasks are summed: ``add_latest``, ``add_all``,
            ``add_average`` or a ``*_decrease`` strategy [``"add_all"``].
        scheduler: c_l: ``"linear_sparsity_reg"`` (R_l + b_R)(t + b_L), ``"sparsity_reg"`` R_l + b_R, or
            ``"summative_mask_sparsity_reg"`` (min of the entry's summative masks + b_L)(R_l + b_R)
            [``"linear_sparsity_reg"``].
        aggregation: ``"min"``, ``"max"`` or ``"mean"`` from units to weights [``"min"``].
        base_importance: b_I, added to every task's importance, ≥ 0 [1e-8].
        base_sparsity: b_R, > 0 [0.1].
        base_linear: b_L, ≥ 0 [5].
        filter_by_cumulative_mask: multiply Î by the cumulative mask of the entry (min of its units) [False].
        filter_unmasked_importance: multiply a task's importance by its binary mask at task end [False].
        multiply_gate: multiply every step's normalised importance by the step's soft gate [True].
        reference_decrease: the ``*_decrease`` strategies as the reference's code computes them (latest task
            only) rather than as it intends [False].
        linear_step: ``linear_decrease``'s step.
        exponential_rate: ``exponential_decrease``'s rate.
        log_base: ``log_decrease``'s base.
        norms: adjust shared γ/β of masked norms with their gate's importance [True]; ``False`` leaves them
            free, as the reference leaves BatchNorm.
    """

    def __init__(
        self,
        alpha: float = 1.5e-7,
        importance: str = "input_weight_gradient_abs_sum",
        summing: str = "add_all",
        scheduler: str = "linear_sparsity_reg",
        aggregation: str = "min",
        *,
        base_importance: float = 1e-8,
        base_sparsity: float = 0.1,
        base_linear: float = 5.0,
        filter_by_cumulative_mask: bool = False,
        filter_unmasked_importance: bool = False,
        multiply_gate: bool = True,
        reference_decrease: bool = False,
        linear_step: float | None = None,
        exponential_rate: float | None = None,
        log_base: float | None = None,
        norms: bool = True,
    ) -> None:
        super().__init__(alpha, aggregation, norms)
        if importance not in TYPES and importance not in ATTRIBUTIONS:
            raise ValueError(f"importance must be one of {sorted(TYPES)} or, with Captum, {sorted(ATTRIBUTIONS)}, "
                             f"got {importance!r}")
        if importance in ATTRIBUTIONS:
            load_captum(importance)
        if summing not in SUMMING_STRATEGIES:
            raise ValueError(f"summing must be one of {list(SUMMING_STRATEGIES)}, got {summing!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {list(SCHEDULERS)}, got {scheduler!r}")
        for name, value in (("filter_by_cumulative_mask", filter_by_cumulative_mask), ("multiply_gate", multiply_gate),
                            ("filter_unmasked_importance", filter_unmasked_importance),
                            ("reference_decrease", reference_decrease)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self.options = {"linear_step": linear_step, "exponential_rate": exponential_rate, "log_base": log_base}
        needed = _STRATEGY_OPTION.get(summing)
        if needed is not None:
            check_positive(self.options[needed], needed)
        if summing == "log_decrease" and reference_decrease:
            raise ValueError("summing='log_decrease' has no reference form (the reference computes log(0) and "
                             "raises); use reference_decrease=False")
        if summing == "log_decrease" and log_base == 1:
            raise ValueError(f"log_base must be > 0 and ≠ 1, got {log_base!r}")
        self.importance = importance
        self.summing = summing
        self.scheduler = scheduler
        self.base_importance = check_non_negative(base_importance, "base_importance")
        self.base_sparsity = check_positive(base_sparsity, "base_sparsity")
        self.base_linear = check_non_negative(base_linear, "base_linear")
        self.filter_by_cumulative_mask = filter_by_cumulative_mask
        self.filter_unmasked_importance = filter_unmasked_importance
        self.multiply_gate = multiply_gate
        self.reference_decrease = reference_decrease
        self.summed: list[Tensor] = []  # I^{<t} per gate
        self.history: list[list[Tensor]] = []  # I^τ per learned task, per gate
        self.accumulated: list[Tensor] = []  # Σ over this task's steps of the gated, normalised importance
        self.steps = 0
        self._units: UnitImportance | AttributionImportance | None = None
        self._s: float | Tensor = 1.0
        self._gates_now: list[Tensor] | None = None
        self._resume: tuple[list[Tensor], int] | None = None  # a loaded task's accumulation, for begin_task

    def wire(self, wiring: Wiring) -> None:
        super().wire(wiring)
        if not self.summed:
            self.summed = [torch.zeros(g.num_features, dtype=g.embedding.dtype, device=g.embedding.device)
                           for g in wiring.gates]
        self._units = (AttributionImportance(self.importance, wiring.model, wiring.layers, wiring.gates)
                       if self.importance in ATTRIBUTIONS
                       else UnitImportance(self.importance, wiring.layers, wiring.gates, wiring.task_heads))

    def factors(self) -> list[Factor]:
        gates = self.wiring.gates
        found: list[Factor] = [(dict(zip(gates, self.summed, strict=True)), self.aggregation, 0.0)]
        if self.filter_by_cumulative_mask:
            found.append(({g: g.cumulative for g in gates}, "min", 0.0))
        if self.scheduler == "summative_mask_sparsity_reg":
            found.append(({g: g.summative for g in gates}, "min", self.base_linear))
        return found

    def coefficient(self, sparsity: Tensor) -> Tensor | float:
        c = sparsity + self.base_sparsity
        return c * (self.position + self.base_linear) if self.scheduler == "linear_sparsity_reg" else c

    def begin_task(self, task: int, position: int) -> None:
        super().begin_task(task, position)
        if self._resume is not None:
            self.accumulated, self.steps = self._resume
            self._resume = None
        else:
            self.accumulated = [torch.zeros_like(s) for s in self.summed]
            self.steps = 0
        self._gates_now = None
        self._units.start()

    def soft_gates(self, s: float | Tensor) -> list[Tensor]:
        """This step's soft gate σ(s·e) of every gate, for the active task."""
        with torch.no_grad():
            return [hat_gate(whole(g.embedding)[self.task], s, g.floor) for g in self.wiring.gates]

    def adjust(self, s: float | Tensor) -> None:
        super().adjust(s)
        self._s = s
        # the gate the step's importance is multiplied by is the one the forward used, before the step moves e
        self._gates_now = self.soft_gates(s) if self.multiply_gate else None

    @torch.no_grad()
    def after_step(self) -> None:
        raw = self.step_importance()
        self.accumulated = [a + u for a, u in zip(self.accumulated, raw, strict=True)]
        self.steps += 1

    def step_importance(self) -> list[Tensor]:
        """This step's importance of every gate's units: normalised, times the soft gate when ``multiply_gate``
        (call between ``HAT.step`` and the next forward; it consumes the recorded activations)."""
        if self.task is None:
            raise RuntimeError("step_importance needs an active task; HAT.begin_task(task) starts one")
        raw = self._units.compute(self.task, self._s)
        found = [normalize(raw[g]) for g in self.wiring.gates]
        if self._gates_now is not None:
            found = [u * a.to(u) for u, a in zip(found, self._gates_now, strict=True)]
        return found

    def end_task(self, task: int) -> None:
        gates: list[HATGate] = list(self.wiring.gates)
        if dist.is_available() and dist.is_initialized() and (ranks := dist.get_world_size()) > 1:
            # each rank's activations are its own share of the batch: the ranks agree on the mean of their
            # importances, or their rates, and with them their weights, part
            for accumulated in self.accumulated:
                dist.all_reduce(accumulated)
                accumulated.div_(ranks)
        importance = [a / max(self.steps, 1) + self.base_importance for a in self.accumulated]
        if self.filter_unmasked_importance:
            importance = [i * g.selection(task).to(i) for i, g in zip(importance, gates, strict=True)]
        self.history.append(importance)
        keep, weights = summing_weights(self.summing, len(self.history), reference=self.reference_decrease,
                                        **{k: v for k, v in self.options.items() if v is not None})
        self.summed = [keep * s + sum(w * h[k] for w, h in zip(weights, self.history, strict=True))
                       for k, s in enumerate(self.summed)]
        self._units.stop()
        self._gates_now = None
        super().end_task(task)

    def state_dict(self) -> dict[str, Any]:
        return {"summed": list(self.summed), "history": [list(h) for h in self.history],
                "accumulated": list(self.accumulated), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (checked whole first: a bad state changes nothing).

        Raises:
            ValueError: a key is missing, or a tensor list does not hold one tensor per gate of the gate's size.
        """
        missing = sorted({"summed", "history", "accumulated", "steps"} - set(state))
        if missing:
            raise ValueError(f"state must hold 'summed', 'history', 'accumulated' and 'steps', got no {missing}")
        sizes = [g.num_features for g in self.wiring.gates]
        lists = {"summed": state["summed"], "accumulated": state["accumulated"] or [torch.zeros(n) for n in sizes]}
        lists |= {f"history[{i}]": h for i, h in enumerate(state["history"])}
        for key, tensors in lists.items():
            if [t.numel() for t in tensors] != sizes:
                raise ValueError(f"state[{key!r}] must hold one tensor per gate with sizes {sizes}, got "
                                 f"{[t.numel() for t in tensors]}")
        self._units.stop()
        self.task = None
        self.summed = [t.clone() for t in state["summed"]]
        self.history = [[t.clone() for t in h] for h in state["history"]]
        self._resume = ([t.clone() for t in state["accumulated"]], int(state["steps"])) if state["accumulated"] \
            else None

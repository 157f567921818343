"""An independent port of the formulas of CLArena's HAT, AdaHAT and FG-AdaHAT, for the differential test.

Written from the specification (shared/references/fgadahat.md, §1–3 and §7) and the reference code
(``clarena/cl_algorithms/{hat,adahat,fgadahat}.py``, ``clarena/backbones/base.py``), over plain per-layer
tensors of a layer stack: layer k reads the output of layer k − 1 (the first reads data), the last backbone
layer feeds the task's head. It imports nothing from hatnorm. Where the reference's code fails or differs from
what it intends, the port follows what hatnorm documents (docs/concepts.md, "Gradient policies"): the ``mean``
aggregation is (a + b)/2, the summative-mask scheduler is the intended per-entry form, the decreasing summing
strategies use their intended weights unless ``reference_decrease``, and log_decrease is shifted by one.
A layer after a flatten reads ``positions`` inputs per unit of the layer before (the reference has no
flatten: its CNN ends in a global pool).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

AGG = {"min": torch.minimum, "max": torch.maximum, "mean": lambda a, b: (a + b) / 2}


@dataclass
class Stack:
    """The port's view of a network: per layer its kind (``"linear"``/``"conv"``), whether a flatten precedes it
    and how many input positions each unit of the previous layer spans there."""

    kinds: list[str]
    flatten_before: list[bool]
    positions: list[int]


def forward(stack: Stack, x: Tensor, weights: list[Tensor], biases: list[Tensor | None], gates: list[Tensor],
            head_w: Tensor, head_b: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``HATMaskMLP.forward``: per layer fc → ⊙gate → ReLU, the activation stored after the ReLU; then the head."""
    h, acts = x, []
    for kind, flat, w, b, g in zip(stack.kinds, stack.flatten_before, weights, biases, gates, strict=True):
        if flat:
            h = h.flatten(1)
        z = F.linear(h, w, b) if kind == "linear" else F.conv2d(h, w, b)
        h = F.relu(z * (g if kind == "linear" else g[None, :, None, None]))
        acts.append(h)
    return F.linear(h.flatten(1), head_w, head_b), acts


def anneal_gate(e: Tensor, s: float) -> Tensor:
    return torch.sigmoid(s * e)


def network_sparsity(gates: list[Tensor], cumulative: list[Tensor]) -> list[Tensor]:
    """``HATMaskSparsityReg.original_reg``'s R_l: Σ g(1 − c)/Σ(1 − c), 0 with 10 or fewer free units."""
    found = []
    for g, c in zip(gates, cumulative, strict=True):
        den = (1 - c).sum()
        found.append((g * (1 - c)).sum() / den if den > 10 else torch.zeros((), dtype=g.dtype))
    return found


def to_param(v: list[Tensor], k: int, stack: Stack, weight: Tensor, agg: str) -> tuple[Tensor, Tensor]:
    """``get_layer_measure_parameter_wise``: weights Agg(v_l[i], v_{k−1}[j]) (first layer: v_1[i]), bias v_l[i]."""
    out = v[k][:, None]
    if k == 0:
        w = out.expand(-1, weight.shape[1])
    else:
        w = AGG[agg](out, v[k - 1].repeat_interleave(stack.positions[k])[None, :])
    return w.reshape(*w.shape, *([1] * (weight.dim() - 2))).expand_as(weight), v[k]


def compensation(e: Tensor, s: float, s_max: float, thr: float = 50.0) -> Tensor:
    """``compensate_task_embedding_gradients``'s factor."""
    return s_max / s * (torch.cosh(torch.clamp(s * e, -thr, thr)) + 1) / (torch.cosh(e) + 1)


def hat_rates(cumulative: list[Tensor], stack: Stack, weights: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``HAT.clip_grad_by_adjustment`` mode ``hat``: 1 − C with C_w = min(c_l[i], c_{k−1}[j]), C_b = c_l[i]."""
    found = []
    for k, w in enumerate(weights):
        cw, cb = to_param(cumulative, k, stack, w, "min")
        found.append((1 - cw, 1 - cb))
    return found


def adahat_rates(mode: str, alpha: float, epsilon: float, sparsity: list[Tensor], summative: list[Tensor], t: int,
                 stack: Stack, weights: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``AdaHAT.clip_grad_by_adjustment``: a = r/(Î + r), r = α/(ε + R_l) (R_l = 0 for ``adahat_no_reg``),
    Î = min of the summative masks, or t for ``adahat_no_sum``."""
    found = []
    for k, w in enumerate(weights):
        iw, ib = to_param(summative, k, stack, w, "min")
        r_l = 0.0 if mode == "adahat_no_reg" else sparsity[k]
        r = alpha / (epsilon + r_l)
        if mode == "adahat_no_sum":
            iw, ib = torch.full_like(iw, t), torch.full_like(ib, t)
        found.append((r / (iw + r), r / (ib + r)))
    return found


@dataclass
class FGOptions:
    alpha: float = 1.5e-7
    kind: str = "input_weight_gradient_abs_sum"
    summing: str = "add_all"
    scheduler: str = "linear_sparsity_reg"
    agg: str = "min"
    b_i: float = 1e-8
    b_r: float = 0.1
    b_l: float = 5.0
    filter_by_cumulative_mask: bool = False
    filter_unmasked_importance: bool = False
    multiply_gate: bool = True
    reference_decrease: bool = False
    linear_step: float = 1.0
    exponential_rate: float = 2.0
    log_base: float = 2.0


def fg_rates(o: FGOptions, summed: list[Tensor], cumulative: list[Tensor], summative: list[Tensor],
             sparsity: list[Tensor], t: int, stack: Stack, weights: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``FGAdaHAT.clip_grad_by_adjustment``: a = α/(c·Î + α)."""
    found = []
    for k, w in enumerate(weights):
        iw, ib = to_param(summed, k, stack, w, o.agg)
        if o.filter_by_cumulative_mask:
            cw, cb = to_param(cumulative, k, stack, w, "min")
            iw, ib = iw * cw, ib * cb
        c = sparsity[k] + o.b_r
        if o.scheduler == "linear_sparsity_reg":
            c = c * (t + o.b_l)
        if o.scheduler == "summative_mask_sparsity_reg":  # the intended per-entry form
            mw, mb = to_param(summative, k, stack, w, "min")
            cw, cb = (mw + o.b_l) * c, (mb + o.b_l) * c
        else:
            cw = cb = c
        found.append((o.alpha / (cw * iw + o.alpha), o.alpha / (cb * ib + o.alpha)))
    return found


def _rows(w: Tensor) -> Tensor:
    return w.flatten(1).sum(1)


def _columns(w: Tensor, units: int) -> Tensor:
    """Σ over all but the input unit, for a next layer whose input spans ``positions`` per unit."""
    return w.transpose(0, 1).reshape(units, -1).sum(1)


def raw_importance(kind: str, k: int, weights: list[Tensor], grads: list[Tensor], head_w: Tensor,
                   head_grad: Tensor, acts: list[Tensor]) -> Tensor:
    """``get_importance_step_layer_*`` for the types that need no attribution library."""
    w, g = weights[k], grads[k]
    n = w.shape[0]
    wn, gn = (weights[k + 1], grads[k + 1]) if k + 1 < len(weights) else (head_w, head_grad)
    a = acts[k].abs().transpose(0, 1).reshape(n, -1).mean(1)  # batch (and spatial) mean
    in_abs, out_abs = _rows(w.abs()), _columns(wn.abs(), n)
    table = {
        "input_weight_abs_sum": lambda: in_abs,
        "output_weight_abs_sum": lambda: out_abs,
        "input_weight_gradient_abs_sum": lambda: _rows(g.abs()),
        "output_weight_gradient_abs_sum": lambda: _columns(gn.abs(), n),
        "activation_abs": lambda: a,
        "input_weight_abs_sum_x_activation_abs": lambda: in_abs * a,
        "output_weight_abs_sum_x_activation_abs": lambda: out_abs * a,
        "input_weight_gradient_square_sum": lambda: _rows(g**2),
        "output_weight_gradient_square_sum": lambda: _columns(gn**2, n),
        "input_weight_gradient_square_sum_x_activation_abs": lambda: _rows(g**2) * a,
        "output_weight_gradient_square_sum_x_activation_abs": lambda: _columns(gn**2, n) * a,
        "cbp_adaptation": lambda: 1.0 / in_abs,
        "cbp_adaptive_contribution": lambda: out_abs * a / in_abs,
    }
    return table[kind]()


def min_max(u: Tensor) -> Tensor:
    """``clarena.utils.transforms.min_max_normalize``."""
    return (u - u.min()) / (u.max() - u.min() + 1e-8)


def _weight(o: FGOptions, t: int, tau: int) -> float:
    return {
        "linear_decrease": lambda: o.linear_step * (t - tau) + 1,
        "quadratic_decrease": lambda: (t - tau + 1) ** 2,
        "cubic_decrease": lambda: (t - tau + 1) ** 3,
        "exponential_decrease": lambda: o.exponential_rate ** (t - tau + 1),
        "log_decrease": lambda: math.log(t - tau + 1, o.log_base) + 1,
        "factorial_decrease": lambda: math.factorial(t - tau + 1),
    }[o.summing]()


@dataclass
class FGState:
    """FG-AdaHAT's state: S = I^{<t}, the per-task importances and this task's accumulator."""

    summed: list[Tensor]
    history: list[list[Tensor]] = field(default_factory=list)
    accumulated: list[Tensor] = field(default_factory=list)
    steps: int = 0

    def begin_task(self) -> None:
        self.accumulated = [torch.zeros_like(s) for s in self.summed]
        self.steps = 0

    def step_importance(self, o: FGOptions, weights: list[Tensor], grads: list[Tensor], head_w: Tensor,
                        head_grad: Tensor, acts: list[Tensor], gates: list[Tensor]) -> list[Tensor]:
        """``on_train_batch_end``: raw → min–max → ⊙ soft gate, accumulated; returns the step's importances."""
        found = []
        for k in range(len(weights)):
            u = min_max(raw_importance(o.kind, k, weights, grads, head_w, head_grad, acts))
            if o.multiply_gate:
                u = u * gates[k]
            found.append(u)
        self.accumulated = [a + u for a, u in zip(self.accumulated, found, strict=True)]
        self.steps += 1
        return found

    def end_task(self, o: FGOptions, masks: list[Tensor]) -> None:
        """``on_train_end``: I^t = mean over steps + b_I (⊙ m^t if filtered), then the summing strategy."""
        importance = [a / self.steps + o.b_i for a in self.accumulated]
        if o.filter_unmasked_importance:
            importance = [i * m for i, m in zip(importance, masks, strict=True)]
        self.history.append(importance)
        t = len(self.history)
        for k in range(len(self.summed)):
            if o.summing == "add_latest":
                self.summed[k] = self.summed[k] + self.history[t - 1][k]
            elif o.summing == "add_all":
                self.summed[k] = self.summed[k] + sum(self.history[tau][k] for tau in range(t))
            elif o.summing == "add_average":
                self.summed[k] = self.summed[k] + sum(self.history[tau][k] for tau in range(t)) / t
            elif o.reference_decrease:  # the reference's loop adds only τ = t, after the loop
                self.summed[k] = self.history[t - 1][k] * _weight(o, t, t)
            else:
                self.summed[k] = sum(self.history[tau][k] * _weight(o, t, tau + 1) for tau in range(t))

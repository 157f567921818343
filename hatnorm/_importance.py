"""FG-AdaHAT's per-step importance of every gate unit, from weights, gradients and activations.

The types are CLArena's (``FGAdaHAT.get_importance_step_layer_*``), read for a gate's units instead of a
layer's output neurons: the *input weights* of a unit are the rows of every weighted layer that writes it, its
*output weights* the columns of every weighted layer (and of the active task's head) that reads it, and its
*activation* the input those layers read, |x| averaged over the batch and every position (a convolution's
channel is one unit). Weights are taken after the optimizer step, gradients as the policy left them, the
activation from the step's training forward, as in the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from hatnorm._gate import HATGate
from hatnorm._heads import TaskHeads
from hatnorm._masks import MaskSource
from hatnorm._protected import Protected
from hatnorm._shards import whole
from hatnorm._unit_maps import scatter

#: the quantities a type reads: per-unit sums over input weights (``in_*``) or output weights (``out_*``) of
#: |w| (``abs``), |∂L/∂w| (``grad_abs``) or (∂L/∂w)² (``grad_square``), and the activation (``activation``)
Quantities = dict[str, Tensor]


def _adaptation(q: Quantities) -> Tensor:
    # CBP's adaptation 1/Σ|w_in|; a unit no weighted layer writes has none (0)
    w = q["in_abs"]
    return torch.where(w > 0, 1 / w, torch.zeros_like(w))


#: importance type → (quantities it reads, how it combines them); the paper's abbreviations in comments
TYPES: dict[str, tuple[tuple[str, ...], Callable[[Quantities], Tensor]]] = {
    "input_weight_abs_sum": (("in_abs",), lambda q: q["in_abs"]),
    "output_weight_abs_sum": (("out_abs",), lambda q: q["out_abs"]),
    "input_weight_gradient_abs_sum": (("in_grad_abs",), lambda q: q["in_grad_abs"]),  # IG
    "output_weight_gradient_abs_sum": (("out_grad_abs",), lambda q: q["out_grad_abs"]),  # OG
    "activation_abs": (("activation",), lambda q: q["activation"]),
    "input_weight_abs_sum_x_activation_abs": (("in_abs", "activation"),  # ICU
                                              lambda q: q["in_abs"] * q["activation"]),
    "output_weight_abs_sum_x_activation_abs": (("out_abs", "activation"),  # CU
                                               lambda q: q["out_abs"] * q["activation"]),
    "input_weight_gradient_square_sum": (("in_grad_square",), lambda q: q["in_grad_square"]),
    "output_weight_gradient_square_sum": (("out_grad_square",), lambda q: q["out_grad_square"]),
    "input_weight_gradient_square_sum_x_activation_abs": (("in_grad_square", "activation"),  # AFI
                                                          lambda q: q["in_grad_square"] * q["activation"]),
    "output_weight_gradient_square_sum_x_activation_abs": (("out_grad_square", "activation"),
                                                           lambda q: q["out_grad_square"] * q["activation"]),
    "cbp_adaptation": (("in_abs",), _adaptation),
    "cbp_adaptive_contribution": (("in_abs", "out_abs", "activation"),
                                  lambda q: q["out_abs"] * q["activation"] * _adaptation(q)),
}

#: what an ``in_*``/``out_*`` quantity reads of a weight
_READS: dict[str, Callable[[nn.Parameter], Tensor | None]] = {
    "abs": lambda w: whole(w).detach().abs(),
    "grad_abs": lambda w: None if w.grad is None else whole(w.grad).abs(),
    "grad_square": lambda w: None if w.grad is None else whole(w.grad).square(),
}


def _rows(values: Tensor) -> Tensor:
    """Σ over everything but the output unit: ``[out, in, *kernel] -> [out]``."""
    return values.flatten(1).sum(1)


def _columns(values: Tensor, groups: int) -> Tensor:
    """Σ over everything but the input unit: ``[out, in/groups, *kernel] -> [in]`` (groups read in order)."""
    out, per_group = values.shape[:2]
    return values.reshape(groups, out // groups, per_group, -1).sum((1, 3)).flatten()


def _unit_dim(module: nn.Module) -> int:
    """The dim of a layer's input that holds its input units: the layer's ``input_unit_dim`` where it declares one
    (a converted transposed convolution), channels for a convolution, the last dim otherwise."""
    declared = getattr(module, "input_unit_dim", None)
    if isinstance(declared, int):
        return declared
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1
    if isinstance(module, TaskHeads):
        return 1 if module.convolutional else -1
    return -1


def normalize(u: Tensor, eps: float = 1e-8) -> Tensor:
    """Min–max normalisation over a gate's units, (u − min)/(max − min + eps); a constant vector gives 0."""
    return (u - u.min()) / (u.max() - u.min() + eps)


class UnitImportance:
    """The raw per-step importance of every gate unit for one importance type.

    Args:
        kind: an importance type (a key of :data:`TYPES`).
        layers: the wired modules with their output and input mask sources.
        gates: every gate of the model.
        task_heads: the task heads with the units they read.
    """

    def __init__(self, kind: str, layers: tuple[tuple[nn.Module, MaskSource, MaskSource | None], ...],
                 gates: tuple[HATGate, ...], task_heads: tuple[tuple[TaskHeads, MaskSource], ...]) -> None:
        self.kind = kind
        self.needs, self.combine = TYPES[kind]
        self.gates = gates
        weighted = [(m, out, inp) for m, out, inp in layers if not isinstance(m, Protected)]
        self.producers = [(m, out) for m, out, _ in weighted]
        self.consumers = [(m, inp) for m, _, inp in weighted if inp is not None]
        self.task_heads = task_heads
        self._hooks: list[RemovableHandle] = []
        self._inputs: dict[nn.Module, tuple[Tensor, int]] = {}

    def start(self) -> None:
        """Watch the inputs of the layers and heads that read gated units (when the type needs the activation)."""
        self.stop()
        if "activation" in self.needs:
            readers = [m for m, _ in self.consumers] + [h for h, _ in self.task_heads]
            self._hooks = [m.register_forward_pre_hook(self._record) for m in readers]

    def stop(self) -> None:
        """Remove the hooks :meth:`start` placed."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._inputs = {}

    def _record(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not (module.training and torch.is_grad_enabled()) or not args or not isinstance(args[0], Tensor):
            return
        x = args[0].detach().abs()
        dim = _unit_dim(module)
        per_unit = x.movedim(dim, -1).reshape(-1, x.shape[dim]).mean(0)  # [B, ..., F] -> [F]
        total, calls = self._inputs.get(module, (0, 0))
        self._inputs[module] = (per_unit + total, calls + 1)

    def compute(self, task: int, s: float | Tensor) -> dict[HATGate, Tensor]:
        """The raw importance ``u`` of every gate's units for this step; clears the recorded activations."""
        quantities = {name: self._quantity(name, task) for name in self.needs}
        self._inputs = {}
        return {g: self.combine({name: q[g] for name, q in quantities.items()}) for g in self.gates}

    def _zeros(self) -> dict[HATGate, Tensor]:
        return {g: torch.zeros(g.num_features, dtype=g.embedding.dtype, device=g.embedding.device)
                for g in self.gates}

    def _quantity(self, name: str, task: int) -> dict[HATGate, Tensor]:
        found = self._zeros()
        if name == "activation":
            return self._activation(found)
        side, _, read = name.partition("_")
        reads = _READS[read]
        if side == "in":
            for module, out in self.producers:
                values = reads(module.weight)
                if values is not None:
                    scatter(out, _rows(values).to(found[self.gates[0]]), found)
            return found
        readers = [(m, inp, getattr(m, "groups", 1)) for m, inp in self.consumers]
        readers += [(h.heads[task], units, 1) for h, units in self.task_heads]
        for module, inp, groups in readers:
            values = reads(module.weight)
            if values is not None:
                scatter(inp, _columns(values, groups).to(found[self.gates[0]]), found)
        return found

    def _activation(self, found: dict[HATGate, Tensor]) -> dict[HATGate, Tensor]:
        counts = self._zeros()
        sources = dict(self.consumers) | dict(self.task_heads)
        for module, (total, calls) in self._inputs.items():
            mean = (total / calls).to(found[self.gates[0]])
            scatter(sources[module], mean, found)
            scatter(sources[module], torch.ones_like(mean), counts)
        return {g: found[g] / counts[g].clamp_min(1) for g in self.gates}

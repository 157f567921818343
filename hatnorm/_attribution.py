"""FG-AdaHAT's attribution importance types, through Captum (the ``captum`` extra, imported only when chosen).

Each type is the batch-mean |attribution| of every output unit of every weighted layer (a convolution's channel
is one unit, averaged over positions), from Captum's layer attribution with respect to the layer's output, for
the step's training batch after the optimizer step, as CLArena's ``get_importance_step_layer_*_abs`` compute it.
The target of a sample is the class the step's forward predicted: :class:`hatnorm.HAT` never sees the labels.
The extra forwards run in training mode at the step's scale; the model's buffers (batch-norm statistics) are
restored after them, so they leave the model as the step left it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from hatnorm._gate import HATGate
from hatnorm._masks import MaskSource
from hatnorm._protected import Protected
from hatnorm._unit_maps import scatter


def _zeros_like_batch(x: Tensor, samples: int) -> Tensor:
    return torch.zeros(samples, *x.shape[1:], dtype=x.dtype, device=x.device)


#: type → (Captum class, what its ``attribute`` takes beyond inputs and target, whether it needs an nn.Module)
ATTRIBUTIONS: dict[str, tuple[str, Callable[[Tensor], dict[str, Any]], bool]] = {
    "conductance_abs": ("LayerConductance", lambda x: {}, False),
    "internal_influence_abs": ("InternalInfluence", lambda x: {"n_steps": 5}, False),
    "deeplift_abs": ("LayerDeepLift", lambda x: {}, True),
    "deepliftshap_abs": ("LayerDeepLiftShap", lambda x: {"baselines": _zeros_like_batch(x, 2)}, True),
    "gradientshap_abs": ("LayerGradientShap", lambda x: {"baselines": _zeros_like_batch(x, 1)}, False),
    "integrated_gradients_abs": ("LayerIntegratedGradients", lambda x: {}, False),
    "feature_ablation_abs": ("LayerFeatureAblation", lambda x: {}, False),
    "gradient_x_activation_abs": ("LayerGradientXActivation", lambda x: {}, False),
}


def load_captum(kind: str) -> Any:
    """``captum.attr``, or an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module("captum.attr")
    except ImportError as error:
        raise ImportError(f"importance={kind!r} is computed with Captum, which is not installed; install the extra: "
                          "pip install 'hatnorm[captum]'") from error


class _Forward(nn.Module):
    """The model at one task and scale, as a one-argument module (Captum calls ``forward(inputs)``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.task = 0
        self.s: float | Tensor = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, task=self.task, s=self.s)


class AttributionImportance:
    """The per-step attribution importance of every gate unit (module docstring).

    Args:
        kind: a key of :data:`ATTRIBUTIONS`.
        model: the protected model.
        layers: the wired modules with their output and input mask sources.
        gates: every gate of the model.
    """

    def __init__(self, kind: str, model: nn.Module, layers: tuple[tuple[nn.Module, MaskSource, MaskSource | None], ...],
                 gates: tuple[HATGate, ...]) -> None:
        captum = load_captum(kind)
        name, self.options, needs_module = ATTRIBUTIONS[kind]
        self.kind = kind
        self.model = model
        self.gates = gates
        self.forward = _Forward(model)
        func = self.forward if needs_module else self.forward.forward
        self.producers = [(getattr(captum, name)(func, m), m, out) for m, out, _ in layers
                          if not isinstance(m, Protected)]
        self._hooks: list[RemovableHandle] = []
        self._batch: tuple[Tensor, Tensor] | None = None
        self._busy = False

    def start(self) -> None:
        """Record every training forward's input and predicted classes."""
        self.stop()
        self._hooks = [self.model.register_forward_hook(self._record, with_kwargs=True)]

    def stop(self) -> None:
        """Remove the hook :meth:`start` placed."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._batch = None

    def _record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._busy or not (module.training and torch.is_grad_enabled()) or not isinstance(output, Tensor):
            return
        x = args[0] if args else kwargs.get("x")
        if isinstance(x, Tensor):
            self._batch = (x.detach(), output.detach().flatten(1).argmax(1))

    def compute(self, task: int, s: float | Tensor) -> dict[HATGate, Tensor]:
        """The raw importance ``u`` of every gate's units from the last training batch.

        Raises:
            RuntimeError: no training forward was seen since the last step.
        """
        if self._batch is None:
            raise RuntimeError(f"importance={self.kind!r} needs the step's batch, but no training forward of the model "
                               "ran since the last step (call the model itself, model(x, task=..., s=...))")
        x, target = self._batch
        self.forward.task, self.forward.s = task, s
        found = {g: torch.zeros(g.num_features, dtype=g.embedding.dtype, device=g.embedding.device)
                 for g in self.gates}
        buffers = [b.clone() for b in self.model.buffers()]
        self._busy = True
        try:
            for method, module, out in self.producers:
                dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
                options = self.options(x)
                if self.kind == "feature_ablation_abs" and dim == 1:  # a channel is ablated whole, as one unit
                    channels = torch.arange(module.weight.shape[0], device=x.device)
                    options["layer_mask"] = channels.view(1, -1, *([1] * (module.weight.dim() - 2)))
                attribution = method.attribute(x, target=target, **options).detach()
                per_unit = attribution.abs().movedim(dim, -1).reshape(-1, attribution.shape[dim]).mean(0)
                scatter(out, per_unit.to(found[self.gates[0]]), found)
        finally:
            self._busy = False
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers, strict=True):
                    b.copy_(saved)
        self._batch = None
        return found

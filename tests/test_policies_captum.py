"""FG-AdaHAT's attribution importance types through Captum (the ``captum`` extra)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import hatnorm
from hatnorm import HAT
from hatnorm._attribution import AttributionImportance
from hatnorm.policies import FGAdaHATPolicy

pytest.importorskip("captum")


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=3, in_features=8, hidden=[12, 12])


@pytest.mark.parametrize("kind", sorted(hatnorm.policies.ATTRIBUTION_TYPES))
def test_every_attribution_type_trains(kind: str) -> None:
    model = mlp()
    hat = HAT(model, policy=FGAdaHATPolicy(alpha=1e-3, importance=kind))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for task in range(2):
        hat.begin_task(task)
        for step in range(2):
            x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
            s = hat.scale(step, 2)
            loss = hat.loss(F.cross_entropy(model(x, task=task, s=s), y), s)
            optimizer.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)
        hat.end_task()
    assert all(torch.isfinite(s).all() and float(s.max()) > 0 for s in hat.policy.summed)


def test_gradient_times_activation_is_the_layer_output_times_its_gradient() -> None:
    """u_i = mean over the batch of |z_i ∂logit_ŷ/∂z_i|, z the layer's output, ŷ the predicted class; the extra
    forwards leave the batch-norm statistics as they were."""
    model = mlp()
    hat = HAT(model)
    units = AttributionImportance("gradient_x_activation_abs", model, hat._wiring().layers, tuple(hat.gates))
    units.start()
    model.train()
    x, s = torch.randn(5, 8), 3.0
    logits = model(x, task=0, s=s)
    buffers = [b.clone() for b in model.buffers()]
    found = units.compute(0, s)
    assert all(torch.equal(b, saved) for b, saved in zip(model.buffers(), buffers, strict=True))
    outputs = {}
    hooks = [fc.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
             for i, fc in enumerate(model.fcs)]
    picked = model(x, task=0, s=s).gather(1, logits.argmax(1, keepdim=True)).sum()
    for hook in hooks:
        hook.remove()
    grads = torch.autograd.grad(picked, [outputs[0], outputs[1]])
    for gate, z, g in zip(model.gates, (outputs[0], outputs[1]), grads, strict=True):
        torch.testing.assert_close(found[gate], (z * g).abs().mean(0).detach())


def test_an_attribution_type_without_captum_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "captum.attr", None)  # what Python does when the package is absent
    with pytest.raises(ImportError, match=r"hatnorm\[captum\]"):
        FGAdaHATPolicy(importance="deeplift_abs")

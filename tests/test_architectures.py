"""Registry-driven smoke tests: every architecture × every norm that fits it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hatnorm

CASES = [
    (arch, norm)
    for arch in hatnorm.list_architectures()
    for norm in hatnorm.list_norms(hatnorm.get_architecture(arch).family)
]
INPUTS = {"mlp": (2, 1, 32, 32)}


@pytest.mark.parametrize(("arch", "norm"), CASES)
def test_builds_runs_and_every_parameter_gets_a_gradient(arch: str, norm: str) -> None:
    torch.manual_seed(0)
    model = hatnorm.build(arch, num_tasks=3, norm=norm, num_classes=[2, 3, 4])
    hat = hatnorm.HAT(model)
    x = torch.randn(*INPUTS[arch])
    hat.begin_task(1)
    model.train()
    out = model(x, task=1, s=hat.scale(0, 4))
    assert out.shape == (x.shape[0], 3)
    out.square().sum().backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    # only other tasks' heads are not reached
    assert unused == {n for n, _ in model.named_parameters() if n.startswith("heads.heads.") and ".1." not in n}
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
    assert not any(isinstance(m, plain) for m in model.modules())

"""The RMSNorm baselines of the language ablation: shared and per-task RMSNorm, statistics over every feature."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatnorm
from hatnorm.norms import SharedRMSNorm, TaskRMSNorm


def gate_of(channels: int, seed: int) -> torch.Tensor:
    return (torch.rand(channels, generator=torch.Generator().manual_seed(seed)) > 0.5).double()


@pytest.mark.parametrize("cls", [SharedRMSNorm, TaskRMSNorm])
def test_rms_baselines_are_rms_norm_over_every_feature_times_the_gate(cls) -> None:
    torch.manual_seed(0)
    norm = cls(8, num_tasks=3, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, gate = torch.randn(4, 5, 8, dtype=torch.float64), gate_of(8, 1)
    for task in range(3):
        weight = norm.weight if cls is SharedRMSNorm else norm.weight[task]
        expected = F.rms_norm(x, (8,), weight, 1e-6) * gate
        torch.testing.assert_close(norm(x, gate, task), expected, rtol=0, atol=1e-12)
    # an unselected feature moves the statistics of the selected ones (why they can drift)
    moved = x.clone()
    moved[..., gate == 0] += 3.0
    assert not torch.allclose(norm(moved, gate, 0)[..., gate == 1], norm(x, gate, 0)[..., gate == 1])


def test_task_rms_trains_only_its_own_row_under_hat() -> None:
    torch.manual_seed(0)
    model = hatnorm.build("mlp", num_tasks=2, norm="task_rms", num_classes=2, in_features=6, hidden=(8,))
    hat = hatnorm.HAT(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rms = next(m for m in model.modules() if isinstance(m, TaskRMSNorm))
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    hat.begin_task(0)
    for _ in range(3):
        optimizer.zero_grad()
        hat.loss(F.cross_entropy(model(x, task=0, s=100.0), y), 100.0).backward()
        hat.protect(100.0)
        hat.step(optimizer)
    hat.end_task()
    row0 = rms.weight[0].detach().clone()
    hat.begin_task(1)
    for _ in range(3):
        optimizer.zero_grad()
        hat.loss(F.cross_entropy(model(x, task=1, s=100.0), y), 100.0).backward()
        hat.protect(100.0)
        hat.step(optimizer)
    assert torch.equal(rms.weight[0], row0)


@pytest.mark.parametrize("norm", ["shared_rms", "task_rms", "masked_rms"])
def test_an_rms_norm_converts_from_nn_rms_norm_and_reproduces_it_with_open_gates(norm) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8, eps=1e-6), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    converted = hatnorm.convert(model, num_tasks=2, norm=norm)
    hatnorm.open_gates(converted)
    converted.eval()
    x = torch.randn(5, 6)
    torch.testing.assert_close(converted(x, task=1), model(x), rtol=0, atol=1e-5)

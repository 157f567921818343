"""hatnorm.export of converted models whose stream is multiplied by a per-channel buffer: the exported model runs
and gives the converted model's outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hatnorm


class BufferScaled(nn.Module):
    """conv → BN → times a per-channel buffer (a fixed scale) → conv → BN → pool → Linear."""

    def __init__(self, view: bool) -> None:
        super().__init__()
        self.view = view
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        scale = torch.linspace(0.5, 2.0, 6)
        self.register_buffer("scale", scale if view else scale.view(6, 1, 1))
        self.conv2, self.bn2 = nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = h * (self.scale.view(1, -1, 1, 1) if self.view else self.scale)
        return self.fc(torch.relu(self.bn2(self.conv2(h))).mean((2, 3)))


@pytest.mark.parametrize("view", [False, True], ids=["buffer", "viewed_buffer"])
def test_export_of_a_stream_scaled_by_a_per_channel_buffer_runs_and_matches(view: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = hatnorm.convert(BufferScaled(view).eval(), num_tasks=2, example_input=x)
    hatnorm.HAT(model)
    hatnorm.open_gates(model)
    with torch.no_grad():
        for gate in (m for m in model.modules() if isinstance(m, hatnorm.HATGate)):
            gate.embedding[0, ::2] = -6.0  # task 0 uses every other unit: export removes the rest
    model.eval()
    exported = hatnorm.export(model, 0)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x, task=0), atol=1e-5, rtol=0)

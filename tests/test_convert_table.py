"""One op table: ``register_conversion_rule`` and the built-in rules go through the same table, so a user's rule
for an op a built-in covers is the one the walk uses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hatnorm
from hatnorm._convert import OPS
from hatnorm._convert.ops_elementwise import UNITWISE


class HardtanhGate(nn.Module):
    """A convolution's output scaled by a hard-tanh of itself: a product of two gated tensors unless the
    hard-tanh is declared a scale (its output may only multiply a gated tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.gate = nn.Hardtanh(0.0, 1.0)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(x))
        return self.head((h * self.gate(h)).mean((2, 3)))


@pytest.fixture
def restored_table():
    """The op table as it was, after the test."""
    before = OPS.lookup(nn.Hardtanh(0.0, 1.0))
    yield
    OPS.register(nn.Hardtanh, before)


def test_a_rule_registered_for_an_op_a_builtin_covers_replaces_it(restored_table) -> None:
    model = HardtanhGate().eval()
    assert OPS.lookup(model.gate) is UNITWISE  # the built-in rule, registered through the same table
    with pytest.raises(hatnorm.ConversionError, match="a product of tensors is supported as a gated tensor times"):
        hatnorm.convert(model, num_tasks=2)
    hatnorm.register_conversion_rule(nn.Hardtanh, "scale")
    assert OPS.lookup(model.gate).name == "scale"
    converted = hatnorm.convert(model, num_tasks=2)
    hatnorm.open_gates(converted)
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x, task=1), model(x), rtol=1e-5, atol=1e-5)


def test_a_subclass_takes_its_base_class_rule_and_a_test_covers_what_no_class_names() -> None:
    class MyReLU(nn.ReLU):
        pass

    assert OPS.lookup(MyReLU()) is OPS.lookup(nn.ReLU())
    assert OPS.lookup(nn.BatchNorm2d(4)).name == "norm"  # every norm a registered norm replaces, by a test
    assert OPS.lookup(torch.cumsum) is None

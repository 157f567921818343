"""What hatnorm.convert refuses, and how it says so: a module used twice, conversion rules whose claim is false or that
cannot take effect."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hatnorm


class SharedLayer(nn.Module):
    """One Linear applied twice (weight sharing), as a user might write a tied block."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.block(x))
        return self.fc(torch.relu(self.block(h)))


def test_a_module_used_twice_is_named_with_both_lines_and_what_to_do() -> None:
    model = SharedLayer().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(hatnorm.ConversionError, match=r"module 'block' \(Linear, 20 parameters\) is used 2 times in "
                                                      r"one forward \(test_convert_refusals\.py:\d+ `h = torch\.relu"
                                                      r"\(self\.block\(x\)\)`; test_convert_refusals\.py:\d+ `return "
                                                      r"self\.fc\(torch\.relu\(self\.block\(h\)\)\)`\): .*give each "
                                                      r"call a module of its own \(copy\.deepcopy"):
        hatnorm.convert(model, num_tasks=2, example_input=torch.randn(2, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class SharedActivation(nn.Module):
    """One ReLU module (no parameters) called twice: nothing to protect, so it converts."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.fc2(self.act(self.fc1(x)))))


def test_a_module_without_parameters_may_be_called_twice() -> None:
    original = SharedActivation().eval()
    converted = hatnorm.convert(original, num_tasks=2)
    hatnorm.open_gates(converted)
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x, task=0), original(x), atol=1e-6, rtol=0)

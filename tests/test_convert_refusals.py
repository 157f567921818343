"""What hatnorm.convert refuses, and how it says so: a module used twice, conversion rules whose claim is false or that
cannot take effect."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatnorm


def wrapped_cube(x: torch.Tensor) -> torch.Tensor:
    """x³, recorded by torch.fx as one call (wrapped below): a rule for it takes effect."""
    return x**3


torch.fx.wrap("wrapped_cube")


def plain_swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


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


class SoftPlus(nn.Module):
    """softplus(0) = log 2 ≠ 0: a closed unit would not stay closed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x)


class WithOwnActivation(nn.Module):
    def __init__(self, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1, self.fc = nn.Linear(4, 6), nn.Linear(6, 3)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc(self.activation(h) if self.activation is not None else wrapped_cube(h))


def test_a_module_rule_whose_claim_is_false_is_refused_at_conversion() -> None:
    """The issue's case: SoftPlus declared unit-wise registers (its instances are probed when met) and is refused
    when converted, naming the module and what the probe found."""
    hatnorm.register_conversion_rule(SoftPlus, "unitwise")
    with pytest.raises(hatnorm.ConversionError, match=r"module 'activation' \(SoftPlus\): the rule 'unitwise' "
                                                      r"registered for it is false: on a probe tensor it maps 0 to "
                                                      r"0\.6931"):
        hatnorm.convert(WithOwnActivation(SoftPlus()).eval(), num_tasks=2, example_input=torch.randn(2, 4))


@pytest.mark.parametrize(("target", "rule", "message"), [
    (F.softplus, "unitwise", r"rule: 'unitwise' is false for 'softplus': on a probe tensor it maps 0 to 0\.6931"),
    ("sigmoid", "unitwise", r"rule: 'unitwise' is false for 'sigmoid': on a probe tensor it maps 0 to 0\.5"),
    (torch.exp, "moves", r"rule: 'moves' is false for 'exp': on a probe tensor it gives values its input does not "
                         r"hold"),
    (torch.neg, "bookkeeping", r"rule: 'bookkeeping' is false for 'neg': on a probe tensor it gives a "
                               r"floating-point tensor"),
    (plain_swish, "unitwise", r"target: plain_swish is a plain Python function, which torch\.fx traces into .* "
                              r"wrap it with torch\.fx\.wrap"),
], ids=["softplus", "sigmoid_method", "exp_moves", "neg_bookkeeping", "plain_function"])
def test_a_function_rule_that_is_false_or_cannot_take_effect_is_refused(target, rule: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hatnorm.register_conversion_rule(target, rule)


def test_a_refused_rule_is_not_registered() -> None:
    with pytest.raises(ValueError, match="plain Python function"):
        hatnorm.register_conversion_rule(plain_swish, "scale")

    class UsesSwish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(plain_swish(self.fc1(x)))

    converted = hatnorm.convert(UsesSwish().eval(), num_tasks=2)  # traced into: x times a sigmoid of x, as before
    assert converted(torch.randn(2, 4), task=0).shape == (2, 3)


def test_a_rule_for_a_function_fx_records_takes_effect() -> None:
    hatnorm.register_conversion_rule(wrapped_cube, "unitwise")
    original = WithOwnActivation().eval()
    converted = hatnorm.convert(original, num_tasks=2, example_input=torch.randn(2, 4))
    hatnorm.open_gates(converted)
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x, task=1), original(x), atol=1e-5, rtol=0)

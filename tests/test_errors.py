"""Bad input to every public entry point: an error that names the argument and what is allowed, and no state
changed (parameters, buffers and gradients are bit-identical afterwards)."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hatnorm
import hatnorm._arch_registry

T = 3
C = 6


def state(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter, buffer and gradient of ``module``, copied."""
    out = {k: v.detach().clone() for k, v in module.state_dict().items()}
    out |= {f"{n}.grad": p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out


@contextmanager
def refused(module: nn.Module, exc: type[Exception] | tuple[type[Exception], ...], match: str):
    """The block raises ``exc`` with a message matching ``match``, and ``module`` keeps its state."""
    before = state(module)
    with pytest.raises(exc, match=match):
        yield
    after = state(module)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"


# --- norms ------------------------------------------------------------------------------------------------

# class → (a valid input shape, an input shape of a rank the class does not take, the message for it)
NORMS: dict[type[hatnorm.MaskedNorm], tuple[tuple[int, ...], tuple[int, ...], str]] = {
    hatnorm.MaskedBatchNorm1d: ((4, C), (2, C, 3, 3), r"x must be 2-D or 3-D, got a 4-D tensor of shape \[2, 6, 3, 3"),
    hatnorm.MaskedBatchNorm2d: ((4, C, 3, 3), (4, C, 3), r"x must be 4-D, got a 3-D tensor of shape \[4, 6, 3\]"),
    hatnorm.TaskBatchNorm1d: ((4, C, 5), (C,), r"x must be 2-D or 3-D, got a 1-D tensor of shape \[6\]"),
    hatnorm.TaskBatchNorm2d: ((4, C, 3, 3), (4, C), r"x must be 4-D, got a 2-D tensor of shape \[4, 6\]"),
    hatnorm.SharedBatchNorm1d: ((4, C), (2, C, 3, 3), r"x must be 2-D or 3-D, got a 4-D tensor"),
    hatnorm.SharedBatchNorm2d: ((4, C, 3, 3), (4, C, 3), r"x must be 4-D, got a 3-D tensor"),
    hatnorm.PostGateBatchNorm1d: ((4, C), (2, C, 3, 3), r"x must be 2-D or 3-D, got a 4-D tensor"),
    hatnorm.PostGateBatchNorm2d: ((4, C, 3, 3), (4, C, 3), r"x must be 4-D, got a 3-D tensor"),
    hatnorm.MaskedLayerNorm: ((2, 4, C), (C,), r"x must be 2-D or 3-D or 4-D, got a 1-D tensor of shape \[6\]"),
    hatnorm.SharedLayerNorm: ((2, 4, C), (1, 1, 1, 1, C), r"x must be 2-D or 3-D or 4-D, got a 5-D tensor"),
    hatnorm.TaskLayerNorm: ((2, 4, C), (C,), r"x must be 2-D or 3-D or 4-D, got a 1-D tensor"),
    hatnorm.NoNorm: ((4, C, 3), (C,), r"x must be 2-D or 3-D or 4-D or 5-D, got a 1-D tensor of shape \[6\]"),
}
MASK = torch.tensor([0.9, 0.2, 0.7, 0.5, 1.0, 0.0])


def with_channels(cls: type[hatnorm.MaskedNorm], shape: tuple[int, ...], channels: int) -> tuple[int, ...]:
    dim = cls.channel_dim % len(shape)
    return (*shape[:dim], channels, *shape[dim + 1:])


NORM_CASES: dict[str, tuple[Callable, type[Exception], str]] = {
    # name: (call(norm, x), error, message)
    "task_out_of_range": (lambda n, x: n(x, MASK, T), ValueError, r"task must be in \[0, 3\), got 3"),
    "task_negative": (lambda n, x: n(x, MASK, -1), ValueError, r"task must be in \[0, 3\), got -1"),
    "task_float": (lambda n, x: n(x, MASK, 1.0), TypeError, r"task must be an int in \[0, 3\), got 1.0 of type float"),
    "task_str": (lambda n, x: n(x, MASK, "1"), TypeError, r"task must be an int in \[0, 3\), got '1' of type str"),
    "task_bool": (lambda n, x: n(x, MASK, True), TypeError, r"task must be an int in \[0, 3\), got True of type bool"),
    "task_tensor": (lambda n, x: n(x, MASK, torch.tensor([0, 1])), TypeError,
                    r"task must be an int in \[0, 3\), got a tensor of shape \(2,\)"),
    "mask_too_long": (lambda n, x: n(x, torch.ones(C + 1), 0), ValueError,
                      r"mask must have shape \[6\] \(one gate value per feature\), got shape \[7\]"),
    "mask_too_short": (lambda n, x: n(x, torch.ones(C - 1), 0), ValueError,
                       r"mask must have shape \[6\] \(one gate value per feature\), got shape \[5\]"),
    "mask_batched": (lambda n, x: n(x, torch.ones(2, C), 0), ValueError,
                     r"mask must have shape \[6\] \(one gate value per feature\), got shape \[2, 6\]"),
    "mask_int": (lambda n, x: n(x, torch.ones(C, dtype=torch.long), 0), ValueError,
                 r"mask must be a floating-point tensor with values in \[0, 1\], got dtype torch.int64"),
    "mask_list": (lambda n, x: n(x, [1.0] * C, 0), TypeError, r"mask must be a tensor of shape \[6\], got list"),
    "x_int": (lambda n, x: n(x.long(), MASK, 0), ValueError,
              r"x must be a floating-point tensor, got dtype torch.int64"),
    "x_not_a_tensor": (lambda n, x: n(x.tolist(), MASK, 0), TypeError, r"x must be a tensor, got list"),
}


def make_norm(cls: type[hatnorm.MaskedNorm]) -> hatnorm.MaskedNorm:
    torch.manual_seed(0)
    norm = cls(C, num_tasks=T).train()
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))
    return norm


@pytest.mark.parametrize("case", NORM_CASES, ids=NORM_CASES.keys())
@pytest.mark.parametrize("cls", NORMS, ids=lambda c: c.__name__)
def test_norm_refuses_bad_task_mask_and_input(cls, case) -> None:
    norm = make_norm(cls)
    call, exc, match = NORM_CASES[case]
    x = torch.randn(NORMS[cls][0])
    with refused(norm, exc, match):
        call(norm, x)
    norm(x, MASK, 0)  # the good call still works


@pytest.mark.parametrize("cls", NORMS, ids=lambda c: c.__name__)
def test_norm_refuses_a_wrong_channel_count(cls) -> None:
    norm = make_norm(cls)
    good = NORMS[cls][0]
    dim = cls.channel_dim
    for channels in (C - 1, C + 1):
        shape = with_channels(cls, good, channels)
        given = ", ".join(map(str, shape))
        with refused(norm, ValueError, rf"x must have 6 features in dim {dim}, got shape \[{given}\]"):
            norm(torch.randn(shape), MASK, 0)


@pytest.mark.parametrize("cls", NORMS, ids=lambda c: c.__name__)
def test_norm_refuses_a_wrong_rank(cls) -> None:
    norm = make_norm(cls)
    _, bad, match = NORMS[cls]
    with refused(norm, ValueError, match):
        norm(torch.randn(bad), MASK, 0)


@pytest.mark.parametrize("cls", [c for c in NORMS if c.channel_dim == 1 and c is not hatnorm.NoNorm],
                         ids=lambda c: c.__name__)
def test_batch_norm_refuses_one_value_per_channel_in_training(cls) -> None:
    norm = make_norm(cls)
    shape = (1, C) if 2 in cls.dims else (1, C, 1, 1)
    with refused(norm, ValueError, r"x: batch statistics need more than 1 value per channel in training, got shape"):
        norm(torch.randn(shape), MASK, 0)
    norm.eval()
    norm(torch.randn(shape), MASK, 0)  # evaluation uses the running statistics: one sample is fine


@pytest.mark.parametrize("cls", NORMS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("num_features", "num_tasks", "match"), [
    (0, T, r"num_features must be an int ≥ 1, got 0"),
    (2.5, T, r"num_features must be an int ≥ 1, got 2.5"),
    (C, 0, r"num_tasks must be an int ≥ 1, got 0"),
], ids=["num_features_0", "num_features_float", "num_tasks_0"])
def test_norm_constructor_refuses_bad_sizes(cls, num_features, num_tasks, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls(num_features, num_tasks=num_tasks)


@pytest.mark.parametrize(("cls", "kwargs", "match"), [
    (hatnorm.MaskedBatchNorm2d, {"eps": 0.0}, r"eps must be a finite number > 0, got 0.0"),
    (hatnorm.MaskedBatchNorm2d, {"momentum": 1.5}, r"momentum must be in \[0, 1\], got 1.5"),
    (hatnorm.TaskBatchNorm1d, {"momentum": -0.1}, r"momentum must be a finite number ≥ 0, got -0.1"),
    (hatnorm.MaskedLayerNorm, {"eps": -1e-5}, r"eps must be a finite number > 0, got -1e-05"),
    (hatnorm.NoNorm, {"channel_dim": 2}, r"channel_dim must be 1 \(channels first\) or -1 \(features last\), got 2"),
])
def test_norm_constructor_refuses_bad_options(cls, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls(C, num_tasks=T, **kwargs)


# --- gates ------------------------------------------------------------------------------------------------


def make_gate() -> hatnorm.HATGate:
    torch.manual_seed(0)
    gate = hatnorm.HATGate(C, num_tasks=T)
    gate.consolidate(0)
    return gate.train()


GATE_TASK_CASES = [
    (T, ValueError, r"task must be in \[0, 3\), got 3"),
    (-1, ValueError, r"task must be in \[0, 3\), got -1"),
    (1.0, TypeError, r"task must be an int in \[0, 3\), got 1.0 of type float"),
    (None, TypeError, r"task must be an int in \[0, 3\), got None of type NoneType"),
    (torch.tensor(0.0), TypeError,
     r"task must be an int in \[0, 3\), got a tensor of shape \(\) and dtype torch.float32"),
]


@pytest.mark.parametrize(("task", "exc", "match"), GATE_TASK_CASES)
@pytest.mark.parametrize("method", ["forward", "selection", "final_mask", "consolidate"])
def test_gate_refuses_a_bad_task(method, task, exc, match) -> None:
    gate = make_gate()
    call = {"forward": lambda: gate(task, 1.0), "selection": lambda: gate.selection(task),
            "final_mask": lambda: gate.final_mask(task), "consolidate": lambda: gate.consolidate(task)}[method]
    with refused(gate, exc, match):
        call()


def test_gate_accepts_an_integer_tensor_task() -> None:
    gate = make_gate()
    assert torch.equal(gate(torch.tensor(2), 1.0), gate(2, 1.0))


@pytest.mark.parametrize(("s", "match"), [
    (0.0, r"s must be a finite number > 0, got 0.0"),
    (-1.0, r"s must be a finite number > 0, got -1.0"),
    (0, r"s must be a finite number > 0, got 0"),
    (math.nan, r"s must be a finite number > 0, got nan"),
    (math.inf, r"s must be a finite number > 0, got inf"),
    ("1", r"s must be a finite number > 0, got '1'"),
    (torch.tensor([1.0, 2.0]), r"s must be a number > 0 or a one-element float tensor, got a tensor of shape \(2,\)"),
    (torch.tensor(2), r"s must be a number > 0 or a one-element float tensor, got a tensor of shape \(\) and dtype "
                      r"torch.int64"),
])
def test_gate_refuses_a_bad_scale_in_training(s, match) -> None:
    gate = make_gate()
    with refused(gate, ValueError, match):
        gate(0, s)


def test_gate_needs_a_scale_in_training() -> None:
    gate = make_gate()
    with refused(gate, ValueError, r"s must be given while training \(a number > 0"):
        gate(0)


@pytest.mark.parametrize(("args", "kwargs", "exc", "match"), [
    ((0,), {"num_tasks": T}, ValueError, r"num_features must be an int ≥ 1, got 0"),
    ((C,), {"num_tasks": 0}, ValueError, r"num_tasks must be an int ≥ 1, got 0"),
    ((C,), {"num_tasks": T, "s_max": 0.0}, ValueError, r"s_max must be a finite number > 0, got 0.0"),
    ((C,), {"num_tasks": T, "s_max": -400}, ValueError, r"s_max must be a finite number > 0, got -400"),
    ((C,), {"num_tasks": T, "binarize": 1}, TypeError, r"binarize must be a bool, got 1"),
])
def test_gate_constructor_refuses_bad_options(args, kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        hatnorm.HATGate(*args, **kwargs)


# --- the scale schedule -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "num_batches", "s_max", "exc", "match"), [
    (0, 10, 0.0, ValueError, r"s_max must be a finite number > 0, got 0.0"),
    (0, 10, -400.0, ValueError, r"s_max must be a finite number > 0, got -400.0"),
    (0, 10, math.inf, ValueError, r"s_max must be a finite number > 0, got inf"),
    (10, 10, 400.0, ValueError, r"batch must be an int in \[0, 10\), got 10"),
    (-1, 10, 400.0, ValueError, r"batch must be an int in \[0, 10\), got -1"),
    (1.5, 10, 400.0, ValueError, r"batch must be an int in \[0, 10\), got 1.5"),
    (True, 10, 400.0, ValueError, r"batch must be an int in \[0, 10\), got True"),
    (0, 0, 400.0, ValueError, r"num_batches must be an int ≥ 1, got 0"),
    (0, -3, 400.0, ValueError, r"num_batches must be an int ≥ 1, got -3"),
    (0, 2.0, 400.0, ValueError, r"num_batches must be an int ≥ 1, got 2.0"),
])
def test_anneal_scale_refuses_bad_input(batch, num_batches, s_max, exc, match) -> None:
    with pytest.raises(exc, match=match):
        hatnorm.anneal_scale(batch, num_batches, s_max)


# --- heads ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "x_shape", "exc", "match"), [
    (T, (2, 4), ValueError, r"task must be in \[0, 3\), got 3"),
    (-1, (2, 4), ValueError, r"task must be in \[0, 3\), got -1"),
    ("0", (2, 4), TypeError, r"task must be an int in \[0, 3\), got '0' of type str"),
    (0, (2, 5), ValueError, r"x must have shape \[N, 4\], got \[2, 5\]"),
    (0, (2, 4, 1), ValueError, r"x must have shape \[N, 4\], got \[2, 4, 1\]"),
])
def test_heads_refuse_bad_input(task, x_shape, exc, match) -> None:
    heads = hatnorm.TaskHeads(4, [2, 3, 4], num_tasks=T)
    with refused(heads, exc, match):
        heads(torch.randn(x_shape), task)


# --- HAT --------------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, C), nn.Linear(C, 4)
        self.n1 = hatnorm.MaskedBatchNorm1d(C, num_tasks=T)
        self.g1, self.g2 = hatnorm.HATGate(C, num_tasks=T), hatnorm.HATGate(4, num_tasks=T)
        self.heads = hatnorm.TaskHeads(4, 2, num_tasks=T)

    def forward(self, x: Tensor, task: int, s: float | None = None) -> Tensor:
        h = F.relu(self.n1(self.fc1(x), self.g1(task, s), task))
        return self.heads(F.relu(self.fc2(h) * self.g2(task, s)), task)

    def layers(self) -> list[hatnorm.Layer]:
        return [hatnorm.Layer(self.fc1, out=self.g1), hatnorm.Layer(self.n1, out=self.g1),
                hatnorm.Layer(self.fc2, out=self.g2, inp=self.g1)]


def make_hat() -> tuple[Net, hatnorm.HAT]:
    torch.manual_seed(0)
    net = Net()
    return net, hatnorm.HAT(net, net.layers())


@pytest.mark.parametrize(("task", "exc", "match"), GATE_TASK_CASES)
def test_begin_task_refuses_a_bad_task(task, exc, match) -> None:
    net, hat = make_hat()
    with refused(net, exc, match):
        hat.begin_task(task)
    assert hat.task is None
    assert hat.learned_tasks == []
    hat.begin_task(0)


def trained_step(net: Net, hat: hatnorm.HAT) -> None:
    """Learn task 0, begin task 1 and leave real gradients in place."""
    with torch.no_grad():
        net.g1.embedding[0] = torch.tensor([1.0, -1.0] * 3)
    hat.begin_task(0)
    hat.end_task()
    hat.begin_task(1)
    net.train()
    net(torch.randn(4, 3), 1, 2.0).square().sum().backward()


@pytest.mark.parametrize(("s", "match"), [
    (0.0, r"s must be a finite number > 0, got 0.0"),
    (-2.0, r"s must be a finite number > 0, got -2.0"),
    (math.nan, r"s must be a finite number > 0, got nan"),
    (None, r"s must be a finite number > 0, got None"),
])
@pytest.mark.parametrize("method", ["protect", "regularizer", "loss"])
def test_hat_refuses_a_bad_scale(method, s, match) -> None:
    net, hat = make_hat()
    trained_step(net, hat)
    call = {"protect": lambda: hat.protect(s), "regularizer": lambda: hat.regularizer(s),
            "loss": lambda: hat.loss(torch.tensor(0.0), s)}[method]
    with refused(net, ValueError, match):
        call()
    hat.protect(2.0)


@pytest.mark.parametrize(("batch", "num_batches", "match"), [
    (5, 5, r"batch must be an int in \[0, 5\), got 5"),
    (0, 0, r"num_batches must be an int ≥ 1, got 0"),
])
def test_hat_scale_refuses_bad_input(batch, num_batches, match) -> None:
    _, hat = make_hat()
    with pytest.raises(ValueError, match=match):
        hat.scale(batch, num_batches)


def test_hat_step_refuses_something_that_is_not_an_optimizer() -> None:
    net, hat = make_hat()
    trained_step(net, hat)
    with refused(net, TypeError, r"optimizer must be a torch.optim.Optimizer, got list"):
        hat.step([torch.optim.SGD(net.parameters(), lr=0.1)])


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"c": -0.5}, ValueError, r"c must be a finite number ≥ 0, got -0.5"),
    ({"clamp": 0.0}, ValueError, r"clamp must be a finite number > 0, got 0.0"),
    ({"thres_cosh": -1.0}, ValueError, r"thres_cosh must be a finite number > 0, got -1.0"),
    ({"policy": "ewc"}, ValueError, r"unknown gradient policy 'ewc'; registered: \[.*'adahat', 'hat'.*\]"),
    ({"policy": 3}, TypeError, r"policy must be a registered policy name or a GradientPolicy, got 3"),
])
def test_hat_constructor_refuses_bad_options(kwargs, exc, match) -> None:
    net = Net()
    with refused(net, exc, match):
        hatnorm.HAT(net, net.layers(), **kwargs)


def test_hat_constructor_refuses_bad_wiring() -> None:
    net = Net()
    with pytest.raises(ValueError, match=r"layers must be given unless model is a HATModule"):
        hatnorm.HAT(net)
    with pytest.raises(ValueError, match=r"layers\[0\].out has 4 units but the layer has 6 outputs"):
        hatnorm.HAT(net, [hatnorm.Layer(net.fc1, out=net.g2), *net.layers()[1:]])
    with pytest.raises(ValueError, match=r"layers\[2\].inp has 4 units but the layer reads 6 input features"):
        hatnorm.HAT(net, [*net.layers()[:2], hatnorm.Layer(net.fc2, out=net.g2, inp=net.g2)])
    with pytest.raises(ValueError, match=r"layers\[0\].module must be a submodule of model"):
        hatnorm.HAT(net, [hatnorm.Layer(nn.Linear(3, C), out=net.g1), *net.layers()])
    with pytest.raises(ValueError, match=r"model must contain at least one HATGate, found none"):
        hatnorm.HAT(nn.Linear(2, 2), [])
    with pytest.raises(ValueError, match=r"model: trainable parameters neither protected by a mask nor owned by "
                                         r"one task: \['fc2.weight', 'fc2.bias'\]"):
        hatnorm.HAT(net, net.layers()[:2])


def test_hat_constructor_refuses_gates_that_disagree() -> None:
    net = Net()
    net.g2 = hatnorm.HATGate(4, num_tasks=T, s_max=100.0)
    with pytest.raises(ValueError, match=r"s_max: every gate, norm and head of the model must use the same s_max, "
                                         r"got \[100.0, 400.0\]"):
        hatnorm.HAT(net, net.layers())
    net = Net()
    net.g2 = hatnorm.HATGate(4, num_tasks=T + 1)
    with pytest.raises(ValueError, match=r"num_tasks: .* must use the same num_tasks, got \[3, 4\]"):
        hatnorm.HAT(net, net.layers())


# --- registry names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("get", "kind"), [
    (hatnorm.get_norm, "norm"),
    (hatnorm.get_policy, "gradient policy"),
    (hatnorm.get_architecture, "architecture"),
])
def test_unknown_registry_name(get, kind) -> None:
    with pytest.raises(ValueError, match=rf"name: unknown {kind} 'no_such_thing'; registered: \["):
        get("no_such_thing")


@pytest.mark.parametrize(("register", "name", "kind"), [
    (lambda name: hatnorm.register_norm(name, family="batch")(hatnorm.MaskedBatchNorm2d), "masked_bn", "norm"),
    (lambda name: hatnorm.register_policy(name)(hatnorm.HATPolicy), "adahat", "gradient policy"),
])
def test_duplicate_registry_name_changes_nothing(register, name, kind) -> None:
    before = hatnorm.get_norm(name) if kind == "norm" else hatnorm.get_policy(name).__class__
    message = rf"name: the {kind} name '{name}' is already registered; pick a name not in \["
    with pytest.raises(ValueError, match=message):
        register(name)
    after = hatnorm.get_norm(name) if kind == "norm" else hatnorm.get_policy(name).__class__
    assert after is before


def test_duplicate_architecture_name_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = hatnorm._arch_registry.ARCHITECTURES
    registry.names()
    monkeypatch.setattr(registry, "_entries", dict(registry._entries))  # the test's registration is undone

    def first(**options: object) -> nn.Module:
        return Net()

    hatnorm.register_architecture("test_errors_arch", family="batch")(first)
    with pytest.raises(ValueError, match=r"name: the architecture name 'test_errors_arch' is already registered"):
        hatnorm.register_architecture("test_errors_arch", family="layer")(Net)
    spec = hatnorm.get_architecture("test_errors_arch")
    assert (spec.builder, spec.family) == (first, "batch")

"""Bad input to every public entry point: an error that names the argument, the value given and what is allowed,
and no state changed (parameters, buffers, gradients, optimizer state and HAT's task state are bit-identical
afterwards; model inputs are refused before any layer runs)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import hatnorm
import hatnorm._arch_registry
from ablations import policy, sweep
from hatnorm import data, metrics
from hatnorm.data import Task

T = 3
C = 6


def state(module: nn.Module, optimizer: torch.optim.Optimizer | None = None,
          hat: hatnorm.HAT | None = None) -> dict[str, object]:
    """Every parameter, buffer and gradient of ``module``, the state of ``optimizer`` and the task state of
    ``hat`` (active task, learned tasks, the multipliers fixed at task start and the regulariser's weights),
    copied."""
    out: dict[str, object] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    out |= {f"{n}.grad": p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    if optimizer is not None:
        saved = copy.deepcopy(optimizer.state_dict())
        out["optimizer.param_groups"] = saved["param_groups"]
        out |= {f"optimizer.state.{i}.{k}": v for i, entry in saved["state"].items() for k, v in entry.items()}
    if hat is not None:
        out |= {"hat.task": hat.task, "hat.learned_tasks": list(hat.learned_tasks),
                "hat.params": [id(p) for p in hat._params], "hat.frozen": [id(p) for p in hat._frozen],
                "hat.filled": list(hat._filled), "hat.free_total": hat._free_total}
        for what in ("_mults", "_drop", "_free"):
            out |= {f"hat.{what}.{i}": t.clone() for i, t in enumerate(getattr(hat, what))}
    return out


def assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    assert before.keys() == after.keys()
    for k, v in before.items():
        same = torch.equal(v, after[k]) if isinstance(v, Tensor) else v == after[k]
        assert same, f"{k} changed"


@contextmanager
def refused(module: nn.Module, exc: type[Exception] | tuple[type[Exception], ...], match: str, *,
            optimizer: torch.optim.Optimizer | None = None, hat: hatnorm.HAT | None = None) -> Iterator[None]:
    """The block raises ``exc`` with a message matching ``match``, and ``module``, ``optimizer`` and ``hat`` keep
    their state."""
    before = state(module, optimizer, hat)
    with pytest.raises(exc, match=match):
        yield
    assert_same(before, state(module, optimizer, hat))


@contextmanager
def no_layer_runs(model: nn.Module) -> Iterator[None]:
    """Fails if any submodule of ``model`` is called inside the block (the input is refused before any layer)."""
    ran: list[str] = []
    handles = [m.register_forward_pre_hook(lambda m, args, name=name: ran.append(name))
               for name, m in model.named_modules() if m is not model]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    assert not ran, f"layers ran before the input was refused: {ran}"


# --- norms ------------------------------------------------------------------------------------------------

class Kind:
    """A norm class with constructor options: the batch norms' layouts (``dims``) are one class each."""

    def __init__(self, cls: type[hatnorm.MaskedNorm], **options: object) -> None:
        self.cls, self.options = cls, options
        self.__name__ = cls.__name__ + "".join(f"_{k}{v}" for k, v in options.items())
        self.channel_dim = cls.channel_dim
        self.dims = cls(C, num_tasks=T, **options).dims

    def __call__(self, *args: object, **kwargs: object) -> hatnorm.MaskedNorm:
        return self.cls(*args, **self.options, **kwargs)


NO_NORM = Kind(hatnorm.NoNorm)
# kind → (a valid input shape, an input shape of a rank the kind does not take, the message for it)
NORMS: dict[Kind, tuple[tuple[int, ...], tuple[int, ...], str]] = {
    Kind(hatnorm.MaskedBatchNorm, dims=1): ((4, C), (2, C, 3, 3),
                                            r"x must be 2-D or 3-D, got a 4-D tensor of shape \[2, 6, 3, 3"),
    Kind(hatnorm.MaskedBatchNorm, dims=2): ((4, C, 3, 3), (4, C, 3),
                                            r"x must be 4-D, got a 3-D tensor of shape \[4, 6, 3\]"),
    Kind(hatnorm.MaskedBatchNorm): ((4, C, 3), (C,), r"x must be 2-D or 3-D or 4-D or 5-D, got a 1-D tensor"),
    Kind(hatnorm.TaskBatchNorm, dims=1): ((4, C, 5), (C,), r"x must be 2-D or 3-D, got a 1-D tensor of shape \[6\]"),
    Kind(hatnorm.TaskBatchNorm, dims=2): ((4, C, 3, 3), (4, C), r"x must be 4-D, got a 2-D tensor of shape \[4, 6\]"),
    Kind(hatnorm.SharedBatchNorm, dims=1): ((4, C), (2, C, 3, 3), r"x must be 2-D or 3-D, got a 4-D tensor"),
    Kind(hatnorm.SharedBatchNorm, dims=2): ((4, C, 3, 3), (4, C, 3), r"x must be 4-D, got a 3-D tensor"),
    Kind(hatnorm.PostGateBatchNorm, dims=1): ((4, C), (2, C, 3, 3), r"x must be 2-D or 3-D, got a 4-D tensor"),
    Kind(hatnorm.PostGateBatchNorm, dims=2): ((4, C, 3, 3), (4, C, 3), r"x must be 4-D, got a 3-D tensor"),
    Kind(hatnorm.MaskedLayerNorm): ((2, 4, C), (C,), r"x must be 2-D or 3-D or 4-D, got a 1-D tensor of shape \[6\]"),
    Kind(hatnorm.SharedLayerNorm): ((2, 4, C), (1, 1, 1, 1, C), r"x must be 2-D or 3-D or 4-D, got a 5-D tensor"),
    Kind(hatnorm.TaskLayerNorm): ((2, 4, C), (C,), r"x must be 2-D or 3-D or 4-D, got a 1-D tensor"),
    NO_NORM: ((4, C, 3), (C,), r"x must be 2-D or 3-D or 4-D or 5-D, got a 1-D tensor of shape \[6\]"),
    Kind(hatnorm.MaskedGroupNorm, dims=2): ((4, C, 3, 3), (4, C, 3), r"x must be 4-D, got a 3-D tensor"),
    Kind(hatnorm.MaskedChannelLayerNorm, dims=1): ((4, C), (2, C, 3, 3), r"x must be 2-D or 3-D, got a 4-D tensor"),
    Kind(hatnorm.MaskedRMSNorm): ((2, 4, C), (C,), r"x must be 2-D or 3-D or 4-D, got a 1-D tensor"),
}
MASK = torch.tensor([0.9, 0.2, 0.7, 0.5, 1.0, 0.0])


def with_channels(cls: Kind, shape: tuple[int, ...], channels: int) -> tuple[int, ...]:
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
    "mask_above_one": (lambda n, x: n(x, torch.full((C,), 1.5), 0), ValueError,
                       r"mask must hold gate values in \[0, 1\], got 6 outside, e\.g\. \[1\.5, 1\.5, 1\.5\]"),
    "mask_negative": (lambda n, x: n(x, torch.tensor([0.5, -0.1, 1.0, 0.0, 1.0, 1.0]), 0), ValueError,
                      r"mask must hold gate values in \[0, 1\], got 1 outside, e\.g\. \[-0\.1"),
    "mask_nan": (lambda n, x: n(x, torch.tensor([0.5, math.nan, 1.0, 0.0, 1.0, 1.0]), 0), ValueError,
                 r"mask must hold gate values in \[0, 1\], got 1 outside, e\.g\. \[nan\]"),
    "x_int": (lambda n, x: n(x.long(), MASK, 0), ValueError,
              r"x must be a floating-point tensor, got dtype torch.int64"),
    "x_not_a_tensor": (lambda n, x: n(x.tolist(), MASK, 0), TypeError, r"x must be a tensor, got list"),
}


def make_norm(cls: Kind) -> hatnorm.MaskedNorm:
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


@pytest.mark.parametrize("cls", [c for c in NORMS if c.cls.batch_statistics],
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
    (C, 10**6, r"num_tasks must be ≤ 10,000 \(every gate and per-task norm keeps a row per task\), got 1,000,000"),
], ids=["num_features_0", "num_features_float", "num_tasks_0", "num_tasks_huge"])
def test_norm_constructor_refuses_bad_sizes(cls, num_features, num_tasks, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls(num_features, num_tasks=num_tasks)


@pytest.mark.parametrize(("cls", "kwargs", "match"), [
    (hatnorm.MaskedBatchNorm2d, {"eps": 0.0}, r"eps must be a finite number > 0, got 0.0"),
    (hatnorm.MaskedBatchNorm2d, {"momentum": 1.5}, r"momentum must be in \[0, 1\], got 1.5"),
    (hatnorm.TaskBatchNorm1d, {"momentum": -0.1}, r"momentum must be a finite number ≥ 0, got -0.1"),
    (hatnorm.MaskedLayerNorm, {"eps": -1e-5}, r"eps must be a finite number > 0, got -1e-05"),
    (hatnorm.NoNorm, {"channel_dim": 2}, r"channel_dim must be 1 \(channels first\) or -1 \(features last\), got 2"),
    (hatnorm.MaskedGroupNorm, {"num_groups": 4}, r"num_groups must divide num_features 6, got 4"),
    (hatnorm.MaskedGroupNorm, {"num_groups": 0}, r"num_groups must be an int ≥ 1, got 0"),
    (hatnorm.MaskedRMSNorm, {"eps": 0.0}, r"eps must be a finite number > 0, got 0.0"),
    (hatnorm.SharedBatchNorm, {"dims": 3}, r"dims must be 1 \(\[N, C\] or \[N, C, L\]\), 2 \(\[N, C, H, W\]\) or None "
                                           r"\(any \[N, C, \*\]\), got 3"),
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
    ((C,), {"num_tasks": 10**6}, ValueError, r"num_tasks must be ≤ 10,000 .*, got 1,000,000"),
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
    (0, (2, 5), ValueError, r"x must have shape \[N, 4\] with N ≥ 1, got \[2, 5\]"),
    (0, (2, 4, 1), ValueError, r"x must have shape \[N, 4\] with N ≥ 1, got \[2, 4, 1\]"),
    (0, (0, 4), ValueError, r"x must have shape \[N, 4\] with N ≥ 1, got \[0, 4\]"),
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


# --- empty batches, dtypes and devices at the norms ----------------------------------------------------------


def empty_shapes(cls: Kind) -> list[tuple[int, ...]]:
    """A batch of N = 0, and a batch with a size-0 dim other than the batch and channel dims, where there is one."""
    good = NORMS[cls][0]
    channel = cls.channel_dim % len(good)
    others = [d for d in range(1, len(good)) if d != channel]
    return [(0, *good[1:]), *(tuple(0 if d == other else n for d, n in enumerate(good)) for other in others)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls", NORMS, ids=lambda c: c.__name__)
def test_norm_refuses_an_empty_batch(cls, training) -> None:
    norm = make_norm(cls).train(training)
    for shape in empty_shapes(cls):
        given = ", ".join(map(str, shape))
        with refused(norm, ValueError, rf"x must not be empty \(every size ≥ 1, a batch of N ≥ 1\), got shape "
                                       rf"\[{given}\]"):
            norm(torch.randn(shape), MASK, 0)


PARAMETRIZED_NORMS = [c for c in NORMS if c is not NO_NORM]
WRONG_PRECISION = r"must have dtype torch.float32 \(the parameters' dtype\), or torch.float16 or torch.bfloat16 " \
                  r"\(mixed precision\), got torch.float64"


@pytest.mark.parametrize("cls", PARAMETRIZED_NORMS, ids=lambda c: c.__name__)
def test_norm_refuses_a_dtype_or_device_its_parameters_cannot_meet(cls) -> None:
    norm = make_norm(cls)
    x = torch.randn(NORMS[cls][0])
    with refused(norm, ValueError, "x " + WRONG_PRECISION):
        norm(x.double(), MASK, 0)
    with refused(norm, ValueError, "mask " + WRONG_PRECISION):
        norm(x, MASK.double(), 0)
    with refused(norm, ValueError, r"x must be on the device of the model's parameters, cpu, got meta"):
        norm(x.to("meta"), MASK, 0)
    with refused(norm, ValueError, r"mask must be on the device of x, cpu, got meta"):
        norm(x, MASK.to("meta"), 0)
    norm.double()
    norm(x.double(), MASK.double(), 0)  # parameters and input in float64 agree


def test_no_norm_refuses_a_mask_on_another_device() -> None:
    norm = make_norm(NO_NORM)
    with refused(norm, ValueError, r"^mask must be on the device of x, cpu, got meta$"):
        norm(torch.randn(NORMS[NO_NORM][0]), MASK.to("meta"), 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", NORMS, ids=lambda c: c.__name__)
def test_norm_takes_half_precision_inputs_with_float32_parameters(cls, dtype) -> None:
    """Mixed precision is not bad input: F.batch_norm and F.layer_norm take it with float32 parameters."""
    norm = make_norm(cls)
    out = norm(torch.randn(NORMS[cls][0], dtype=dtype), MASK.to(dtype), 0)
    assert out.shape == NORMS[cls][0]


# --- the reference architectures' forwards -------------------------------------------------------------------

# name → (norm, build options, a good input shape); small so every case builds fast
ARCHS: dict[str, tuple[str, dict, tuple[int, ...]]] = {
    "mlp": ("masked_bn", {"in_features": 3 * 4 * 4, "hidden": (8,)}, (4, 3, 4, 4)),
    "alexnet": ("masked_bn", {"size": 28, "width": 0.05}, (4, 3, 28, 28)),
    "resnet18": ("masked_bn", {"base_width": 2}, (4, 3, 8, 8)),
    "vit": ("masked_ln", {"image_size": 8, "patch_size": 4, "dim": 8, "depth": 1, "heads": 2}, (4, 3, 8, 8)),
}
# name → (argument name, the expected shape as the message writes it)
ARCH_SHAPES = {
    "mlp": ("x", r"\[N, 48\] \(or \[N, \.\.\.\] with 48 values per sample\) with N ≥ 1"),
    "alexnet": ("x", r"\[N, 3, 28, 28\] with N ≥ 1"),
    "resnet18": ("x", r"\[N, 3, H, W\] with N, H, W ≥ 1"),
    "vit": ("img", r"\[N, 3, 8, 8\] with N ≥ 1"),
}


def make_model(name: str) -> nn.Module:
    norm, options, _ = ARCHS[name]
    torch.manual_seed(0)
    model = hatnorm.build(name, num_tasks=T, norm=norm, num_classes=[2, 3, 4], **options).train()
    model(torch.randn(ARCHS[name][2]), 1, 2.0).sum().backward()  # statistics and gradients that are not the defaults
    return model


def bad_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Input shapes the model refuses, made from its good ``[N, C, H, W]``: ResNet-18 takes any H, W ≥ 1, the
    MLP any shape with its number of values per sample."""
    n, c, h, w = ARCHS[name][2]
    shapes = {"wrong_channels": (n, 1, h, w), "wrong_rank": (n, c, h), "one_more_dim": (n, c, h, w, 2),
              "empty_batch": (0, c, h, w)}
    if name == "resnet18":
        shapes["empty_map"] = (n, c, 0, w)
    else:
        shapes["wrong_size"] = (n, c, h + 4, w + 4)
    return shapes


BAD_SHAPE_CASES = [(name, case) for name in ARCHS for case in bad_shapes(name)]


@pytest.mark.parametrize(("name", "case"), BAD_SHAPE_CASES, ids=[f"{n}-{c}" for n, c in BAD_SHAPE_CASES])
def test_architecture_refuses_a_bad_input_shape_before_any_layer_runs(name, case) -> None:
    model = make_model(name)
    shape = bad_shapes(name)[case]
    arg, expected = ARCH_SHAPES[name]
    given = ", ".join(map(str, shape))
    with refused(model, ValueError, rf"^{arg} must have shape {expected}, got \[{given}\]$"), no_layer_runs(model):
        model(torch.randn(shape), 1, 2.0)
    model(torch.randn(ARCHS[name][2]), 1, 2.0)


@pytest.mark.parametrize("name", ARCHS)
def test_architecture_refuses_a_bad_input_type_dtype_or_device_before_any_layer_runs(name) -> None:
    model = make_model(name)
    arg = ARCH_SHAPES[name][0]
    x = torch.randn(ARCHS[name][2])
    cases = [
        (x.tolist(), TypeError, rf"^{arg} must be a tensor of shape \[N, .*, got list$"),
        (x.long(), ValueError, rf"^{arg} must be a floating-point tensor, got dtype torch.int64$"),
        (x.double(), ValueError, rf"^{arg} must have dtype torch.float32 \(the dtype of the model's parameters\), "
                                 r"got torch.float64$"),
        (x.half(), ValueError, rf"^{arg} must have dtype torch.float32 .* got torch.float16$"),
        (x.to("meta"), ValueError, rf"^{arg} must be on the device of the model's parameters, cpu, got meta$"),
    ]
    for bad, exc, match in cases:
        with refused(model, exc, match), no_layer_runs(model):
            model(bad, 1, 2.0)


@pytest.mark.parametrize("name", ARCHS)
def test_architecture_refuses_a_bad_task_or_scale_before_any_layer_runs(name) -> None:
    model = make_model(name)
    x = torch.randn(ARCHS[name][2])
    cases = [
        ((x, 3, 2.0), ValueError, r"^task must be in \[0, 3\), got 3$"),
        ((x, 1.0, 2.0), TypeError, r"^task must be an int in \[0, 3\), got 1.0 of type float$"),
        ((x, 1, None), ValueError, r"^s must be given while training"),
        ((x, 1, 0.0), ValueError, r"^s must be a finite number > 0, got 0.0$"),
        ((x, 1, math.inf), ValueError, r"^s must be a finite number > 0, got inf$"),
    ]
    for args, exc, match in cases:
        with refused(model, exc, match), no_layer_runs(model):
            model(*args)


@pytest.mark.parametrize(("name", "shape"), [("mlp", (1, 3, 4, 4)), ("alexnet", (1, 3, 28, 28)),
                                             ("resnet18", (1, 3, 8, 8))])
def test_batch_norm_architecture_refuses_a_batch_of_one_in_training(name, shape) -> None:
    model = make_model(name)
    given = ", ".join(map(str, shape))
    with refused(model, ValueError, rf"^x must have N ≥ 2 in training: the model's batch-statistics norms need more "
                                    rf"than 1 value per channel, got shape \[{given}\]$"), no_layer_runs(model):
        model(torch.randn(shape), 1, 2.0)
    model.eval()
    assert model(torch.randn(shape), 1).shape == (1, 3)  # evaluation reads the running statistics


def test_a_batch_of_one_is_fine_where_every_norm_sees_more_than_one_value() -> None:
    # ResNet-18's last stage is 2×2 for 16×16 inputs; the gate-only MLP and the ViT have no batch statistics
    resnet = hatnorm.build("resnet18", num_tasks=T, norm="masked_bn", num_classes=2, base_width=2).train()
    assert resnet(torch.randn(1, 3, 16, 16), 0, 2.0).shape == (1, 2)
    mlp = hatnorm.build("mlp", num_tasks=T, norm="none", num_classes=2, in_features=8, hidden=(4,)).train()
    assert mlp(torch.randn(1, 8), 0, 2.0).shape == (1, 2)
    vit = make_model("vit")
    assert vit(torch.randn(1, 3, 8, 8), 0, 2.0).shape == (1, 2)


# --- converted models ---------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """conv → BN → ReLU → flatten → Linear → BN1d → ReLU → Linear: fixed 8×8 inputs, a norm after an FC layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.fc, self.bn_fc, self.out = nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.conv(x))).flatten(1)
        return self.out(F.relu(self.bn_fc(self.fc(h))))


def make_converted() -> hatnorm.ConvertedModel:
    torch.manual_seed(0)
    model = hatnorm.convert(SmallCNN(), num_tasks=T).train()
    model(torch.randn(4, 3, 8, 8), 1, 2.0).sum().backward()
    return model


@pytest.mark.parametrize(("x", "exc", "match"), [
    (torch.randn(4, 3, 9, 9), ValueError, r"^x must have a shape the converted model takes, got \[4, 3, 9, 9\]: "),
    (torch.randn(4, 1, 8, 8), ValueError, r"^x must have a shape the converted model takes, got \[4, 1, 8, 8\]: .*"
                                          r"channels"),
    (torch.randn(4, 3, 8), ValueError, r"^x must have a shape the converted model takes, got \[4, 3, 8\]"),
    (torch.randn(0, 3, 8, 8), ValueError, r"^x must be a non-empty batch \[N, \.\.\.\] with N ≥ 1 and every size "
                                          r"≥ 1, got shape \[0, 3, 8, 8\]$"),
    (torch.randn(4, 3, 8, 8).double(), ValueError, r"^x must have dtype torch.float32 \(the dtype of the model's "
                                                   r"parameters\), got torch.float64$"),
    (torch.ones(4, 3, 8, 8, dtype=torch.long), ValueError, r"^x must be a floating-point tensor, got dtype "
                                                           r"torch.int64$"),
    ([[1.0]], TypeError, r"^x must be a tensor \[N, \.\.\.\], got list$"),
    (torch.randn(1, 3, 8, 8), ValueError, r"^x must have N ≥ 2 in training: the model's batch-statistics norms"),
], ids=["size", "channels", "rank", "empty", "float64", "int", "list", "one"])
def test_converted_model_refuses_bad_input_and_moves_no_statistic(x, exc, match) -> None:
    model = make_converted()
    with refused(model, exc, match):
        model(x, 1, 2.0)
    assert all(m.training for m in model.modules()), "the shape check left a module in evaluation mode"
    model(torch.randn(4, 3, 8, 8), 1, 2.0)


def test_converted_model_refuses_a_bad_task_or_scale_before_any_layer_runs() -> None:
    model = make_converted()
    x = torch.randn(4, 3, 8, 8)
    for args, exc, match in [((x, T, 2.0), ValueError, r"^task must be in \[0, 3\), got 3$"),
                             ((x, 1, None), ValueError, r"^s must be given while training"),
                             ((x, 1, -1.0), ValueError, r"^s must be a finite number > 0, got -1.0$")]:
        with refused(model, exc, match), no_layer_runs(model):
            model(*args)


def test_converted_vit_refuses_bad_pixel_values() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=16, num_labels=3)
    model = hatnorm.convert(transformers.ViTForImageClassification(config), num_tasks=T, norm="masked_ln").train()
    for x, exc, match in [
        (torch.randn(2, 1, 8, 8), ValueError, r"^pixel_values must have shape \[N, 3, 8, 8\] with N ≥ 1, got "
                                              r"\[2, 1, 8, 8\]$"),
        (torch.randn(0, 3, 8, 8), ValueError, r"^pixel_values must have shape \[N, 3, 8, 8\] with N ≥ 1, got \[0, "),
        (torch.randn(2, 3, 8, 8).double(), ValueError, r"^pixel_values must have dtype torch.float32"),
    ]:
        with refused(model, exc, match), no_layer_runs(model):
            model(x, 1, 2.0)
    with refused(model, ValueError, r"^task must be in \[0, 3\), got 3$"), no_layer_runs(model):
        model(torch.randn(2, 3, 8, 8), 3, 2.0)


def test_open_gates_refuses_something_that_is_not_a_model() -> None:
    with pytest.raises(TypeError, match=r"^model must be an nn.Module, got str$"):
        hatnorm.open_gates("model")


# --- HAT's loss, optimizer and wiring -------------------------------------------------------------------------


def hat_mid_task() -> tuple[Net, hatnorm.HAT, torch.optim.Optimizer]:
    """Task 0 learned, task 1 active after one real step with momentum, gradients of a second batch in place."""
    net, hat = make_hat()
    trained_step(net, hat)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    hat.protect(2.0)
    hat.step(optimizer)
    optimizer.zero_grad()
    net(torch.randn(4, 3), 1, 2.0).square().sum().backward()
    return net, hat, optimizer


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_loss_refuses_a_non_finite_task_loss(value) -> None:
    net, hat, optimizer = hat_mid_task()
    with refused(net, ValueError, rf"^task_loss must be finite, got {value}: the batch had NaN/inf inputs or "
                                  r"training diverged$", optimizer=optimizer, hat=hat):
        hat.loss(torch.tensor(value), 2.0)
    assert torch.isfinite(hat.loss(torch.tensor(0.5), 2.0))


@pytest.mark.parametrize(("task_loss", "match"), [
    (0.5, r"got 0.5$"),
    (torch.ones(3), r"got a tensor of shape \[3\] and dtype torch.float32$"),
    (torch.tensor(1), r"got a tensor of shape \[\] and dtype torch.int64$"),
    (None, r"got None$"),
])
def test_loss_refuses_a_task_loss_that_is_not_a_scalar_tensor(task_loss, match) -> None:
    net, hat, optimizer = hat_mid_task()
    with refused(net, TypeError, r"^task_loss must be a one-element floating-point tensor \(the batch's mean loss\), "
                 + match, optimizer=optimizer, hat=hat):
        hat.loss(task_loss, 2.0)


def test_loss_check_does_not_break_a_compiled_graph() -> None:
    """The finiteness check reads a value, which would break a compiled graph: it is skipped while compiling."""
    _, hat, _ = hat_mid_task()
    compiled = torch.compile(lambda loss: hat.loss(loss, 2.0), backend="eager", fullgraph=True)
    assert torch.isnan(compiled(torch.tensor(math.nan)))
    assert torch.equal(compiled(torch.tensor(0.5)), hat.loss(torch.tensor(0.5), 2.0))


@pytest.mark.parametrize(("s", "match"), [
    (0.0, r"s must be a finite number > 0, got 0.0"),
    (math.nan, r"s must be a finite number > 0, got nan"),
    (torch.tensor([1.0, 2.0]), r"s must be a number > 0 or a one-element float tensor, got a tensor of shape \(2,\)"),
])
@pytest.mark.parametrize("method", ["protect", "regularizer", "loss"])
def test_hat_refuses_a_bad_scale_and_keeps_optimizer_and_task_state(method, s, match) -> None:
    net, hat, optimizer = hat_mid_task()
    call = {"protect": lambda: hat.protect(s), "regularizer": lambda: hat.regularizer(s),
            "loss": lambda: hat.loss(torch.tensor(0.5), s)}[method]
    with refused(net, ValueError, match, optimizer=optimizer, hat=hat):
        call()


def test_hat_calls_out_of_order_change_nothing() -> None:
    net, hat, optimizer = hat_mid_task()
    with refused(net, RuntimeError, r"^task 1 is still being trained; call end_task\(\) before begin_task\(2\)$",
                 optimizer=optimizer, hat=hat):
        hat.begin_task(2)
    with refused(net, TypeError, r"^optimizer must be a torch.optim.Optimizer, got dict$", optimizer=optimizer,
                 hat=hat):
        hat.step(optimizer.state_dict())
    hat.end_task()
    with refused(net, ValueError, r"^task must be a task not learned yet, got 0; learned: \[0, 1\]$",
                 optimizer=optimizer, hat=hat):
        hat.begin_task(0)
    for call, what in [(lambda: hat.protect(2.0), "protect"), (lambda: hat.step(optimizer), "step"),
                       (lambda: hat.loss(torch.tensor(0.5), 2.0), "regularizer"), (hat.end_task, "end_task")]:
        with refused(net, RuntimeError, rf"^{what} needs an active task; call begin_task\(task\) first$",
                     optimizer=optimizer, hat=hat):
            call()


def test_hat_constructor_refuses_layers_that_are_not_a_sequence() -> None:
    net = Net()
    with refused(net, TypeError, r"^layers must be a sequence of hatnorm.Layer, got int$"):
        hatnorm.HAT(net, 5)


# --- heads ----------------------------------------------------------------------------------------------------


def test_heads_refuse_a_bad_input_type_or_dtype() -> None:
    heads = hatnorm.TaskHeads(4, [2, 3, 4], num_tasks=T)
    for x, exc, match in [
        ([[1.0] * 4], TypeError, r"^x must be a tensor of shape \[N, 4\], got list$"),
        (torch.ones(2, 4, dtype=torch.long), ValueError, r"^x must be a floating-point tensor, got dtype torch.int64$"),
        (torch.ones(2, 4, dtype=torch.float64), ValueError, r"^x must have dtype torch.float32"),
    ]:
        with refused(heads, exc, match):
            heads(x, 0)


def test_convolutional_heads_take_feature_maps_and_refuse_a_bad_configuration() -> None:
    heads = hatnorm.TaskHeads(4, [2, 3, 4], num_tasks=T, conv=nn.Conv2d(4, 9, 1))
    assert heads.convolutional and heads(torch.randn(2, 4, 5, 5), 2).shape == (2, 4, 5, 5)
    with refused(heads, ValueError, r"^x must have shape \[N, 4, H, W\] with N, H, W ≥ 1, got \[2, 4\]$"):
        heads(torch.randn(2, 4), 0)
    for conv, exc, match in [
        (nn.Linear(4, 2), TypeError, r"^conv must be an nn\.Conv1d, nn\.Conv2d or nn\.Conv3d, got Linear$"),
        (nn.Conv2d(4, 4, 1, groups=2), ValueError, r"^conv must have groups=1 and in_features=4 input channels, "
                                                    r"got groups=2 and 4 input channels$"),
        (nn.Conv2d(3, 4, 1), ValueError, r"got groups=1 and 3 input channels$"),
    ]:
        with pytest.raises(exc, match=match):
            hatnorm.TaskHeads(4, 2, num_tasks=T, conv=conv)
    with pytest.raises(TypeError, match=r"^bias must be a bool, got 'no'$"):
        hatnorm.TaskHeads(4, 2, num_tasks=T, bias="no")
    assert all(h.bias is None for h in hatnorm.TaskHeads(4, [2, 3, 4], num_tasks=T, bias=False).heads)


# --- build and the registries -----------------------------------------------------------------------------


@pytest.mark.parametrize(("num_classes", "exc", "match"), [
    ([2, 2], ValueError, r"^num_classes must have one count per task \(3\), got 2: \[2, 2\]$"),
    ([2, 0, 2], ValueError, r"^num_classes\[1\] must be an int ≥ 1, got 0$"),
    ([2, 2, 2.5], ValueError, r"^num_classes\[2\] must be an int ≥ 1, got 2.5$"),
    ([2, True, 2], ValueError, r"^num_classes\[1\] must be an int ≥ 1, got True$"),
    (0, ValueError, r"^num_classes must be an int ≥ 1, got 0$"),
    ("10", TypeError, r"^num_classes must be an int or a sequence of 3 ints, got '10'$"),
    (None, TypeError, r"^num_classes must be an int or a sequence of 3 ints, got None$"),
])
def test_build_refuses_wrong_per_task_class_counts(num_classes, exc, match) -> None:
    with pytest.raises(exc, match=match):
        hatnorm.build("mlp", num_tasks=T, norm="masked_bn", num_classes=num_classes)


def test_build_takes_numpy_class_counts() -> None:
    model = hatnorm.build("mlp", num_tasks=T, num_classes=np.int64(4), in_features=8, hidden=(4,))
    assert model.heads.num_classes == [4, 4, 4]


@pytest.mark.parametrize(("name", "options", "exc", "match"), [
    ("mlp", {"hidden": ()}, ValueError, r"^hidden must be a non-empty sequence of layer widths, got \(\)$"),
    ("mlp", {"hidden": (8, 0)}, ValueError, r"^hidden\[1\] must be an int ≥ 1, got 0$"),
    ("mlp", {"in_features": -1}, ValueError, r"^in_features must be an int ≥ 1, got -1$"),
    ("mlp", {"dropout": 1.0}, ValueError, r"^dropout must be a number in \[0, 1\), got 1.0$"),
    ("alexnet", {"in_channels": 0}, ValueError, r"^in_channels must be an int ≥ 1, got 0$"),
    ("resnet18", {"in_channels": 2.0}, ValueError, r"^in_channels must be an int ≥ 1, got 2.0$"),
    ("vit", {"norm": "masked_ln", "mlp_dim": -4}, ValueError, r"^mlp_dim must be an int ≥ 1, got -4$"),
    ("vit", {"norm": "masked_ln", "dim_head": 2.5}, ValueError, r"^dim_head must be an int ≥ 1, got 2.5$"),
    ("vit", {"norm": "masked_ln", "in_channels": True}, ValueError, r"^in_channels must be an int ≥ 1, got True$"),
    ("mlp", {"widht": 2}, TypeError, r"widht"),
    ("no_such_arch", {}, ValueError, r"^name: unknown architecture 'no_such_arch'; registered: \["),
    ("vit", {"norm": "masked_bn"}, ValueError, r"^norm 'masked_bn' does not fit architecture 'vit'; allowed: \["),
    ("mlp", {"norm": 3}, TypeError, r"^norm must be a registered norm name or a NormSpec, got 3$"),
    ("mlp", {"num_tasks": 0}, ValueError, r"^num_tasks must be an int ≥ 1, got 0$"),
    ("mlp", {"num_tasks": 10**6}, ValueError, r"^num_tasks must be ≤ 10,000 .*, got 1,000,000$"),
    ("mlp", {"reference": 1}, TypeError, r"^reference must be a bool, got 1$"),
])
def test_build_refuses_bad_options(name, options, exc, match) -> None:
    kwargs = {"num_tasks": T, "num_classes": 2} | options
    with pytest.raises(exc, match=match):
        hatnorm.build(name, **kwargs)


@pytest.mark.parametrize(("register", "kind"), [
    (lambda: hatnorm.register_norm("test_errors_norm", family="batch")(3), "norm"),
    (lambda: hatnorm.register_architecture("test_errors_arch2", family="batch")("resnet"), "architecture"),
    (lambda: hatnorm.register_policy("test_errors_policy")(None), "gradient policy"),
])
def test_registering_something_that_cannot_build_changes_nothing(register, kind) -> None:
    names = (hatnorm.list_norms(), hatnorm.list_architectures(), hatnorm.list_policies())
    with pytest.raises(TypeError, match=rf"^the registered {kind} must be a class or function that builds it, got "):
        register()
    assert (hatnorm.list_norms(), hatnorm.list_architectures(), hatnorm.list_policies()) == names


@pytest.mark.parametrize(("call", "match"), [
    (lambda: hatnorm.register_norm("", family="batch")(hatnorm.MaskedBatchNorm2d), r"^name must be a non-empty "
                                                                                    r"string, got ''$"),
    (lambda: hatnorm.register_norm("x", family="conv"), r"^family must be one of \['batch', 'layer', 'any'\], got "
                                                        r"'conv'$"),
    (lambda: hatnorm.list_norms("conv"), r"^family must be one of \['batch', 'layer', 'any'\] or None, got 'conv'$"),
    (lambda: hatnorm.get_norm(None), r"^name: unknown norm None; registered: \["),
    (lambda: hatnorm.get_norm(["masked_bn"]), r"^name: unknown norm \['masked_bn'\]; registered: \["),
])
def test_registry_refuses_bad_names(call, match) -> None:
    names = hatnorm.list_norms()
    with pytest.raises(ValueError, match=match):
        call()
    assert hatnorm.list_norms() == names


# --- the other public pieces ------------------------------------------------------------------------------


def test_mask_sources_refuse_what_is_not_a_mask_source() -> None:
    gate = hatnorm.HATGate(C, num_tasks=T)
    for make, name in [(lambda: hatnorm.Residual(gate, "g"), "paths"), (lambda: hatnorm.Flatten(3, 4), "channels"),
                       (lambda: hatnorm.Concat(gate, None), "parts")]:
        with pytest.raises(TypeError, match=rf"^{name} must be gates or other mask sources \(hatnorm.MaskSource\), "
                                            r"got a (str|int|NoneType)$"):
            make()


def test_token_embedding_refuses_patches_of_the_wrong_shape() -> None:
    tokens = hatnorm.TokenEmbedding(4, 8)
    with refused(tokens, ValueError, r"^patches must have shape \[N, 4, 8\] with N ≥ 1, got \[2, 5, 8\]$"):
        tokens(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"^num_patches must be an int ≥ 1, got 0$"):
        hatnorm.TokenEmbedding(0, 8)


@pytest.mark.parametrize(("call", "exc", "match"), [
    (lambda: hatnorm.hat_gate(torch.zeros(3), 0.0), ValueError, r"^s must be a finite number > 0, got 0.0$"),
    (lambda: hatnorm.hat_gate([0.0], 1.0), TypeError, r"^e must be a floating-point tensor, got list$"),
    (lambda: hatnorm.hat_gate(torch.zeros(3, dtype=torch.long), 1.0), TypeError,
     r"^e must be a floating-point tensor, got dtype torch.int64$"),
    (lambda: hatnorm.compensation_factor(torch.zeros(3), 1.0, -400.0), ValueError,
     r"^s_max must be a finite number > 0, got -400.0$"),
    (lambda: hatnorm.compensate(torch.zeros(2), torch.zeros(3), 1.0, 400.0), ValueError,
     r"^grad must have the shape of e, \[3\], got \[2\]$"),
    # a CPU tensor scale is read (free there): 0 would make the embeddings NaN, −400 would invert the gates
    (lambda: hatnorm.hat_gate(torch.zeros(3), torch.tensor(0.0)), ValueError,
     r"^s must be a finite number > 0, got a tensor holding 0.0$"),
    (lambda: hatnorm.compensation_factor(torch.zeros(3), torch.tensor(-400.0), 400.0), ValueError,
     r"^s must be a finite number > 0, got a tensor holding -400.0$"),
    (lambda: hatnorm.hat_gate(torch.zeros(3), torch.tensor(float("nan"))), ValueError,
     r"^s must be a finite number > 0, got a tensor holding nan$"),
])
def test_gate_functions_refuse_bad_input(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()


A = [[0.9, 0.0], [0.8, 0.7]]


@pytest.mark.parametrize(("call", "exc", "match"), [
    (lambda: metrics.average_accuracy("A"), TypeError, r"^matrix must be a square matrix \[T, T\] of accuracies "
                                                       r"\(numbers\), got 'A'$"),
    (lambda: metrics.average_accuracy(None), TypeError, r"^matrix must be a square matrix .*, got None$"),
    (lambda: metrics.average_accuracy([[0.9, 0.1], [0.8]]), ValueError, r"^matrix must be a square matrix .*, got "
                                                                        r"\[\[0.9, 0.1\], \[0.8\]\] \("),
    (lambda: metrics.average_accuracy([0.9, 0.8]), ValueError, r"^matrix must be a non-empty square matrix \[T, T\], "
                                                               r"got shape \[2\]$"),
    (lambda: metrics.average_accuracy(np.zeros((0, 0))), ValueError, r"^matrix must be a non-empty square matrix"),
    (lambda: metrics.average_accuracy([[math.nan, 0.0], [0.5, 0.5]]), ValueError,
     r"^matrix must be finite on and below the diagonal"),
    (lambda: metrics.average_accuracy(A, after=2), ValueError, r"^after must be an int in \[0, 2\), got 2$"),
    (lambda: metrics.average_accuracy(A, after=True), ValueError, r"^after must be an int in \[0, 2\), got True$"),
    (lambda: metrics.backward_transfer(torch.ones(2, 3)), ValueError, r"^matrix must be a non-empty square matrix"),
    (lambda: metrics.forgetting_ratio(A, [0.5], A), ValueError, r"^joint must be \[2, 2\] and random \[2\], got "
                                                                r"\[2, 2\] and \[1\]$"),
    (lambda: metrics.forgetting_ratio(A, [0.5, math.nan], A), ValueError, r"^random must be finite, got "),
    (lambda: metrics.forgetting_ratio(A, "r", A), TypeError, r"^random must be one accuracy per task, got 'r'$"),
    (lambda: metrics.mean_forgetting_ratio(A, [0.5, 0.5], [[1.0]]), ValueError, r"^joint must be \[2, 2\]"),
    (lambda: metrics.random_stratified_accuracy([0, 1], torch.tensor([0])), TypeError,
     r"^train_labels must be an integer tensor of class labels, got \[0, 1\]$"),
    (lambda: metrics.random_stratified_accuracy(torch.tensor([0]), torch.tensor([0.5])), TypeError,
     r"^test_labels must be an integer tensor of class labels, got dtype torch.float32$"),
    (lambda: metrics.random_stratified_accuracy(torch.tensor([0]), torch.tensor([], dtype=torch.long)), ValueError,
     r"^train_labels and test_labels must not be empty, got 1 and 0 labels$"),
])
def test_metrics_refuse_bad_input(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(("call", "exc", "match"), [
    (lambda: data.split_mnist(channels=True), ValueError, r"^channels must be 1 or 3, got True$"),
    (lambda: data.split_mnist(num_tasks=6), ValueError, r"^num_tasks must be in \[1, 5\] for Split-MNIST"),
    (lambda: data.split_mnist(size=27), ValueError, r"^size must be ≥ 28 \(MNIST digits are 28×28\), got 27$"),
    (lambda: data.split_mnist(test_fraction="0.2"), ValueError,
     r"^test_fraction must be a number in \(0, 1\), got '0.2'$"),
    (lambda: data.permuted_mnist(num_tasks=0), ValueError, r"^num_tasks must be an int ≥ 1, got 0$"),
    (lambda: data.stratified_split([0, 1], 0.5, 0), TypeError,
     r"^labels must be a 1-D integer tensor of class labels, got \[0, 1\]$"),
    (lambda: data.stratified_split(torch.zeros(4), 0.5, 0), TypeError,
     r"^labels must be a 1-D integer tensor of class labels, got shape \[4\] and dtype torch.float32$"),
    (lambda: data.stratified_split(torch.zeros(4, dtype=torch.long), 1.0, 0), ValueError,
     r"^test_fraction must be a number in \(0, 1\), got 1.0$"),
    (lambda: data.stratified_split(torch.zeros(4, dtype=torch.long), 0.5, "0"), ValueError,
     r"^seed must be an int, got '0'$"),
    (lambda: data.cifar_sequence(None), TypeError,
     r"^data_root must be a folder path \(str or os.PathLike\), got None$"),
    (lambda: data.cifar_sequence(".", num_tasks=11), ValueError,
     r"^num_tasks must be in \[1, 10\] for the CIFAR sequence, got 11$"),
])
def test_data_functions_refuse_bad_input(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(("module", "argv", "message"), [
    (sweep, ["--width", "50"], "--width must be ≤ 16 for alexnet (a width multiplier), got 50.0"),
    (policy, ["--width", "17"], "--width must be ≤ 16 for alexnet (a width multiplier), got 17.0"),
    (sweep, ["--s-max", "0"], "--s-max: must be a finite number > 0, got 0"),
    (sweep, ["--c", "nan"], "--c: must be a finite number ≥ 0, got nan"),
    (policy, ["--alpha", "-1"], "--alpha: must be a finite number > 0, got -1"),
    (policy, ["--patience", "0"], "--patience: must be an int ≥ 1, got 0"),
])
def test_ablation_cli_refuses_options_out_of_range(module, argv, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        module.main([*argv, "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a refused command wrote files"


def test_task_labels_outside_its_classes_are_refused_at_construction() -> None:
    x = torch.randn(6, 4)
    good = TensorDataset(x, torch.tensor([0, 1, 0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"^Task 'digits': test labels must be local to the task, in \[0, 2\) for "
                                         r"its classes \[3, 4\]; got 4 at sample 2$"):
        Task("digits", (3, 4), good, TensorDataset(x, torch.tensor([0, 1, 4, 1, 0, 1])))


def test_lbfgs_is_refused_by_hat_step_with_nothing_changed() -> None:
    torch.manual_seed(0)
    model = hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=2, in_features=4, hidden=(8,))
    hat = hatnorm.HAT(model)
    hat.begin_task(0)
    optimizer = torch.optim.LBFGS(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"^optimizer must be one whose step\(\) needs no closure .*got LBFGS"):
        hat.step(optimizer)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("cls", NORMS, ids=lambda c: c.__name__)
def test_norm_rechecks_a_gate_written_in_place_after_a_good_call(cls) -> None:
    """A gate tensor's range is checked once while it is unchanged (a transformer's norms share one); an
    in-place write to it is seen."""
    norm = make_norm(cls)
    x, mask = torch.randn(NORMS[cls][0]), MASK.clone()
    norm(x, mask, 0)
    mask.fill_(1.5)
    with refused(norm, ValueError, r"mask must hold gate values in \[0, 1\], got 6 outside"):
        norm(x, mask, 0)

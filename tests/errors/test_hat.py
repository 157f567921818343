"""HAT refuses a bad task, scale, loss, optimizer, option or wiring, and calls out of order, with the model,
the optimizer and its task state unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hatnorm
from errors._support import GATE_TASK_CASES, C, Net, T, hat_mid_task, make_hat, refused


@pytest.mark.parametrize(("task", "exc", "match"), GATE_TASK_CASES)
def test_begin_task_refuses_a_bad_task(task, exc, match) -> None:
    net, hat = make_hat()
    with refused(net, exc, match):
        hat.begin_task(task)
    assert hat.task is None
    assert hat.learned_tasks == []
    hat.begin_task(0)

@pytest.mark.parametrize(("s", "match"), [
    (0.0, r"s must be a finite number > 0, got 0.0"),
    (-2.0, r"s must be a finite number > 0, got -2.0"),
    (math.nan, r"s must be a finite number > 0, got nan"),
    (None, r"s must be a finite number > 0, got None"),
])
@pytest.mark.parametrize("method", ["protect", "regularizer", "loss"])
def test_hat_refuses_a_bad_scale(method, s, match) -> None:
    net, hat, _ = hat_mid_task(step=False)
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
    net, hat, _ = hat_mid_task(step=False)
    with refused(net, TypeError, r"optimizer must be a torch.optim.Optimizer, got list"):
        hat.step([torch.optim.SGD(net.parameters(), lr=0.1)])


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"c": -0.5}, ValueError, r"c must be a finite number ≥ 0, got -0.5"),
    ({"clamp": 0.0}, ValueError, r"clamp must be a finite number > 0, got 0.0"),
    ({"thres_cosh": -1.0}, ValueError, r"thres_cosh must be a finite number > 0, got -1.0"),
    ({"policy": "ewc"}, ValueError, r"unknown gradient policy 'ewc'; registered: \[.*'adahat', 'fg_adahat', 'hat'.*\]"),
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
        hatnorm.HAT(net, [hatnorm.blocks.Layer(net.fc1, out=net.g2), *net.layers()[1:]])
    with pytest.raises(ValueError, match=r"layers\[2\].inp has 4 units but the layer reads 6 input features"):
        hatnorm.HAT(net, [*net.layers()[:2], hatnorm.blocks.Layer(net.fc2, out=net.g2, inp=net.g2)])
    with pytest.raises(ValueError, match=r"layers\[0\].module must be a submodule of model"):
        hatnorm.HAT(net, [hatnorm.blocks.Layer(nn.Linear(3, C), out=net.g1), *net.layers()])
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

# --- HAT's loss, optimizer and wiring -------------------------------------------------------------------------

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
    with refused(net, TypeError, r"^layers must be a sequence of hatnorm.blocks.Layer, got int$"):
        hatnorm.HAT(net, 5)


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


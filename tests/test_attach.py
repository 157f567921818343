"""HAT.attach / detach: HAT's optimizer safety on a plain ``optimizer.step()``, for trainers that step themselves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from properties.models import gated_net, isolating_norms
from properties.strategies import batch_sizes, generator, optimizers, randn, seeded, seeds
from test_hat import OPTIMIZERS, Net, spread

import hatnorm
from hatnorm.training import TrainConfig
from hatnorm.training._fit import make_optimizer


def trainer_optimizer(name: str):
    """The trainer's optimizer ``name`` as :class:`~hatnorm.training.TrainConfig` configures it."""
    config = TrainConfig(optimizer=name, momentum=0.9 if name == "sgd" else 0.0, weight_decay=0.1)
    return lambda params: make_optimizer(torch.nn.ParameterList(params), config, 0.05)


# the optimizers of the optimizer-safety tests, and every optimizer the trainer offers
ALL_OPTIMIZERS = OPTIMIZERS | {f"trainer_{name}": trainer_optimizer(name) for name in hatnorm.training.OPTIMIZERS}


def train_steps(net: Net, hat: hatnorm.HAT, optimizer: torch.optim.Optimizer, task: int, steps: int,
                attached: bool) -> None:
    """test_hat's training steps, with ``optimizer.step()`` called directly when ``attached``."""
    net.train()
    s = 1.0
    for _ in range(steps):
        x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 2, (8,))
        loss = hat.loss(F.cross_entropy(net(x, task, s), y), s)
        optimizer.zero_grad()
        loss.backward()
        hat.protect(s)
        if attached:
            optimizer.step()
        else:
            hat.step(optimizer)


def two_tasks(make_optimizer, attached: bool) -> tuple[Net, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """test_hat's optimizer-safety scenario: task 0 trained, a protected and a free unit on every gate, task 1
    trained; returns the net, the multipliers of task 1 and the parameters before task 1."""
    torch.manual_seed(0)
    net = Net(binarize=True)
    hat = hatnorm.HAT(net, net.layers())
    optimizer = make_optimizer(list(net.parameters()))
    if attached:
        hat.attach(optimizer)
    spread(net, 0)
    spread(net, 1)
    hat.begin_task(0)
    train_steps(net, hat, optimizer, 0, 3, attached)
    hat.end_task()
    with torch.no_grad():
        for g in net.gates():
            g.cumulative[0], g.cumulative[1] = 1.0, 0.0
    hat.begin_task(1)
    mults = hat.gradient_multipliers()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    train_steps(net, hat, optimizer, 1, 3, attached)
    return net, mults, before


@pytest.mark.parametrize("make_optimizer", ALL_OPTIMIZERS.values(), ids=ALL_OPTIMIZERS.keys())
def test_attached_step_restores_frozen_entries_and_moves_the_others(make_optimizer) -> None:
    net, mults, before = two_tasks(make_optimizer, attached=True)
    after = dict(net.named_parameters())
    assert any(bool((m == 0).any()) for m in mults.values())
    for name, mult in mults.items():
        frozen = mult == 0
        assert torch.equal(after[name].detach()[frozen], before[name][frozen]), name
        if (~frozen).any():
            assert not torch.equal(after[name].detach()[~frozen], before[name][~frozen]), name
    for name in ("task_heads.heads.1.weight", "task_heads.heads.1.bias"):
        assert not torch.equal(after[name].detach(), before[name]), name


@pytest.mark.parametrize("make_optimizer", ALL_OPTIMIZERS.values(), ids=ALL_OPTIMIZERS.keys())
def test_attached_steps_give_the_weights_of_hat_step(make_optimizer) -> None:
    attached, _, _ = two_tasks(make_optimizer, attached=True)
    stepped, _, _ = two_tasks(make_optimizer, attached=False)
    for (name, p), q in zip(attached.state_dict().items(), stepped.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "cnn"])
@given(data=st.data(), seed=seeds, batch=batch_sizes, make_optimizer=optimizers(),
       steps=st.integers(min_value=1, max_value=4))
def test_no_forgetting_with_an_attached_optimizer(conv, data, seed, batch, make_optimizer, steps):
    norm = data.draw(st.sampled_from(isolating_norms(conv)), label="norm")
    with seeded(seed):
        model = gated_net(norm, 3, [4, 5], num_tasks=2, conv=conv, num_classes=2)
    hat = hatnorm.HAT(model)
    optimizer = make_optimizer(model.parameters())
    hat.attach(optimizer)
    gen = generator(seed)
    sample = (3, 2, 2) if conv else (3,)
    probe = randn((4, *sample), gen, torch.float32)
    outputs = []
    for task in range(2):
        model.train()
        hat.begin_task(task)
        for b in range(steps):
            s = hat.scale(b, steps)
            task_loss = F.cross_entropy(model(randn((batch, *sample), gen, torch.float32), task=task, s=s),
                                        torch.randint(2, (batch,), generator=gen))
            assume(bool(torch.isfinite(task_loss)))
            optimizer.zero_grad()
            hat.loss(task_loss, s).backward()
            hat.protect(s)
            optimizer.step()
        hat.end_task()
        assume(all(bool(torch.isfinite(p).all()) for p in model.parameters()))
        model.eval()
        with torch.no_grad():
            outputs.append(model(probe, task=0))
    assert torch.equal(outputs[0], outputs[1])


def begun(optimizer_name: str = "sgd") -> tuple[Net, hatnorm.HAT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = Net()
    hat = hatnorm.HAT(net, net.layers())
    optimizer = OPTIMIZERS["sgd_momentum_wd" if optimizer_name == "sgd" else optimizer_name](net.parameters())
    hat.begin_task(1)
    with torch.no_grad():
        net.g1.embedding[1] = torch.tensor([10.0, -10.0, 5.0, -7.0])
    return net, hat, optimizer


def backward(net: Net, hat: hatnorm.HAT, scaler: torch.amp.GradScaler | None = None) -> None:
    loss = hat.loss(F.cross_entropy(net(torch.randn(8, 2, 4, 4), 1, 1.0), torch.randint(0, 2, (8,))), 1.0)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        net.conv1.weight.grad[0, 0, 0, 0] = float("inf")  # an overflow: the scaler skips optimizer.step()
    hat.protect(1.0)


def test_an_attached_step_clamps_the_active_embedding() -> None:
    net, hat, optimizer = begun()
    hat.attach(optimizer)
    optimizer.step()  # no gradients: only the hooks act
    assert torch.equal(net.g1.embedding[1].detach(), torch.tensor([6.0, -6.0, 5.0, -6.0]))


def test_a_step_the_gradient_scaler_skips_runs_neither_hook() -> None:
    net, hat, optimizer = begun("adam")
    hat.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu")
    backward(net, hat, scaler)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    scaler.step(optimizer)
    scaler.update()
    for name, p in net.named_parameters():
        assert torch.equal(p.detach(), before[name]), name  # nothing moved, nor was the embedding clamped
    optimizer.zero_grad()
    backward(net, hat)
    optimizer.step()  # a step that happens runs both hooks
    assert torch.equal(net.g1.embedding[1].detach().abs().amax(), torch.tensor(6.0))


def test_detach_makes_the_step_plain_again() -> None:
    net, hat, optimizer = begun()
    hat.attach(optimizer)
    hat.detach(optimizer)
    optimizer.step()
    assert torch.equal(net.g1.embedding[1].detach(), torch.tensor([10.0, -10.0, 5.0, -7.0]))
    hat.attach(optimizer)  # attachable again after detach
    optimizer.step()
    assert torch.equal(net.g1.embedding[1].detach(), torch.tensor([6.0, -6.0, 5.0, -6.0]))


def test_hat_step_on_an_attached_optimizer_steps_once() -> None:
    for attached in (False, True):
        net, hat, optimizer = begun("adam")
        if attached:
            hat.attach(optimizer)
        torch.manual_seed(1)
        backward(net, hat)
        hat.step(optimizer)
        if not attached:
            expected = {n: p.detach().clone() for n, p in net.named_parameters()}
    assert optimizer.state[net.conv1.weight]["step"] == 1
    for name, p in net.named_parameters():
        assert torch.equal(p.detach(), expected[name]), name


# --- errors ------------------------------------------------------------------------------------------------


def test_attach_refuses_what_it_cannot_hook() -> None:
    net, hat, optimizer = begun()
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer, got list"):
        hat.attach([optimizer])
    with pytest.raises(TypeError, match="got LBFGS"):
        hat.attach(torch.optim.LBFGS(net.parameters()))
    hat.attach(optimizer)
    with pytest.raises(ValueError, match="optimizer must not be attached already, got a SGD"):
        hat.attach(optimizer)
    other = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer must be one attached to this HAT, got a SGD .*\(1 attached\)"):
        hat.detach(other)
    optimizer.step()  # still attached once: the refused calls changed nothing
    assert torch.equal(net.g1.embedding[1].detach(), torch.tensor([6.0, -6.0, 5.0, -6.0]))


def test_an_attached_step_outside_a_task_is_refused_before_it_moves_anything() -> None:
    net, hat, optimizer = begun()
    hat.attach(optimizer)
    backward(net, hat)
    hat.end_task()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with pytest.raises(RuntimeError, match=r"optimizer.step\(\) on an optimizer attached to HAT needs an active task"):
        optimizer.step()
    for name, p in net.named_parameters():
        assert torch.equal(p.detach(), before[name]), name

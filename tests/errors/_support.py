"""What the error tests share: the state a refused call must leave unchanged, the checks around a refused call,
the toy HAT network and the HAT step ritual (task 0 learned, task 1 mid-way)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hatnorm

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


GATE_TASK_CASES = [
    (T, ValueError, r"task must be in \[0, 3\), got 3"),
    (-1, ValueError, r"task must be in \[0, 3\), got -1"),
    (1.0, TypeError, r"task must be an int in \[0, 3\), got 1.0 of type float"),
    (None, TypeError, r"task must be an int in \[0, 3\), got None of type NoneType"),
    (torch.tensor(0.0), TypeError,
     r"task must be an int in \[0, 3\), got a tensor of shape \(\) and dtype torch.float32"),
]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, C), nn.Linear(C, 4)
        self.n1 = hatnorm.norms.MaskedBatchNorm1d(C, num_tasks=T)
        self.g1, self.g2 = hatnorm.HATGate(C, num_tasks=T), hatnorm.HATGate(4, num_tasks=T)
        self.task_heads = hatnorm.TaskHeads(4, 2, num_tasks=T)

    def forward(self, x: Tensor, task: int, s: float | None = None) -> Tensor:
        h = F.relu(self.n1(self.fc1(x), self.g1(task, s), task))
        return self.task_heads(F.relu(self.fc2(h) * self.g2(task, s)), task)

    def layers(self) -> list[hatnorm.blocks.Layer]:
        return [hatnorm.blocks.Layer(self.fc1, out=self.g1), hatnorm.blocks.Layer(self.n1, out=self.g1),
                hatnorm.blocks.Layer(self.fc2, out=self.g2, inp=self.g1)]


def make_hat() -> tuple[Net, hatnorm.HAT]:
    torch.manual_seed(0)
    net = Net()
    return net, hatnorm.HAT(net, net.layers())


def hat_mid_task(*, step: bool = True) -> tuple[Net, hatnorm.HAT, torch.optim.Optimizer]:
    """The HAT step ritual: task 0 learned, task 1 begun and real gradients of a batch in place.

    Args:
        step: Also take one real step with momentum on task 1 first, so the optimizer has state, and leave the
            gradients of a second batch in place.

    Returns:
        The network, its HAT and an SGD optimizer with momentum over the network's parameters.
    """
    net, hat = make_hat()
    with torch.no_grad():
        net.g1.embedding[0] = torch.tensor([1.0, -1.0] * 3)
    hat.begin_task(0)
    hat.end_task()
    hat.begin_task(1)
    net.train()
    net(torch.randn(4, 3), 1, 2.0).square().sum().backward()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    if step:
        hat.protect(2.0)
        hat.step(optimizer)
        optimizer.zero_grad()
        net(torch.randn(4, 3), 1, 2.0).square().sum().backward()
    return net, hat, optimizer

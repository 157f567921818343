"""The checks a conversion rule's small model must pass, shared by the rule tests: open gates reproduce the
original, and training a second task with AdamW leaves the first task's outputs bit-identical; and
:func:`filled`, which gives a small model's norms the non-trivial statistics and affine parameters trained
weights have."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import hatnorm

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def filled(model: nn.Module) -> nn.Module:
    """``model`` in evaluation mode, its norms given non-trivial running statistics and affine parameters, as
    trained weights have (seeded: the same model is filled the same way every time)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, NORMS) and m.weight is not None:
                m.weight.uniform_(0.8, 1.2)
            if isinstance(m, NORMS) and m.bias is not None:
                m.bias.normal_(0, 0.05)
    return model.eval()


def assert_open_gates_reproduce(original: nn.Module, norm: dict[str, str], x: torch.Tensor) -> None:
    """Convert ``original`` (HAT covers every parameter) and check every task's output with open gates."""
    converted = hatnorm.convert(original, num_tasks=2, norm=norm, example_input=x)
    hatnorm.HAT(converted)  # every parameter is covered
    hatnorm.open_gates(converted)
    converted.eval()
    with torch.no_grad():
        for task in range(2):
            torch.testing.assert_close(converted(x, task=task), original(x), atol=1e-5, rtol=0)


def assert_a_second_task_forgets_nothing(original: nn.Module, norm: dict[str, str], probe: torch.Tensor) -> None:
    """Convert ``original`` with heads of 3 and 4 classes, train each task 3 AdamW steps (weight decay 0.05) and
    check that task 0's outputs on ``probe`` are bit-identical after task 1."""
    model = hatnorm.convert(original, num_tasks=2, norm=norm, num_classes=[3, 4], example_input=probe)
    hat = hatnorm.HAT(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    outputs = []
    for task, classes in enumerate([3, 4]):
        hat.begin_task(task)
        for b in range(3):
            model.train()
            s = hat.scale(b, 3)
            x, y = torch.randn(8, *probe.shape[1:]) + task, torch.randint(0, classes, (8,))
            loss = hat.loss(F.cross_entropy(model(x, task=task, s=s), y), s)
            opt.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(opt)
        hat.end_task()
        model.eval()
        with torch.no_grad():
            outputs.append(model(probe, task=0))
    assert torch.equal(outputs[0], outputs[1])

"""The steps the benchmarks time: a HAT training step on task 1 after task 0 was learned, an epoch's mean step
over the scale schedule, and the plain PyTorch twin's step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from harness import Compiler, inputs
from plain import PlainAlexNet, PlainResNet18, PlainViT
from torch import Tensor, nn

import hatnorm

BATCHES_PER_EPOCH = 100  # the scale s anneals over this many batches
SCHEDULE_POINTS = 8  # an epoch's mean step: steps at this many evenly spaced batches of the schedule
SCALES = (1.0, 100.0, 400.0)  # s = 1, 100 and s_max

# architecture → (hatnorm options, plain twin, HAT norms to time)
MODELS: dict[str, tuple[dict[str, Any], Callable[..., nn.Module], tuple[str, ...]]] = {
    "resnet18": ({"base_width": 64}, lambda o: PlainResNet18(10, base_width=o["base_width"]),
                 ("masked_bn", "task_bn", "none")),
    "alexnet": ({"width": 1.0}, lambda o: PlainAlexNet(10, width=o["width"]), ("masked_bn", "task_bn", "none")),
    "vit_micro": ({}, lambda o: PlainViT(10), ("masked_ln", "task_ln", "none")),
}
QUICK = {"resnet18": {"base_width": 16}, "alexnet": {"width": 0.25}, "vit_micro": {}}
TARGETS = {("resnet18", "masked_bn"): 1.10, ("vit_micro", "masked_ln"): 1.15}  # SPEC §8, a HAT step / plain

HATStep = Callable[[float], None]


def hat_model(arch: str, norm: str, options: dict[str, Any], num_tasks: int, device: torch.device,
              gate_floor: float) -> nn.Module:
    """The HAT model ``arch`` with ``norm``, seeded, its gates floored at ``gate_floor``."""
    torch.manual_seed(0)
    model = hatnorm.build(arch, num_tasks=num_tasks, norm=norm, num_classes=10, **options).to(device)
    for gate in model.modules():
        if isinstance(gate, hatnorm.HATGate):
            gate.floor = gate_floor
    return model


def hat_step(model: nn.Module, x: Tensor, y: Tensor, compiler: Compiler) -> tuple[HATStep, hatnorm.HAT]:
    """A HAT training step at a given scale s on task 1, after a short task 0 (3 steps across its schedule)."""
    hat = hatnorm.HAT(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def train(task: int) -> HATStep:
        loss_fn = compiler(lambda x, y, s: hat.loss(F.cross_entropy(model(x, task=task, s=s), y), s))

        def step(s: float) -> None:
            s = torch.tensor(s, device=x.device)  # the scale as a tensor: a changing s does not recompile
            loss = loss_fn(x, y, s)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)

        return step

    model.train()
    hat.begin_task(0)
    first = train(0)
    for batch in (0, BATCHES_PER_EPOCH // 2, BATCHES_PER_EPOCH - 1):
        first(hat.scale(batch, BATCHES_PER_EPOCH))
    hat.end_task()
    hat.begin_task(1)
    return train(1), hat


def schedule_scales(hat: hatnorm.HAT) -> list[float]:
    """The scales of ``SCHEDULE_POINTS`` evenly spaced batches of an epoch, first and last included."""
    batches = (round(i * (BATCHES_PER_EPOCH - 1) / (SCHEDULE_POINTS - 1)) for i in range(SCHEDULE_POINTS))
    return [hat.scale(b, BATCHES_PER_EPOCH) for b in batches]


def epoch_of(step: HATStep, scales: list[float]) -> Callable[[], None]:
    """One call that takes a step at each of ``scales``: its time divided by their number is an epoch's mean step."""
    return lambda: [step(s) for s in scales]


def plain_step(model: nn.Module, x: Tensor, y: Tensor, compiler: Compiler) -> Callable[[], None]:
    """The plain twin's training step: forward, cross-entropy, backward, SGD."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = compiler(lambda x, y: F.cross_entropy(model(x), y))
    model.train()

    def step() -> None:
        loss = loss_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def make_step(spec: dict[str, Any], device: torch.device, compiler: Compiler) -> Callable[[], None]:
    """The step a JSON-able ``spec`` names: ``kind`` "plain" (the twin's step) or "hat" (an epoch of HAT steps),
    ``arch``, ``options``, ``batch``, and for HAT ``norm``, ``gate_floor`` and optionally ``num_tasks``."""
    x, y = inputs(spec["batch"], device)
    if spec["kind"] == "plain":
        torch.manual_seed(0)
        return plain_step(MODELS[spec["arch"]][1](spec["options"]).to(device), x, y, compiler)
    model = hat_model(spec["arch"], spec["norm"], spec["options"], spec.get("num_tasks", 10), device,
                      spec["gate_floor"])
    step, hat = hat_step(model, x, y, compiler)
    return epoch_of(step, schedule_scales(hat))

"""torch.compile on a HAT training step: one compilation per task, none between its batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import hatnorm

CASES = [("mlp", "masked_bn", {"in_features": 3 * 32 * 32, "hidden": (32, 16)}),
         ("resnet18", "masked_bn", {"base_width": 4}),
         ("alexnet", "task_bn", {"width": 0.125}),
         ("vit_micro", "masked_ln", {"depth": 1, "dim": 32, "mlp_dim": 32})]


class CountingBackend:
    """A torch.compile backend (AOT autograd, eager kernels) that counts the graphs it is given: every
    recompilation, and every graph break, is a new graph."""

    def __init__(self) -> None:
        self.graphs = 0
        self.inner = torch._dynamo.lookup_backend("aot_eager")

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Tensor]):
        self.graphs += 1
        return self.inner(gm, example_inputs)


@pytest.mark.parametrize(("arch", "norm", "options"), CASES, ids=[f"{a}-{n}" for a, n, _ in CASES])
def test_a_compiled_training_step_does_not_recompile_between_batches(arch: str, norm: str, options: dict) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = hatnorm.build(arch, num_tasks=3, norm=norm, num_classes=4, **options)
    hat = hatnorm.HAT(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    backend = CountingBackend()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    for task in range(2):
        @torch.compile(backend=backend)
        def training_loss(x: Tensor, y: Tensor, s: Tensor, task: int = task) -> Tensor:
            return hat.loss(F.cross_entropy(model(x, task=task, s=s), y), s)

        hat.begin_task(task)
        model.train()
        counts = []
        for b in range(6):
            s = torch.tensor(hat.scale(b, 6))  # a tensor: its changing value is not baked into the graph
            loss = training_loss(x, y, s)
            optimizer.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)
            counts.append(backend.graphs)
        hat.end_task()
        if task == 0:
            model.eval()
            with torch.no_grad():
                after_task_0 = model(x, task=0)
        assert counts[0] >= 1
        assert counts == [counts[0]] * 6, f"task {task}: graphs compiled after each batch {counts}"
    # the compiled step still protects: task 1 left task 0's outputs bit-identical
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, task=0), after_task_0)


def test_the_compiled_step_computes_what_the_eager_step_does() -> None:
    torch.manual_seed(0)
    eager = hatnorm.build("resnet18", num_tasks=2, norm="masked_bn", num_classes=3, base_width=4)
    compiled = hatnorm.build("resnet18", num_tasks=2, norm="masked_bn", num_classes=3, base_width=4)
    compiled.load_state_dict(eager.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    losses = {}
    for name, model, wrap in (("eager", eager, lambda f: f),
                              ("compiled", compiled, torch.compile(backend=CountingBackend()))):
        hat = hatnorm.HAT(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        step_loss = wrap(lambda x, y, s, model=model, hat=hat: hat.loss(F.cross_entropy(model(x, task=0, s=s), y), s))
        hat.begin_task(0)
        model.train()
        losses[name] = []
        for b in range(3):
            s = torch.tensor(hat.scale(b, 3))
            loss = step_loss(x, y, s)
            optimizer.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("selection", ["some", "all", "none"])
def test_compiled_masked_ln_gives_the_eager_outputs_and_gradients(selection: str) -> None:
    """The masked LayerNorm (an autograd.Function whose backward calls ATen's fused LayerNorm backward with the
    masked statistics) gives the same outputs and gradients under torch.compile as eagerly, whichever features
    are selected."""
    gen = torch.Generator().manual_seed(0)
    norm = hatnorm.norms.MaskedLayerNorm(16, num_tasks=2)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
        norm.bias.normal_(generator=gen)
    x = torch.randn(4, 5, 16, generator=gen) * 2 + 1
    embedding = {"some": torch.randn(16, generator=gen), "all": torch.ones(16), "none": -torch.ones(16)}[selection]
    mask, dy = torch.sigmoid(4 * embedding), torch.randn(4, 5, 16, generator=gen)
    results = {}
    for name, forward in (("eager", norm), ("compiled", torch.compile(norm, backend=CountingBackend()))):
        x_in, mask_in = x.clone().requires_grad_(), mask.clone().requires_grad_()
        norm.zero_grad()
        out = forward(x_in, mask_in, 1)
        out.backward(dy)
        results[name] = (out.detach(), x_in.grad, mask_in.grad, norm.weight.grad.clone(), norm.bias.grad.clone())
    for what, eager, compiled in zip(("out", "x", "mask", "weight", "bias"), results["eager"], results["compiled"],
                                     strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5, msg=what)

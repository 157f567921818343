"""hatnorm.convert on forwards with in-place operations whose result is not reassigned: each is kept where it acts
(open gates reproduce the original), or refused naming its line where following it would be unsound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatnorm


class InPlace(nn.Module):
    """conv → BN → an in-place op given by ``kind``, as a statement → conv → BN → pool → Linear."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.gamma = nn.Parameter(torch.linspace(0.5, 2.0, 6).view(1, 6, 1, 1))
        self.conv2, self.bn2 = nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.conv1(x))
        if self.kind == "method":
            h.relu_()
        elif self.kind == "module":
            self.relu(h)
        elif self.kind == "function":
            F.relu(h, inplace=True)
        elif self.kind == "scale":
            h.mul_(self.gamma)
            h.relu_()
        elif self.kind == "view":
            h[:, :3].relu_()  # writes into h through a view
        self.calls.add_(1)
        return self.fc(self.bn2(self.conv2(h)).mean((2, 3)))


def filled(model: nn.Module) -> nn.Module:
    """``model`` with non-trivial BatchNorm statistics, in evaluation mode, its call counter back at 0."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 8, 8) * 2 + 0.5)
    model.calls.zero_()
    return model.eval()


@pytest.mark.parametrize("kind", ["method", "module", "function", "scale", "view"])
def test_an_in_place_op_not_reassigned_is_kept(kind: str) -> None:
    original = filled(InPlace(kind))
    x = torch.randn(4, 3, 8, 8)
    converted = hatnorm.convert(original, num_tasks=2, example_input=x)
    hat = hatnorm.HAT(converted)  # every parameter (γ of the in-place product too) protected
    if kind == "scale":
        assert any(layer.module.__class__.__name__ == "ParameterUse" for layer in hat.layers)
    hatnorm.open_gates(converted)
    converted.eval()
    with torch.no_grad():
        expected = original(x)
        for task in range(2):
            torch.testing.assert_close(converted(x, task=task), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["method", "scale"])
def test_a_model_with_an_in_place_product_forgets_nothing(kind: str) -> None:
    probe = torch.randn(4, 3, 8, 8)
    model = hatnorm.convert(filled(InPlace(kind)), num_tasks=2, num_classes=[3, 3], example_input=probe)
    hat = hatnorm.HAT(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    outputs = []
    for task in range(2):
        hat.begin_task(task)
        for b in range(3):
            model.train()
            s = hat.scale(b, 3)
            x, y = torch.randn(8, 3, 8, 8) + task, torch.randint(0, 3, (8,))
            loss = hat.loss(F.cross_entropy(model(x, task=task, s=s), y), s)
            optimizer.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)
        hat.end_task()
        model.eval()
        with torch.no_grad():
            outputs.append(model(probe, task=0))
    assert torch.equal(outputs[0], outputs[1])


def test_a_buffer_counter_counts_every_call_as_in_the_original() -> None:
    original = filled(InPlace("method"))
    converted = hatnorm.convert(original, num_tasks=2, example_input=torch.randn(2, 3, 8, 8))
    counter = next(b for name, b in converted.named_buffers() if name.endswith("calls"))
    assert int(counter) == 0  # converting moved nothing
    with torch.no_grad():
        for n in (1, 3):  # a new batch size: still one count per call (the shape check moves nothing)
            converted.eval()(torch.randn(n, 3, 8, 8), task=0)
            original(torch.randn(n, 3, 8, 8))
        converted(torch.randn(2, 3, 10, 10), task=1)  # a new input shape
        original(torch.randn(2, 3, 10, 10))
    assert int(counter) == int(original.calls) == 3


class InPlaceOnAView(nn.Module):
    """Adds a parameter in place to a tensor a permuted view of which the classifier reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        self.shift = nn.Parameter(torch.randn(6))
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x))
        channels_last = h.permute(0, 2, 3, 1)
        h.add_(self.shift.view(1, -1, 1, 1))
        return self.fc(channels_last.mean((1, 2)))


def test_an_in_place_op_that_would_change_a_view_unseen_is_refused_naming_its_line() -> None:
    with pytest.raises(hatnorm.ConversionError, match=r"test_convert_in_place\.py:\d+ `h\.add_\(self\.shift\.view"
                                                      r"\(1, -1, 1, 1\)\)`: operation add_: an in-place operation "
                                                      r"that changes which units a tensor holds"):
        hatnorm.convert(InPlaceOnAView().eval(), num_tasks=2, example_input=torch.randn(2, 3, 8, 8))

"""A number computed from the input's shape and made a Python number (``int(N ** 0.5)`` in ConViT and SAM, a
slice bound, a ``range``) is traced at the example_input's value and checked at every call: the converted model
computes as the original at the example's sizes and refuses other sizes instead of computing with the example's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatnorm


class SquareGrid(nn.Module):
    """ConViT's patch grid: tokens back to a square map of side ``int(N ** .5)``, a range over a size."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        b, n, c = t.shape
        side = int(n ** 0.5)
        h = self.conv(t.transpose(1, 2).reshape(b, c, side, side))
        for _ in range(int(float(side) // 4)):
            h = h + 0
        return self.head(h.mean((2, 3)))


def test_a_number_from_shapes_is_traced_at_the_example_and_checked() -> None:
    torch.manual_seed(0)
    original = SquareGrid().eval()
    x = torch.randn(2, 3, 16, 16)
    model = hatnorm.convert(original, num_tasks=2, norm={"batch": "masked_bn", "layer": "masked_ln"},
                            example_input=x)
    hatnorm.open_gates(model)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, task=1), original(x), atol=1e-5, rtol=0)
        with pytest.raises(Exception, match="traced this model at its example_input's sizes, where this number is 4"):
            model(torch.randn(2, 3, 24, 24), task=1)


def test_a_second_task_forgets_nothing() -> None:
    torch.manual_seed(0)
    probe = torch.randn(2, 3, 16, 16)
    model = hatnorm.convert(SquareGrid(), num_tasks=2, norm={"batch": "masked_bn", "layer": "masked_ln"},
                            num_classes=[3, 4], example_input=probe)
    hat = hatnorm.HAT(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    outputs = []
    for task, classes in enumerate([3, 4]):
        hat.begin_task(task)
        for b in range(3):
            model.train()
            s = hat.scale(b, 3)
            loss = hat.loss(F.cross_entropy(model(torch.randn(8, 3, 16, 16), task=task, s=s),
                                            torch.randint(0, classes, (8,))), s)
            opt.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(opt)
        hat.end_task()
        with torch.no_grad():
            outputs.append(model.eval()(probe, task=0))
    assert torch.equal(outputs[0], outputs[1])


def test_a_number_from_data_is_refused() -> None:
    class FromData(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.head = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return self.head(h.mean((2, 3)) * int(x.max()))

    with pytest.raises(hatnorm.ConversionError, match="cannot trace FromData"):
        hatnorm.convert(FromData(), num_tasks=2, example_input=torch.randn(2, 3, 8, 8))
